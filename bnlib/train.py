"""A small, deterministic training loop that returns its history.

Same seed, same data, same model initialization: the same numbers on every run, so
paired experiments (with and without batch norm) differ only in what they compare.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .data import Split, batches

__all__ = ["batch_order", "evaluate", "fit", "recompute_bn_statistics"]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` in eval mode on (x, y).

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        loss, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            yb = y[i : i + batch_size]
            loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    finally:
        model.train(was_training)
    return loss / len(x), correct / len(x)


def batch_order(n: int, batch_size: int, steps: int,
                seed: int = 0) -> Iterator[np.ndarray]:
    """The index batches ``fit(..., steps=steps, batch_size=batch_size, seed=seed)``
    trains on, in order: ``steps`` arrays of ``batch_size`` indices into ``n`` training
    examples, epoch after epoch, each epoch shuffled from ``seed`` (and the epoch's
    number) with the last incomplete batch dropped. Code that trains on its own (a
    custom loop, a fine-tuning recipe) can use it to see exactly fit's batches."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be from 1 to the {n} training examples, "
                         f"got {batch_size}")
    step, epoch = 0, 0
    while step < steps:
        for idx in batches(n, batch_size, seed=seed * 100_003 + epoch):
            yield idx
            step += 1
            if step == steps:
                return
        epoch += 1


def fit(
    model: nn.Module,
    data: Split,
    *,
    steps: int,
    batch_size: int = 60,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    eval_every: int = 100,
    seed: int = 0,
    train_acc: bool = True,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` with cross-entropy for ``steps`` mini-batch steps.

    ``data`` is a :class:`~bnlib.data.Split` of tensors (see ``data.to_tensors``).
    Every ``eval_every`` steps (and at the end) records, in the returned dict:
    ``step``, ``train_loss`` (mean over the steps since the last record), ``test_loss``,
    ``test_acc`` and ``train_acc`` (eval mode on the training set; ``nan`` with
    ``train_acc=False``, which saves scoring the whole training set at each record).
    Training stops early, recording ``nan``, if the loss becomes non-finite.
    ``on_step(step, model)`` is called after every optimizer step (e.g. to record
    activations). torch's generator is seeded with ``seed`` (for dropout masks) and
    the batches are drawn from ``seed``, so a run depends on its arguments alone.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 1 <= batch_size <= len(data.x_train):
        raise ValueError(f"batch_size must be from 1 to the {len(data.x_train)} "
                         f"training examples, got {batch_size}")
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                              weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    x, y = data.x_train, data.y_train
    history: dict[str, list[float]] = {k: [] for k in
                                       ("step", "train_loss", "test_loss", "test_acc",
                                        "train_acc")}

    def record(step: int, losses: list[float]) -> None:
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
        acc = evaluate(model, x, y)[1] if train_acc else float("nan")
        history["step"].append(step)
        history["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
        history["train_acc"].append(acc)

    torch.manual_seed(seed)  # dropout masks and any other torch randomness in training
    model.train()
    losses = []
    for step, idx in enumerate(batch_order(len(x), batch_size, steps, seed), start=1):
        logits = model(x[idx])
        loss = nn.functional.cross_entropy(logits, y[idx])
        if not torch.isfinite(loss):
            record(step - 1, [float("nan")])
            return history
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model)
        if step % eval_every == 0 or step == steps:
            record(step, losses)
            losses = []
    return history


@torch.no_grad()
def recompute_bn_statistics(
    model: nn.Module, inputs: Iterable[torch.Tensor]
) -> nn.Module:
    """A copy of ``model`` whose batch norms hold population statistics (Ioffe &
    Szegedy's Algorithm 2): the plain average of the batch statistics of ``inputs``.

    Every batch-norm layer's running statistics are reset and then accumulated with
    ``momentum=None`` (a cumulative average) over the batches in ``inputs``, in training
    mode but with dropout off (as at test time: every dropout module, ``Dropout``,
    ``Dropout1d/2d/3d``, ``AlphaDropout`` and ``FeatureAlphaDropout``; a functional
    ``F.dropout(h, p, self.training)`` in a custom forward stays on, as its module must
    be in training mode for the batch norms inside it), without gradients or weight
    updates.
    The copy is returned in eval mode with each layer's momentum restored; ``model``
    itself is untouched.
    """
    pop = copy.deepcopy(model)
    bns = [m for m in pop.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch gets the same weight
    pop.train()  # batch norms normalize with, and record, batch statistics
    for m in pop.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()  # every kind of dropout off, as at test time
    for x in inputs:
        pop(x)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    return pop.eval()
