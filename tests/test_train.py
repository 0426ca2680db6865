"""bnlib.train: deterministic, records its history, and actually trains."""

from __future__ import annotations

import math

import pytest
import torch

from bnlib import data, models
from bnlib.train import batch_order, evaluate, fit, recompute_bn_statistics


@pytest.fixture(scope="module")
def digits():
    return data.to_tensors(data.load_digits())


def test_fit_is_deterministic_and_learns(digits):
    runs = [fit(models.mlp([64, 32, 10], norm="bnlib", seed=0), digits, steps=120,
                batch_size=32, lr=0.1, eval_every=40, seed=0) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["step"] == [40, 80, 120]
    assert set(runs[0]) == {"step", "train_loss", "test_loss", "test_acc", "train_acc"}
    assert runs[0]["test_acc"][-1] > 0.85  # 120 steps are enough on 8x8 digits


def test_bn_trains_faster_than_plain_sigmoid_net(digits):
    """The book's first purpose in miniature: same seed, same batches."""
    acc = {norm: fit(models.mlp([64, 32, 32, 10], norm=norm, seed=0), digits, steps=100,
                     batch_size=32, lr=0.5, eval_every=100)["test_acc"][-1]
           for norm in ("none", "bnlib")}
    assert acc["bnlib"] > acc["none"] + 0.1


def test_batch_order_is_the_batches_fit_trains_on(digits):
    """A model that records which training examples it sees: fit's batches, in
    order, over epoch boundaries, are batch_order's."""
    n = len(digits.x_train)
    index = digits.x_train.new_tensor(range(n))[:, None]  # example i's input is i
    seen = []
    spy = torch.nn.Linear(1, 10)
    spy.register_forward_pre_hook(lambda m, inp: seen.append(
        inp[0][:, 0].long().tolist()) if m.training else None)
    steps = n // 32 + 5  # into the second epoch
    fit(spy, data.Split(index, digits.y_train, index[:1], digits.y_train[:1]),
        steps=steps, batch_size=32, lr=0.0, eval_every=steps, seed=3, train_acc=False)
    order = [idx.tolist() for idx in batch_order(n, 32, steps, seed=3)]
    assert len(order) == steps and seen == order
    assert order[: n // 32] != [idx.tolist() for idx in batch_order(n, 32, n // 32)]


def test_a_batch_larger_than_the_data_is_refused_before_training(digits):
    model = models.mlp([64, 10], norm="bnlib").eval()
    small = data.Split(digits.x_train[:10], digits.y_train[:10], digits.x_test,
                       digits.y_test)
    with pytest.raises(ValueError, match="batch_size must be from 1 to the 10 "
                                         "training examples, got 32"):
        fit(model, small, steps=1, batch_size=32)
    assert not model.training  # nothing changed
    with pytest.raises(ValueError, match="got 0"):
        next(batch_order(10, 0, 1))


def test_divergence_stops_with_nan(digits):
    history = fit(models.mlp([64, 16, 10], seed=0), digits,
                  steps=200, lr=1e38, eval_every=50)
    assert math.isnan(history["train_loss"][-1]) and history["step"][-1] < 200


def test_evaluate_restores_mode(digits):
    model = models.mlp([64, 16, 10], norm="bnlib").train()
    loss, acc = evaluate(model, digits.x_test, digits.y_test)
    assert model.training and 0 <= acc <= 1 and loss > 0
    model.eval()
    evaluate(model, digits.x_test, digits.y_test)
    assert not model.training


def test_on_step_and_errors(digits):
    seen = []
    fit(models.mlp([64, 10]), digits, steps=5, on_step=lambda s, m: seen.append(s))
    assert seen == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="steps"):
        fit(models.mlp([64, 10]), digits, steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        fit(models.mlp([64, 10]), digits, steps=1, optimizer="lbfgs")
    assert isinstance(fit(models.mlp([64, 10]), digits, steps=2, optimizer="adam",
                          lr=1e-3)["test_acc"][0], float)


def test_models_run_under_no_grad_in_eval(digits):
    model = models.mlp([64, 16, 10], norm="torch").eval()
    with torch.no_grad():
        assert model(digits.x_test[:1]).shape == (1, 10)


def test_dropout_runs_depend_on_seed_alone(digits):
    """fit seeds torch itself: dropout masks don't depend on what ran before."""
    runs = []
    for noise in (0, 5):
        torch.randn(noise)  # move torch's generator by a different amount
        model = models.mlp([64, 32, 10], dropout=0.5, activation="relu", seed=0)
        runs.append(fit(model, digits, steps=30, eval_every=30, seed=3,
                        train_acc=False))
    assert runs[0] == runs[1] or all(
        a == b or (math.isnan(a) and math.isnan(b))
        for k in runs[0] for a, b in zip(runs[0][k], runs[1][k], strict=True))
    assert math.isnan(runs[0]["train_acc"][0])


@pytest.mark.parametrize("norm", ["bnlib", "torch"])
def test_recompute_bn_statistics_is_the_population_average(digits, norm):
    """Algorithm 2: running statistics become the mean of the batch statistics, with
    dropout off; the model itself is untouched."""
    model = models.mlp([64, 16, 10], norm=norm, dropout=0.5, seed=0)
    fit(model, digits, steps=20, eval_every=20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chunks = digits.x_train.split(100)
    pop = recompute_bn_statistics(model, chunks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    bn, linear = pop[1], pop[0]
    with torch.no_grad():
        z = [linear(c) for c in chunks]
    means = torch.stack([t.mean(0) for t in z]).mean(0)
    variances = torch.stack([t.var(0) for t in z]).mean(0)  # unbiased, as stored
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, variances)
    assert not pop.training and bn.momentum == 0.1
    assert bn.num_batches_tracked.item() == len(chunks)


@pytest.mark.parametrize("dropout", [torch.nn.Dropout1d, torch.nn.AlphaDropout,
                                     torch.nn.FeatureAlphaDropout, torch.nn.Dropout])
def test_recompute_bn_statistics_turns_every_kind_of_dropout_off(dropout):
    """Every dropout module is off while the statistics are recomputed (only
    nn.Dropout was): two recomputations agree, and equal those of the model without
    its dropout."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(dropout(0.5), torch.nn.Conv1d(3, 4, 1, bias=False),
                                torch.nn.BatchNorm1d(4))
    chunks = [torch.randn(16, 3, 5) for _ in range(3)]
    first = recompute_bn_statistics(model, chunks)[2]
    second = recompute_bn_statistics(model, chunks)[2]
    without = recompute_bn_statistics(model[1:], chunks)[1]
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(first, name), getattr(second, name),
                                   rtol=0, atol=0)
        torch.testing.assert_close(getattr(first, name), getattr(without, name))
