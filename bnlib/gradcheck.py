"""Numerical gradients by central differences, to check the hand-derived backward
passes.

For a function ``f`` and an upstream gradient ``dout`` the loss is ``sum(f(x) * dout)``;
its derivative in each coordinate is estimated as
``(L(x + h e_i) - L(x - h e_i)) / 2h``, with error O(h^2). Use float64: in float32 the
rounding of ``L`` swamps the estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["numerical_gradient", "rel_error"]


def numerical_gradient(
    f: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    dout: np.ndarray,
    h: float = 1e-5,
) -> np.ndarray:
    """Central-difference gradient of ``sum(f(x) * dout)`` with respect to ``x``.

    Inputs: ``f`` maps an array shaped like ``x`` to an array shaped like ``dout``;
    ``x`` is perturbed in place one entry at a time and restored (also if ``f`` raises).
    Returns an array shaped like ``x``.
    """
    if x.dtype != np.float64:
        raise TypeError(f"use float64 for numerical gradients, got {x.dtype}")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views: x must be contiguous
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous, so that it can be perturbed in place")
    for i in range(flat.size):
        old = flat[i]
        try:
            flat[i] = old + h
            plus = np.sum(f(x) * dout)
            flat[i] = old - h
            minus = np.sum(f(x) * dout)
        finally:
            flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest relative difference ``|a - b| / max(|a| + |b|, 1e-12)``, element-wise."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-12)))
