"""bnlib.data: bundled data loads offline, splits are stratified and deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlib import data


def test_mnist_is_the_bundled_5000_digits_split_80_20():
    split = data.load_mnist()
    assert split.x_train.shape == (4000, 784) and split.x_test.shape == (1000, 784)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert 0 <= split.x_train.min() and split.x_train.max() <= 1
    assert np.bincount(split.y_train).tolist() == [400] * 10  # stratified
    assert np.bincount(split.y_test).tolist() == [100] * 10


def test_split_is_deterministic_and_disjoint():
    a, b, c = data.load_mnist(seed=0), data.load_mnist(seed=0), data.load_mnist(seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.y_train, c.y_train)
    train_rows = {r.tobytes() for r in a.x_train}
    assert not any(r.tobytes() in train_rows for r in a.x_test)


def test_mnist_images_and_limit():
    split = data.load_mnist(image=True, limit=100)
    assert split.x_train.shape == (100, 1, 28, 28)
    assert split.x_test.shape == (1000, 1, 28, 28)


def test_digits():
    split = data.load_digits(image=True)
    assert split.x_train.shape[1:] == (1, 8, 8)
    assert len(split.x_train) + len(split.x_test) == 1797
    assert split.x_train.max() <= 1


def test_synthetic_sets():
    x, y, w = data.linear_regression(n=50, scales=(1.0, 100.0))
    assert x.shape == (50, 2) and y.shape == (50,) and w.shape == (2,)
    assert 30 < x[:, 1].std() / x[:, 0].std() < 300
    x, y = data.spirals(n_per_class=10, n_classes=3)
    assert x.shape == (30, 2) and sorted(set(y.tolist())) == [0, 1, 2]


def test_batches_cover_an_epoch_deterministically():
    first = list(data.batches(10, 3, seed=4))
    again = list(data.batches(10, 3, seed=4))
    assert [b.tolist() for b in first] == [b.tolist() for b in again]
    assert len(first) == 3 and all(len(b) == 3 for b in first)
    everything = np.concatenate(list(data.batches(10, 3, seed=4, drop_last=False)))
    assert sorted(everything.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(10, 0, seed=0))


def test_errors_and_tensors():
    with pytest.raises(ValueError, match="test_fraction"):
        data.stratified_split(np.zeros((4, 1)), np.zeros(4), test_fraction=1.5)
    with pytest.raises(ValueError, match="4 rows but y has 3"):
        data.stratified_split(np.zeros((4, 1)), np.zeros(3))
    t = data.to_tensors(data.load_digits())
    assert isinstance(t.x_train, torch.Tensor) and t.y_train.dtype == torch.int64
