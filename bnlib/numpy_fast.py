"""Batch normalization in NumPy, fast: cache-blocked kernels for the same math.

The same functions as :mod:`bnlib.numpy_bn` (the reference, written to be read against
the book's equations), with the same signatures, checks and errors, and the same
:class:`~bnlib.numpy_bn.Cache`, so that a cache from one module's forward pass works
with the other's backward pass. The tests (``tests/test_numpy_fast.py``) check that
both give the same results; this module is the subject of the performance chapter,
which compares it with PyTorch's own CPU kernel (``python -m bnlib.bench``).

What makes it fast:

- the work is done in blocks of samples small enough to stay in the CPU cache, with
  ``out=`` and in-place operations, so that large temporaries are never allocated;
- per-channel sums are BLAS matrix-vector products with a vector of ones, and sums of
  products are ``einsum`` calls, which multiply and add in one pass;
- the backward pass reads ``x`` and ``dy`` twice and writes ``dx`` once, without ever
  forming ``x_hat``.

Numerical stability: the variance is computed from deviations, by the corrected
two-pass algorithm (``mean((x - mu_1) ** 2)`` with the first mean ``mu_1`` corrected by
the deviations' own mean), never as ``mean(x ** 2) - mu ** 2``. The correction also
keeps float32 outputs accurate when ``|mu| >> std``, where ``mu`` itself rounds.
"""

from __future__ import annotations

import numpy as np

from .numpy_bn import (
    Cache,
    _channel_shape,
    _check_batch,
    _check_eps,
    _check_input,
    _check_vector,
)

__all__ = [
    "Cache",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_inference",
    "batch_stats",
]

# A block of about this many bytes (input and one temporary) stays in the L2 cache.
_BLOCK_BYTES = 1 << 20


# --------------------------------------------------------------------------- blocks


def _as_ncl(x: np.ndarray) -> np.ndarray:
    """View x as (N, C, L), L = prod(spatial) (1 for (N, C) input); copies if needed."""
    return np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)


