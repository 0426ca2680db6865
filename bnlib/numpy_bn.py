"""Batch normalization in NumPy, the reference: the book's equations, line by line.

This is the math of Ioffe & Szegedy (2015), written so that a reader can check each line
against the book's equations; each function is a few lines, about as long as the
formulas it implements. :mod:`bnlib.numpy_fast` has the same functions as fast,
cache-blocked kernels, and is tested equal to this reference.

For an input ``x`` of shape ``(N, C)`` or ``(N, C, *spatial)``, statistics are taken per
channel ``c`` over the ``M = N * prod(spatial)`` values that share that channel, that is
over axis 0 and every spatial axis (``axis=(0, 2, 3, ...)``):

    mu    = mean(x)                          # (C,)
    var   = mean((x - mu) ** 2)              # (C,)  biased: divide by M
    x_hat = (x - mu) / sqrt(var + eps)       # same shape as x
    y     = gamma * x_hat + beta             # same shape as x

and the backward pass, in its compact closed form, is

    dbeta  = sum(dy)
    dgamma = sum(dy * x_hat)
    dx     = gamma / sqrt(var + eps) * (dy - dbeta / M - x_hat * dgamma / M)

In the code, per-channel values are kept with shape ``(1, C, 1, ...)`` (``keepdims``)
so that they broadcast against ``x``; the :class:`Cache` stores them as ``(C,)``.

Conventions follow PyTorch: normalize with the biased variance, store the unbiased one
(``var * M / (M - 1)``) in ``running_var``, and update running statistics with
``running = (1 - momentum) * running + momentum * batch_stat``.

Numerical stability: the variance is computed from deviations, ``mean((x - mu) ** 2)``,
never as ``mean(x ** 2) - mu ** 2``, which cancels catastrophically when
``|mu| >> std``. Every operation runs in ``x``'s dtype. In float64 the results equal
PyTorch's to about 1e-12. In float32 the variance stays accurate when ``|mu| >> std``,
but ``mu`` itself is a float32 mean, and its rounding error shifts every ``x_hat`` of a
channel alike, by ``error / std``; :mod:`bnlib.numpy_fast` corrects for that.
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


# --------------------------------------------------------------------------- shapes


def _channel_axes(x: np.ndarray) -> tuple[int, ...]:
    """The axes statistics are taken over: every axis but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))  # (0, 2, 3, ...)


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against x: (1, C, 1, ..., 1)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


# ----------------------------------------------------------------- forward and backward


def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel batch mean and biased variance: (N, C, ...) -> (C,), (C,).

        mu  = mean(x)                 over axis 0 and the spatial axes
        var = mean((x - mu) ** 2)     biased (divide by M), from deviations
    """
    _check_input(x)
    _check_batch(x)
    axes = _channel_axes(x)  # (0, 2, 3, ...)
    mu = x.mean(axis=axes, keepdims=True)  # (1, C, 1, ...)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)  # (1, C, 1, ...)
    return mu.ravel(), var.ravel()  # (C,), (C,)


def batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """Training-mode batch norm: normalize with the batch's own statistics.

    Inputs:
    - x: (N, C) or (N, C, *spatial), float32 or float64
    - gamma, beta: (C,) scale and shift (cast to x's dtype)
    - eps: added to the variance before the square root, > 0

    Returns ``(y, cache)``, ``y`` of the same shape and dtype as ``x``::

        mu    = mean(x)                       # (C,)  over axis (0, 2, 3, ...)
        var   = mean((x - mu) ** 2)           # (C,)  biased
        x_hat = (x - mu) / sqrt(var + eps)    # (N, C, ...)
        y     = gamma * x_hat + beta          # (N, C, ...)

    ``cache`` (a :class:`Cache`) holds what the backward pass needs.
    """
    _check_input(x)
    C = x.shape[1]
    _check_vector("gamma", gamma, C)
    _check_vector("beta", beta, C)
    _check_eps(eps)
    _check_batch(x)
    axes = _channel_axes(x)  # (0, 2, 3, ...)
    shape = _channel_shape(x)  # (1, C, 1, ...)
    gamma = np.asarray(gamma, dtype=x.dtype).reshape(shape)  # (1, C, 1, ...)
    beta = np.asarray(beta, dtype=x.dtype).reshape(shape)  # (1, C, 1, ...)
    eps = float(eps)  # a Python float keeps x's dtype

    mu = x.mean(axis=axes, keepdims=True)  # (1, C, 1, ...)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)  # (1, C, 1, ...)
    inv_std = 1 / np.sqrt(var + eps)  # (1, C, 1, ...)
    x_hat = (x - mu) * inv_std  # (N, C, ...)
    y = gamma * x_hat + beta  # (N, C, ...)

    cache = Cache(x, mu.ravel(), var.ravel(), inv_std.ravel(), gamma.ravel(), eps)
    return y, cache


def batchnorm_backward(
    dy: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch norm, the compact closed form.

    Inputs:
    - dy: (N, C, *spatial) upstream gradient, shape of the forward input
    - cache: from :func:`batchnorm_forward`

    Returns ``(dx, dgamma, dbeta)`` with shapes ``x.shape``, ``(C,)``, ``(C,)``::

        dbeta  = sum(dy)                      # (C,)  over axis (0, 2, 3, ...)
        dgamma = sum(dy * x_hat)              # (C,)
        dx     = gamma * inv_std * (dy - dbeta / M - x_hat * dgamma / M)
    """
    x = cache.x
    if np.shape(dy) != x.shape:
        raise ValueError(
            f"dy must have the forward input's shape {x.shape}, got {np.shape(dy)}"
        )
    dy = np.asarray(dy, dtype=x.dtype)
    axes = _channel_axes(x)  # (0, 2, 3, ...)
    shape = _channel_shape(x)  # (1, C, 1, ...)
    gamma = cache.gamma.reshape(shape)  # (1, C, 1, ...)
    inv_std = cache.inv_std.reshape(shape)  # (1, C, 1, ...)
    x_hat = cache.x_hat  # (N, C, ...)
    M = x.size // x.shape[1]  # values per channel

    dbeta = dy.sum(axis=axes, keepdims=True)  # (1, C, 1, ...)
    dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)  # (1, C, 1, ...)
    dx = gamma * inv_std * (dy - dbeta / M - x_hat * dgamma / M)  # (N, C, ...)
    return dx, dgamma.ravel(), dbeta.ravel()


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
    axes = _channel_axes(x)  # (0, 2, 3, ...): every axis but the channel axis
    shape = _channel_shape(x)  # (1, C, 1, ...)
    M = x.size // x.shape[1]

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
    dxc += 2 * xc * dvar.reshape(shape) / M  # var = mean(xc ** 2)  (path 2 into xc)
    dmu = -dxc.sum(axis=axes)  # xc = x - mu
    dx = dxc + dmu.reshape(shape) / M  # mu = mean(x), and xc = x - mu
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
    ``running_var`` (C,). Returns, with the shape and dtype of ``x``::

        y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta

    Each output depends on its own input only, never on the rest of the batch.
    """
    _check_input(x)
    C = x.shape[1]
    for name, v in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)]:
        _check_vector(name, v, C)
    _check_eps(eps)
    shape = _channel_shape(x)  # (1, C, 1, ...)
    gamma, beta, mean, var = (np.asarray(v, dtype=x.dtype).reshape(shape)
                              for v in (gamma, beta, running_mean, running_var))
    eps = float(eps)  # a Python float keeps x's dtype

    return gamma * (x - mean) / np.sqrt(var + eps) + beta  # (N, C, ...)


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
