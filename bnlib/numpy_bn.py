"""Batch normalization in NumPy: the forward pass, its backward pass and inference.

This is the math of Ioffe & Szegedy (2015), written so that a reader can check each line
against the book's equations, and so that it runs about as fast as PyTorch's own CPU
kernel.

For an input ``x`` of shape ``(N, C)`` or ``(N, C, *spatial)``, statistics are taken per
channel ``c`` over the ``M = N * prod(spatial)`` values that share that channel:

    mu    = mean(x)                          # (C,)
    var   = mean((x - mu) ** 2)              # (C,)  biased: divide by M
    x_hat = (x - mu) / sqrt(var + eps)       # same shape as x
    y     = gamma * x_hat + beta             # same shape as x

and the backward pass, in its compact closed form, is

    dbeta  = sum(dy)
    dgamma = sum(dy * x_hat)
    dx     = gamma / sqrt(var + eps) * (dy - dbeta / M - x_hat * dgamma / M)

Conventions follow PyTorch: normalize with the biased variance, store the unbiased one
(``var * M / (M - 1)``) in ``running_var``, and update running statistics with
``running = (1 - momentum) * running + momentum * batch_stat``.

Numerical stability: the variance is computed from deviations, in two passes
(``mean((x - mu) ** 2)``, with the mean corrected by the deviations' own mean), never
as ``mean(x ** 2) - mu ** 2``, which cancels catastrophically when ``|mu| >> std``.
Speed: the work is done in blocks of samples small enough to stay in the CPU cache, with
``out=`` and in-place operations so that large temporaries are never allocated.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "Cache",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_steps",
    "batchnorm_inference",
    "batch_stats",
    "BatchNorm",
]

# A block of about this many bytes (input and one temporary) stays in the L2 cache.
_BLOCK_BYTES = 1 << 20


class Cache(NamedTuple):
    """What the forward pass keeps for the backward pass.

    Only the input and three per-channel vectors are kept; ``x_hat`` is recomputed on
    demand, so the cache costs no more memory than the input it refers to.
    """

    x: np.ndarray  # (N, C, *spatial) the input (a reference, not a copy)
    mu: np.ndarray  # (C,) batch mean
    var: np.ndarray  # (C,) biased batch variance
    inv_std: np.ndarray  # (C,) 1 / sqrt(var + eps)
    gamma: np.ndarray  # (C,) scale used in the forward pass
    eps: float

    @property
    def x_hat(self) -> np.ndarray:
        """The normalized input ``(x - mu) / sqrt(var + eps)``, shape of ``x``."""
        shape = _channel_shape(self.x)
        return (self.x - self.mu.reshape(shape)) * self.inv_std.reshape(shape)


# --------------------------------------------------------------------------- checks


def _check_input(x: np.ndarray, num_features: int | None = None) -> None:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"x must be float32 or float64, got {x.dtype}; convert it with "
            "x.astype(np.float32)"
        )
    if x.ndim < 2:
        raise ValueError(
            f"x must have shape (N, C) or (N, C, *spatial), got shape {x.shape}"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"x has {x.shape[1]} channels (shape {x.shape}), expected {num_features}: "
            f"shape (N, {num_features}, ...)"
        )


def _check_vector(name: str, v: np.ndarray, num_features: int) -> None:
    if np.shape(v) != (num_features,):
        raise ValueError(
            f"{name} must have shape ({num_features},), one value per channel, "
            f"got shape {np.shape(v)}"
        )


def _check_batch(x: np.ndarray) -> None:
    m = x.size // x.shape[1] if x.shape[1] else 0
    if m <= 1:
        raise ValueError(
            "batch statistics need more than 1 value per channel, got input of shape "
            f"{x.shape} ({m} value per channel); use a larger batch or eval mode"
        )


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


# --------------------------------------------------------------------------- blocks


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against x: (1, C, 1, ..., 1)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


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
    shape and dtype as ``x``; ``cache`` (a :class:`Cache`) holds what the backward pass
    needs.
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
    - cache: from :func:`batchnorm_forward`

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


def batchnorm_backward_steps(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch norm, one node of the computation graph per line.

    The same result as :func:`batchnorm_backward`, derived by walking the forward graph
    backwards (the chain rule applied node by node). Slower; written to be read.

    Forward graph, per channel, over the M values of the batch:
        xc = x - mu;  var = mean(xc ** 2);  std = sqrt(var + eps);  inv = 1 / std
        x_hat = xc * inv;  y = gamma * x_hat + beta
    """
    x, mu, var, _, gamma, eps = cache
    if np.shape(dy) != x.shape:
        raise ValueError(
            f"dy must have the forward input's shape {x.shape}, got {np.shape(dy)}"
        )
    axes = (0,) + tuple(range(2, x.ndim))  # every axis but the channel axis
    shape = _channel_shape(x)  # (1, C, 1, ...)
    m = x.size // x.shape[1]

    # Forward again, keeping every intermediate node.
    xc = x - mu.reshape(shape)  # (N, C, ...)
    std = np.sqrt(var + eps)  # (C,)
    inv = 1 / std  # (C,)
    x_hat = xc * inv.reshape(shape)  # (N, C, ...)

    # Backward, node by node, from y to x.
    dbeta = dy.sum(axis=axes)  # y = ... + beta
    dgamma = (dy * x_hat).sum(axis=axes)  # y = gamma * x_hat + ...
    dx_hat = dy * gamma.reshape(shape)  # y = gamma * x_hat
    dinv = (dx_hat * xc).sum(axis=axes)  # x_hat = xc * inv   (inv is per channel)
    dxc = dx_hat * inv.reshape(shape)  # x_hat = xc * inv   (path 1 into xc)
    dstd = -dinv / std**2  # inv = 1 / std
    dvar = dstd / (2 * std)  # std = sqrt(var + eps)
    dxc += 2 * xc * dvar.reshape(shape) / m  # var = mean(xc ** 2)  (path 2 into xc)
    dmu = -dxc.sum(axis=axes)  # xc = x - mu
    dx = dxc + dmu.reshape(shape) / m  # mu = mean(x), and xc = x - mu
    return dx, dgamma, dbeta


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
    ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``. Each output depends
    on its own input only, never on the rest of the batch.
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