def _blocks(x3: np.ndarray):
    """Slices of the sample axis, each about _BLOCK_BYTES of x3."""
    n = x3.shape[0]
    per_sample = max(1, x3[0].nbytes)
    step = max(1, min(n, _BLOCK_BYTES // per_sample))
    return [slice(i, i + step) for i in range(0, n, step)]


def _channel_sum(t: np.ndarray) -> np.ndarray:
    """Sum a contiguous (n, C, L) block over samples and positions: -> (C,).

    The rows of length L are summed by a BLAS matrix-vector product with a vector of
    ones (several times faster than NumPy's reduction), then the (n, C) row sums over n.
    """
    n, c, length = t.shape
    if length == 1:
        return np.ones(n, dtype=t.dtype) @ t[:, :, 0]  # (n, C) -> (C,)
    rows = t.reshape(n * c, length) @ np.ones(length, dtype=t.dtype)  # (n * C,)
    return rows.reshape(n, c).sum(axis=0)


def _channel_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel sum(a * b) of two contiguous (n, C, L) blocks -> (C,), without
    forming the product: einsum multiplies and adds in one pass."""
    n, c, length = a.shape
    if length == 1:
        return np.einsum("nc,nc->c", a[:, :, 0], b[:, :, 0])
    rows = np.einsum("ij,ij->i", a.reshape(n * c, length), b.reshape(n * c, length))
    return rows.reshape(n, c).sum(axis=0)


def _centre(
    x3: np.ndarray, out: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of (N, C, L), by the corrected two-pass
    algorithm (Chan, Golub & LeVeque, 1983); ``out`` receives x - mu_1.

    A first estimate ``mu_1 = mean(x)`` is subtracted; the deviations d = x - mu_1 are
    small, so ``delta = mean(d)`` (the first estimate's rounding error) and
    ``mean(d ** 2)`` are accurate, and

        mu = mu_1 + delta,    var = mean(d ** 2) - delta ** 2.

    ``delta`` is tiny, so the subtraction loses nothing: no ``E[x^2] - E[x]^2``
    cancellation even when |mu| >> std. Returns (mu, var, delta), each (C,).
    """
    m = x3.dtype.type(x3.shape[0] * x3.shape[2])  # values per channel
    mu_1 = _channel_sum(x3) / m  # (N, C, L) -> (C,)
    d_sum, d_sq = np.zeros_like(mu_1), np.zeros_like(mu_1)
    for blk in _blocks(x3):
        d = out[blk]
        np.subtract(x3[blk], mu_1[:, None], out=d)  # x - mu_1, block by block
        d_sum += _channel_sum(d)
        d_sq += _channel_dot(d, d)
    delta = d_sum / m
    var = np.maximum(d_sq / m - delta * delta, 0)  # >= 0 also after rounding
    return mu_1 + delta, var, delta


def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel batch mean and biased variance, two-pass: (N, C, ...) -> (C,) x2."""
    _check_input(x)
    _check_batch(x)
    x3 = _as_ncl(x)
    mu, var, _ = _centre(x3, np.empty_like(x3))
    return mu, var


# ----------------------------------------------------------------- forward and backward


def batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """Training-mode batch norm: normalize with the batch's own statistics.

    Inputs:
    - x: (N, C) or (N, C, *spatial), float32 or float64
    - gamma, beta: (C,) scale and shift (cast to x's dtype)
    - eps: added to the variance before the square root, > 0

    Returns ``(y, cache)``: ``y = gamma * (x - mu) / sqrt(var + eps) + beta``, same
    shape and dtype as ``x``; ``cache`` (a :class:`~bnlib.numpy_bn.Cache`) holds what
    the backward pass needs.
    """
    _check_input(x)
    c = x.shape[1]
    _check_vector("gamma", gamma, c)
    _check_vector("beta", beta, c)
    _check_eps(eps)
    _check_batch(x)
    gamma = np.asarray(gamma, dtype=x.dtype)
    beta = np.asarray(beta, dtype=x.dtype)

    x3 = _as_ncl(x)  # (N, C, L)
    y3 = np.empty_like(x3)  # holds x - mu_1 first, then y
    mu, var, delta = _centre(x3, out=y3)  # (C,) each; y3 = x - mu + delta
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))  # (C,)
    scale = gamma * inv_std  # (C,): gamma / sqrt(var + eps)
    shift = beta - delta * scale  # (C,): so that y = (x - mu) * scale + beta
    for blk in _blocks(x3):
        out = y3[blk]
        out *= scale[:, None]  # gamma * x_hat
        out += shift[:, None]  # + beta
    y = y3.reshape(x.shape)
    return y, Cache(x, mu, var, inv_std, gamma, float(eps))


def batchnorm_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch norm, the compact closed form.

    Inputs:
    - dy: (N, C, *spatial) upstream gradient, shape of the forward input
    - cache: from :func:`batchnorm_forward` (this module's or numpy_bn's)

    Returns ``(dx, dgamma, dbeta)`` with shapes ``x.shape``, ``(C,)``, ``(C,)``::

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma * inv_std * (dy - dbeta / M - x_hat * dgamma / M)
    """
    x, mu, _, inv_std, gamma, _ = cache
    if np.shape(dy) != x.shape:
        raise ValueError(
            f"dy must have the forward input's shape {x.shape}, got {np.shape(dy)}"
        )
    dy = np.asarray(dy, dtype=x.dtype)
    x3, dy3 = _as_ncl(x), _as_ncl(dy)  # (N, C, L)
    m = x3.shape[0] * x3.shape[2]
    blocks = _blocks(x3)
    tmp = np.empty_like(x3[blocks[0]])

    # One pass over (x, dy): dbeta = sum(dy) and sum(dy * (x - mu)); x - mu is formed
    # one cache-sized block at a time, in scratch space.
    dbeta = np.zeros_like(mu)
    dy_xc = np.zeros_like(mu)
    for blk in blocks:
        xc = tmp[: x3[blk].shape[0]]
        dbeta += _channel_sum(dy3[blk])
        np.subtract(x3[blk], mu[:, None], out=xc)  # x - mu
        dy_xc += _channel_dot(xc, dy3[blk])  # sum(dy * (x - mu))
    dgamma = dy_xc * inv_std  # sum(dy * x_hat)

    # dx = k_dy * dy + k_xc * (x - mu) + k_0, with per-channel constants, computed as
    # k_dy * dy + k_xc * x + (k_0 - k_xc * mu). The x term is the small correction
    # x_hat * dgamma / M, so rounding x * k_xc costs little even when |mu| >> std.
    k_dy = gamma * inv_std  # gamma / sqrt(var + eps)
    k_xc = -k_dy * inv_std * dgamma / m  # x_hat * dgamma / M, as a multiple of x - mu
    k_0 = -k_dy * dbeta / m - k_xc * mu  # dbeta / M, and the mu of k_xc * (x - mu)
    dx3 = np.empty_like(x3)
    for blk in blocks:
        out, t = dx3[blk], tmp[: x3[blk].shape[0]]
        np.multiply(x3[blk], k_xc[:, None], out=out)
        out += k_0[:, None]
        np.multiply(dy3[blk], k_dy[:, None], out=t)
        out += t
    return dx3.reshape(x.shape), dgamma, dbeta


def batchnorm_inference(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = 1e-5,
) -> np.ndarray:
    """Eval-mode batch norm: normalize with saved statistics, one example at a time.

    Inputs: ``x`` (N, C, *spatial); ``gamma``, ``beta``, ``running_mean``,
    ``running_var`` (C,). Returns
    ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``, computed as
    ``(x - running_mean) * scale + beta`` with the per-channel ``scale`` folded first,
    in place in one output array.
    """
    _check_input(x)
    c = x.shape[1]
    for name, v in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)]:
        _check_vector(name, v, c)
    _check_eps(eps)
    dt = x.dtype.type
    mean = np.asarray(running_mean, dtype=x.dtype)
    scale = np.asarray(gamma, dtype=x.dtype) / np.sqrt(
        np.asarray(running_var, dtype=x.dtype) + dt(eps)
    )  # (C,)
    shape = _channel_shape(x)
    y = np.subtract(x, mean.reshape(shape))
    y *= scale.reshape(shape)
    y += np.asarray(beta, dtype=x.dtype).reshape(shape)
    return y
