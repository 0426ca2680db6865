"""Golden values of the pipeline every chapter stands on: data, batches, init, training.

The chapters store outputs that depend on the exact digit split, batch order, initial
weights and training loop. A change to any of them (a new seed scheme, a different
split, another initializer) would change dozens of stored cells at once; these tests
make it one named failure that says which function changed. If the change is
intended, update the golden values here and re-run the chapters (``make execute``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from checks import named

from bnlib import data, models
from bnlib.train import fit


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("loader, digest, first_labels", [
    (data.load_mnist, "cba5b4c28888440f", [4, 3, 9, 9, 0, 9, 6, 5, 7, 7]),
    (data.load_digits, "bb0f8c05d173d6f5", [4, 2, 1, 4, 5, 3, 0, 1, 5, 0]),
])
def test_the_default_splits_are_the_ones_the_chapters_were_run_on(loader, digest,
                                                                  first_labels):
    split = loader()
    name = f"bnlib.data.{loader.__name__}()"
    assert split.y_train[:10].tolist() == first_labels, (
        f"{name}: the training labels start {split.y_train[:10].tolist()}, the "
        f"chapters were run on a split starting {first_labels} (stratified_split?)")
    assert _digest(*split) == digest, (
        f"{name}: the split's bytes changed (sha256 prefix {_digest(*split)}, expected "
        f"{digest}): the pixel scaling or the split differs from the chapters'")


def test_the_batch_order_is_the_one_the_chapters_were_run_on():
    # fit draws epoch e of seed s from batches(..., seed=s * 100_003 + e)
    for seed, first in [(0, [672, 2292, 1819, 3611, 46, 1125, 3077, 1403]),
                        (100_003, [3683, 2379, 2747, 3229, 1878, 2285, 2746, 333])]:
        got = next(data.batches(4000, 60, seed=seed))[:8].tolist()
        assert got == first, (
            f"bnlib.data.batches(4000, 60, seed={seed}): first batch starts {got}, "
            f"expected {first}")


def test_the_initial_weights_are_the_ones_the_chapters_were_run_on():
    net = models.mlp([784, 100, 100, 100, 10], norm="bnlib", seed=0)
    w = net[0].weight.detach()
    first = [-0.00026738643646240234, 0.019158700481057167, -0.029394470155239105,
             -0.026283537968993187]
    torch.testing.assert_close(
        w[0, :4], torch.tensor(first), rtol=0, atol=0,
        msg=named("bnlib.models.mlp(seed=0): the first-layer weights changed"))
    assert abs(w.double().sum().item() - 0.9559173323655159) < 1e-9, (
        "bnlib.models.mlp(seed=0): the sum of the first layer's weights changed")


@pytest.mark.parametrize("norm, train_loss, test_loss, test_acc", [
    ("none", [2.716633, 2.338383], [2.332152, 2.323479], [0.1, 0.1]),
    ("bnlib", [6.390478, 1.286218], [1.536874, 1.321391], [0.489, 0.514]),
])
def test_a_short_run_of_chapter_5s_setting_gives_its_golden_history(
        norm, train_loss, test_loss, test_acc):
    """784-100-100-100-10 sigmoid net, SGD at rate 5, batches of 60, 40 steps."""
    split = data.to_tensors(data.load_mnist())
    net = models.mlp([784, 100, 100, 100, 10], norm=norm, seed=0)
    hist = fit(net, split, steps=40, lr=5.0, eval_every=20, train_acc=False)
    where = f"bnlib.train.fit (norm={norm!r}, 40 steps at rate 5)"
    assert hist["step"] == [20, 40], f"{where}: recorded at steps {hist['step']}"
    # losses to a relative 1e-4, accuracies to two test digits of 1,000
    for key, want, rtol, atol in [("train_loss", train_loss, 1e-4, 0),
                                  ("test_loss", test_loss, 1e-4, 0),
                                  ("test_acc", test_acc, 0, 0.0025)]:
        got = hist[key]
        assert np.allclose(got, want, rtol=rtol, atol=atol), (
            f"{where}: {key} {np.round(got, 6).tolist()}, expected {want}")