# --------------------------------------------------------------------------- the layer


class BatchNorm:
    """A batch-norm layer in NumPy, with PyTorch's conventions.

    Holds ``gamma`` and ``beta`` (learned, shape (C,)) and ``running_mean`` and
    ``running_var`` (saved state, not learned). In training mode, ``forward`` normalizes
    with the batch statistics and updates the running ones::

        running_mean = (1 - momentum) * running_mean + momentum * mu
        running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)

    ``momentum=None`` gives the cumulative average (momentum = 1 / num_batches_tracked).
    In eval mode it normalizes with the running statistics. ``backward(dy)`` returns
    ``dx`` and stores ``dgamma`` and ``dbeta``. A call that raises changes nothing.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        dtype: np.dtype | type = np.float64,
    ) -> None:
        if not (isinstance(num_features, (int, np.integer)) and num_features > 0):
            raise ValueError(
                f"num_features must be a positive int, got {num_features!r}"
            )
        _check_eps(eps)
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.gamma = np.ones(num_features, dtype=dtype)
        self.beta = np.zeros(num_features, dtype=dtype)
        self.running_mean = np.zeros(num_features, dtype=dtype)
        self.running_var = np.ones(num_features, dtype=dtype)
        self.num_batches_tracked = 0
        self.training = True
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        self._cache: Cache | None = None

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen (as torch's)."""
        self.running_mean = np.zeros_like(self.running_mean)
        self.running_var = np.ones_like(self.running_var)
        self.num_batches_tracked = 0

    def train(self, mode: bool = True) -> BatchNorm:
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        return self.train(False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` (N, C, *spatial); update running statistics in training."""
        _check_input(x, self.num_features)
        if not self.training:
            self._cache = None
            return batchnorm_inference(x, self.gamma, self.beta, self.running_mean,
                                       self.running_var, self.eps)
        y, cache = batchnorm_forward(x, self.gamma, self.beta, self.eps)  # may raise
        # Only now, after everything that can fail, change the layer's state.
        m = x.size // x.shape[1]
        self.num_batches_tracked += 1
        if self.momentum is None:
            momentum = 1.0 / self.num_batches_tracked  # cumulative average
        else:
            momentum = self.momentum
        unbiased_var = cache.var * (m / (m - 1))
        dt = self.running_mean.dtype
        self.running_mean = ((1 - momentum) * self.running_mean
                             + momentum * cache.mu).astype(dt)
        self.running_var = ((1 - momentum) * self.running_var
                            + momentum * unbiased_var).astype(dt)
        self._cache = cache
        return y

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Return ``dx`` for the last training-mode ``forward``; store dgamma, dbeta."""
        if self._cache is None:
            raise RuntimeError(
                "backward() needs a training-mode forward() first (eval mode keeps "
                "no cache)"
            )
        dx, dgamma, dbeta = batchnorm_backward(dy, self._cache)
        self.dgamma, self.dbeta = dgamma, dbeta
        return dx

    def state_dict(self) -> dict[str, np.ndarray]:
        """The same keys as ``torch.nn.BatchNorm*``'s state_dict, as NumPy arrays."""
        return {
            "weight": self.gamma.copy(),
            "bias": self.beta.copy(),
            "running_mean": self.running_mean.copy(),
            "running_var": self.running_var.copy(),
            "num_batches_tracked": np.array(self.num_batches_tracked, dtype=np.int64),
        }

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, training={self.training})")
