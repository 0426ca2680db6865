"""Batch norm's kernels: plain functions of tensors, the math the book reads.

The bottom of ``bnlib.nn``: no autograd, no torch.library, only tensor arithmetic.
``_forward_kernel`` and ``_backward_kernel`` compute y, the batch statistics and the
closed-form gradients; ``_backward_differentiable`` is the same backward from
differentiable operations, for double backward. Half and bfloat16 inputs are computed
in float32, as torch does. The helpers above them (``_channel_sum``, ``_channel_dot``,
``_affine``) are the per-channel reductions and the affine map, tuned for CPU.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_REDUCED = (torch.float16, torch.bfloat16)  # computed in float32, like torch
_CHUNK_BYTES = 1 << 19  # a chunk of this size, and its temporaries, stay in L2 cache
_TILE_MIN = 1 << 13  # values: from here on, _affine's tile pays for itself
_PLANE_BYTES = 1 << 20  # _affine tiles a whole (C, *spatial) plane up to this size


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1:
    (N, C, *spatial) -> [0, 2, 3, ...]."""
    return [0] + list(range(2, x.dim()))


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """View a (C,) vector as (C, 1, ..., 1), to broadcast against x of shape
    (N, C, ...)."""
    d = x.dim()
    if d == 2:
        return v
    # the sizes as separate arguments: measured 3.1 us a view against 4.7 us for one
    # list or tuple argument (and this runs several times a call)
    return v.view(-1, 1, 1) if d == 4 else v.view(-1, *(1,) * (d - 2))


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; t itself when it already is (skips a no-op call's overhead)."""
    return t if t.dtype == dtype else t.to(dtype)


@functools.lru_cache(maxsize=64)
def _cpu_scalar(value: float, dtype: torch.dtype) -> Tensor:
    """value as a 0-dim CPU tensor of dtype, made once (outside inference mode, so
    that any later computation may use it)."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype)


def _scalar(value: float, t: Tensor) -> Tensor | float:
    """value for arithmetic with the CPU tensor t: a 0-dim tensor of t's dtype, which
    gives the very bits a Python number gives (both are cast to t's dtype) and costs
    about half as much per op (no wrapping of a number on each call; measured 4.3 vs
    8.4 us for a (128,) add). Elsewhere (GPU, fake or batched tensors, code that
    torch.compile traces) the number."""
    if not torch.compiler.is_compiling() and t.is_cpu and type(t) is torch.Tensor \
            and not _wrapped(t):
        return _cpu_scalar(float(value), t.dtype)
    return value


def _wrapped(t: Tensor) -> bool:
    """True for a functorch-wrapped tensor (vmap, grad): plain numbers there."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _compute(x: Tensor) -> Tensor:
    """x in the dtype the arithmetic runs in: float32 for half and bfloat16."""
    return x.float() if x.dtype in _REDUCED else x


def _small(x: Tensor) -> bool:
    """True for inputs small enough that per-op overhead, not memory, is the cost."""
    return x.numel() * x.element_size() <= _CHUNK_BYTES


def _channel_sum(t: Tensor) -> Tensor:
    """Sum over every dimension but dimension 1: (N, C, *spatial) -> (C,)."""
    if t.dim() == 2:
        return t.sum(0)
    if t.is_contiguous():  # summing the contiguous spatial run first is faster
        return t.flatten(2).sum(2).sum(0)
    return t.sum(_reduce_dims(t))


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per channel, sum(a * b) over every dimension but 1: (N, C, ...) x2 -> (C,).

    A large input is worked through in chunks of samples, so the product only ever
    exists one cache-sized chunk at a time: on CPU a fresh allocation as large as the
    input costs a page fault per 4 KiB, more than the arithmetic. A small input is done
    in one go, where Python's per-op overhead is what counts.
    """
    if a.dim() == 2:
        if torch.is_autocast_enabled(a.device.type):  # autocast would run it in bf16
            with torch.autocast(a.device.type, enabled=False):
                return torch.linalg.vecdot(a, b, dim=0)
        return torch.linalg.vecdot(a, b, dim=0)  # (N, C) x2 -> (C,), one op
    if _small(a):
        return _channel_sum(a * b)
    rows = max(1, _CHUNK_BYTES // (a[0].numel() * a.element_size()))
    acc = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    for a_i, b_i in zip(a.split(rows), b.split(rows), strict=True):
        acc += _channel_sum(a_i * b_i)  # (n, C, ...) chunk -> (C,)
    return acc


@functools.lru_cache(maxsize=256)
def _tile(length: int) -> int | None:
    """The largest divisor of ``length`` in 16..128 (None if there is none)."""
    return next((k for k in range(128, 15, -1) if length % k == 0), None)


@functools.lru_cache(maxsize=16)
def _ones(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU tensor of ones, made once per shape and dtype (outside inference mode, so
    that any later computation may use it); ``_affine`` multiplies a (C, 1, ...)
    vector by it to lay the vector out as a tile (times one: the same bits). At most
    16 tiles of at most ``_PLANE_BYTES`` are kept."""
    with torch.inference_mode(False):
        return torch.ones(shape, dtype=dtype)


def _tile_shape(x: Tensor) -> tuple[tuple[int, ...], int | None] | None:
    """``(tile, k)``: the shape of the tile in which ``_affine`` lays out its
    per-channel vectors for x, and its row length k (None for a whole plane); or None
    where it broadcasts them instead.

    PyTorch's CPU kernels vectorize a three-operand op (addcmul) only when at most one
    operand is broadcast along the innermost dimension. For (N, C, *spatial) input a
    per-channel vector is broadcast along it, and the op runs element by element, about
    1.5 ns a value on one core. So one of the two vectors, the scale, is laid out as a
    contiguous tile, and the shift alone is broadcast:

    - the whole (C, *spatial) plane where it is at most ``_PLANE_BYTES``: the op then
      runs along each sample's whole channel plane, vectorized. Measured on one core,
      (8, 128, 8, 8): 42 us against 87 us for (C, 1, 64) rows and 95 us broadcast;
    - else (C, 1, k) rows, with k the largest divisor of H*W in 16..128 (x is viewed
      as (N, C, L / k, k)), so that the tile stays small next to a large input;
    - None (broadcast) where no k fits, on GPU (where broadcasting costs nothing), for
      tensor subclasses (fake tensors of a trace), for (N, C) and channels_last input
      (C is innermost: the vectors are contiguous there already), and for inputs under
      ``_TILE_MIN`` values, where the tile's own op costs more than it saves.

    The result is the same bits either way: the tile is the vector times one.
    """
    if x.dim() == 2 or not x.is_cpu or type(x) is not torch.Tensor \
            or not x.is_contiguous():
        return None  # (fake tensors, traced with symbolic shapes: broadcast)
    return _tile_for(x.shape, x.element_size())


@functools.lru_cache(maxsize=256)
def _tile_for(shape: torch.Size, itemsize: int
              ) -> tuple[tuple[int, ...], int | None] | None:
    """_tile_shape for contiguous CPU input of this shape and element size."""
    if math.prod(shape) < _TILE_MIN:
        return None
    plane = tuple(shape[1:])
    if math.prod(plane) * itemsize <= _PLANE_BYTES:
        return plane, None
    k = _tile(math.prod(shape[2:]))
    return None if k is None else ((shape[1], 1, k), k)


def _affine(t: Tensor, scale: Tensor, shift: Tensor, inplace: bool = False) -> Tensor:
    """Per channel, t * scale + shift in one pass: (N, C, *spatial), (C,), (C,).
    With ``inplace`` the result is written into t (t must be a fresh tensor).

    The result is never a view: it is an operator's output, which the caller may
    modify in place (BN -> ReLU(inplace=True)), and autograd forbids that on a view
    created inside a custom Function."""
    layout, out = _tile_shape(t), t if inplace else None
    if layout is None:
        return torch.addcmul(_bcast(shift, t), t, _bcast(scale, t), out=out)
    tile, k = layout
    scale_tile = torch.mul(_bcast(scale, t) if k is None else scale.view(-1, 1, 1),
                           _ones(tile, t.dtype))
    if k is None:  # the whole (C, *spatial) plane; the shift broadcast
        return torch.addcmul(_bcast(shift, t), t, scale_tile, out=out)
    # (C, 1, k) rows, against t viewed as (N, C, L / k, k)
    n, c = t.shape[0], t.shape[1]
    out = torch.empty_like(t) if out is None else out  # contiguous, like t
    torch.addcmul(shift.view(-1, 1, 1), t.view(n, c, -1, k), scale_tile,
                  out=out.view(n, c, -1, k))
    return out


def _forward_kernel(x, weight, bias, mean, var, training: bool, eps: float):
    """y, the batch mean and biased variance (training; two empty tensors in eval), and
    inv_std = 1 / sqrt(var + eps) for the backward pass.

    training: mu, var = batch statistics;  y = (x - mu) * (gamma * inv_std) + beta
    eval:     mu, var = running statistics; y = x * scale + (beta - mu * scale)
    """
    if not training:
        xf = _compute(x)
        y, inv_std = _eval_kernel(xf, weight, bias, mean, var, eps)
        return _to(y, x.dtype), xf.new_empty(0), xf.new_empty(0), inv_std
    xf = _compute(x)  # (N, C, ...), float32 for half inputs
    m = x.numel() // x.shape[1]  # values per channel
    mean = xf.mean(0) if x.dim() == 2 else _channel_sum(xf) / _scalar(m, xf)
    y = xf - _bcast(mean, xf)  # x - mu, in the output's buffer
    var = _channel_dot(y, y) / _scalar(m, xf)  # mean((x - mu)^2): biased, two-pass
    inv_std = torch.rsqrt(var + _scalar(eps, var))  # (C,)
    scale = inv_std if weight is None else _to(weight, xf.dtype) * inv_std  # (C,)
    # y = (x - mu) * scale + beta, in place: exact for large mu
    if bias is None:
        y = y.mul_(_bcast(scale, xf))
    else:
        y = _affine(y, scale, _to(bias, xf.dtype), inplace=True)
    return _to(y, x.dtype), mean, var, inv_std


def _eval_kernel(xf, weight, bias, mean, var, eps: float, need_inv_std: bool = True):
    """Eval mode's y (in xf's dtype) and inv_std, from the running statistics, in one
    pass over x like torch's eval kernel: y = x * scale + (beta - mu * scale).
    Without ``need_inv_std`` (no backward pass to save it for) the returned inv_std
    is not meaningful: its buffer is reused for the scale."""
    mean, var = _to(mean, xf.dtype), _to(var, xf.dtype)
    inv_std = (var + _scalar(eps, var)).rsqrt_()  # (C,)
    if weight is None:
        scale = inv_std
    elif need_inv_std:
        scale = _to(weight, xf.dtype) * inv_std  # (C,)
    else:  # gamma * inv_std, in inv_std's buffer: one tensor fewer
        scale = inv_std.mul_(_to(weight, xf.dtype))
    shift = -mean * scale if bias is None else \
        torch.addcmul(_to(bias, xf.dtype), mean, scale, value=-1)
    return _affine(xf, scale, shift), inv_std


def _backward_kernel(dy, x, weight, mean, inv_std, training: bool,
                     need_dx: bool, need_dweight: bool, need_dbias: bool):
    """dx, dgamma, dbeta of batch norm, the closed form (empty where not needed)::

        dbeta  = sum(dy),  dgamma = sum(dy * x_hat)
        dx     = gamma * inv_std * (dy - dbeta / M - x_hat * dgamma / M)  (training)
        dx     = gamma * inv_std * dy                                     (eval)
    """
    xf = _compute(x)
    dy = _to(dy, xf.dtype)
    m = x.numel() // x.shape[1]  # M, values per channel
    mean, inv_std = _to(mean, xf.dtype), _to(inv_std, xf.dtype)  # (C,)
    k_dy = inv_std if weight is None else _to(weight, xf.dtype) * inv_std  # (C,)
    w_dtype = xf.dtype if weight is None else weight.dtype

    def empty():  # a fresh one each time: an operator's outputs may not alias
        return xf.new_empty(0, dtype=w_dtype)

    need_stats = need_dweight or need_dbias or (need_dx and training)
    dbeta = _channel_sum(dy) if need_stats else empty()  # sum(dy)
    xc = xf - _bcast(mean, xf) if need_stats else None  # x - mu
    dgamma = _channel_dot(xc, dy) * inv_std if need_stats else empty()  # sum(dy*x_hat)
    if not need_dx:
        dx = empty()
    elif training:
        # dx = k_dy * dy + k_xc * (x - mu) + k_0, with x_hat = (x - mu) * inv_std:
        k = k_dy / _scalar(-m, k_dy)  # (C,)
        k_xc, k_0 = k * inv_std * dgamma, k * dbeta  # (C,)
        dx = _affine(xc, k_xc, k_0, inplace=True).addcmul_(dy, _bcast(k_dy, xf))
        dx = _to(dx, x.dtype)
    else:
        dx = _to(dy * _bcast(k_dy, xf), x.dtype)
    dw = _to(dgamma, w_dtype) if need_dweight else empty()
    db = _to(dbeta, w_dtype) if need_dbias else empty()
    return dx, dw, db


def _backward_differentiable(dy, x, weight, mean, inv_std, training: bool, eps: float):
    """The same closed form from differentiable tensor operations, for double backward.

    In training, mu and var are recomputed from x here, so that autograd sees how they
    depend on x: a second-order gradient through this function is then exact.
    """
    xf, dims = _compute(x), _reduce_dims(x)
    dy = _to(dy, xf.dtype)
    if training:
        var, mean = torch.var_mean(xf, dims, correction=0)
        inv_std = torch.rsqrt(var + eps)
    mean, inv_std = _bcast(_to(mean, xf.dtype), xf), _to(inv_std, xf.dtype)
    x_hat = (xf - mean) * _bcast(inv_std, xf)
    k_dy = inv_std if weight is None else _to(weight, xf.dtype) * inv_std  # (C,)
    dbeta, dgamma = dy.sum(dims), (dy * x_hat).sum(dims)
    if training:
        m = x.numel() // x.shape[1]
        dx = _bcast(k_dy, xf) * (dy - _bcast(dbeta / m, xf) - x_hat * _bcast(dgamma / m,
                                                                             xf))
    else:
        dx = _bcast(k_dy, xf) * dy
    w_dtype = xf.dtype if weight is None else weight.dtype
    return _to(dx, x.dtype), _to(dgamma, w_dtype), _to(dbeta, w_dtype)
