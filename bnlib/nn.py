"""Batch-norm modules for PyTorch with a hand-written backward: drop-in for
``torch.nn``'s.

``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d`` subclass ``torch.nn``'s, so they
take the same constructor arguments, hold the same parameters and buffers (their
``state_dict`` loads into torch's and back), and pass ``isinstance`` checks. Only the
computation is replaced: the math is ours, in plain tensor operations, and the backward
pass is the closed form of the book's backward chapter, in :class:`BatchNormFunction`:

    forward:   y  = gamma * (x - mu) * inv_std + beta,   inv_std = 1 / sqrt(var + eps)
    backward:  dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))
               dgamma = sum(dy * x_hat),   dbeta = sum(dy)

(in eval mode mu and var are the running statistics, constants, and
dx = gamma * inv_std * dy). Outputs, gradients and running statistics equal torch's.

One deliberate difference from torch: a call that raises changes no state. torch bumps
``num_batches_tracked`` before its kernel checks the channel count; here every check
runs before anything is written.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BatchNormFunction", "batch_norm",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_REDUCED = (torch.float16, torch.bfloat16)  # computed in float32, like torch


_CHUNK_BYTES = 1 << 19  # a chunk of this size, and its temporaries, stay in L2 cache


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1:
    (N, C, *spatial) -> [0, 2, 3, ...]."""
    return [0] + list(range(2, x.dim()))


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """View a (C,) vector as (C, 1, ..., 1), to broadcast against x of shape
    (N, C, ...)."""
    return v if x.dim() == 2 else v.view([-1] + [1] * (x.dim() - 2))


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; t itself when it already is (skips a no-op call's overhead)."""
    return t if t.dtype == dtype else t.to(dtype)


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
    per_sample = a[0].numel() * a.element_size() if a.shape[0] else 0
    if a.shape[0] * per_sample <= _CHUNK_BYTES:
        return _channel_sum(a * b)
    rows = max(1, _CHUNK_BYTES // per_sample)
    acc = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
    for a_i, b_i in zip(a.split(rows), b.split(rows), strict=True):
        acc += _channel_sum(a_i * b_i)  # (n, C, ...) chunk -> (C,)
    return acc


def _rows(v: Tensor, x: Tensor) -> Tensor | None:
    """v (C,) tiled to short contiguous rows that broadcast against a contiguous x.

    PyTorch's CPU kernels vectorize a three-operand op (addcmul) only when at most one
    operand is broadcast along the innermost dimension. For (N, C, *spatial) input a
    per-channel vector is broadcast along it, and the op runs element by element.
    Viewing x as (N, C, L / k, k) and v as (C, 1, k) rows keeps every operand contiguous
    along the innermost k, and the op runs at memory speed. Returns None where no k
    fits.
    """
    if x.dim() == 2 or not x.is_contiguous():
        return None  # (N, C) and channels_last: C is innermost, v is contiguous there
    length = x[0, 0].numel()
    k = next((k for k in range(128, 15, -1) if length % k == 0), None)
    if k is None:
        return None
    return v.view(-1, 1, 1).expand(-1, 1, k).contiguous()  # (C, 1, k)


def _affine(t: Tensor, scale: Tensor, shift: Tensor,
            out: Tensor | None = None) -> Tensor:
    """Per channel, t * scale + shift in one pass: (N, C, *spatial), (C,), (C,)."""
    scale_rows, shift_rows = _rows(scale, t), _rows(shift, t)
    if scale_rows is None:
        if out is None:
            return torch.addcmul(_bcast(shift, t), t, _bcast(scale, t))
        return torch.addcmul(_bcast(shift, t), t, _bcast(scale, t), out=out)
    n, c, k = t.shape[0], t.shape[1], scale_rows.shape[-1]
    t4 = t.view(n, c, -1, k)  # (N, C, L / k, k)
    if out is None:
        return torch.addcmul(shift_rows, t4, scale_rows).view(t.shape)
    torch.addcmul(shift_rows, t4, scale_rows, out=out.view(n, c, -1, k))
    return out


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with its backward pass written out by hand.

    ``apply(x, weight, bias, mean, var, training, eps) -> (y, batch_mean, batch_var)``.
    In training ``mean`` and ``var`` are ignored (pass None) and the batch statistics
    are used and returned; in eval the given (running) statistics are used and returned.
    ``weight`` and ``bias`` may be None (no affine transform). Half and bfloat16 inputs
    are computed in float32 and returned in their own dtype, as torch does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, training: bool, eps: float):
        xf = x.float() if x.dtype in _REDUCED else x  # compute dtype
        m = x.numel() // x.shape[1]  # values per channel
        if training:
            mean = _channel_sum(xf) / m  # (N, C, ...) -> (C,)
            y = xf - _bcast(mean, xf)  # x - mu, in the output's buffer
            var = _channel_dot(y, y) / m  # mean((x - mu)^2): biased, two-pass
        else:
            mean, var = _to(mean, xf.dtype), _to(var, xf.dtype)
        inv_std = torch.rsqrt(var + eps)  # (C,)
        scale = inv_std if weight is None else _to(weight, xf.dtype) * inv_std  # (C,)
        if training:  # y = (x - mu) * scale + beta, in place: exact for large mu
            if bias is None:
                y = y.mul_(_bcast(scale, xf))
            else:
                y = _affine(y, scale, _to(bias, xf.dtype), out=y)
        else:  # y = x * scale + (beta - mu * scale): one pass, like torch's eval kernel
            beta = torch.zeros_like(mean) if bias is None else _to(bias, xf.dtype)
            shift = beta - mean * scale
            y = _affine(xf, scale, shift)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.training = training
        ctx.mark_non_differentiable(mean, var)
        return _to(y, x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, inv_std = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        xf = x.float() if x.dtype in _REDUCED else x
        dy = _to(dy, xf.dtype)
        m = x.numel() // x.shape[1]
        k_dy = inv_std if weight is None else _to(weight, xf.dtype) * inv_std  # (C,)

        dbeta = _channel_sum(dy)  # sum(dy)
        xc = xf - _bcast(mean, xf)  # x - mu, in the buffer that becomes dx
        dgamma = _channel_dot(xc, dy) * inv_std  # sum(dy * x_hat)
        dx = None
        if need_dx and ctx.training:
            # dx = k_dy * (dy - dbeta / M - x_hat * dgamma / M), x_hat = xc * inv_std,
            # with k_dy = gamma * inv_std: dx = k_xc * xc + k_0 + k_dy * dy
            k_xc = k_dy * inv_std * dgamma / -m
            k_0 = k_dy * dbeta / -m
            dx = _affine(xc, k_xc, k_0, out=xc)
            dx = _to(dx.addcmul_(dy, _bcast(k_dy, xf)), x.dtype)
        elif need_dx:  # eval: mu and var are constants, dx = gamma * inv_std * dy
            dx = _to(dy * _bcast(k_dy, xf), x.dtype)
        dw = _to(dgamma, weight.dtype) if need_dw else None
        db_dtype = weight.dtype if weight is not None else dy.dtype
        db = _to(dbeta, db_dtype) if need_db else None
        return dx, dw, db, None, None, None, None


def _check_dtypes(x: Tensor, ref: Tensor | None) -> None:
    if not x.is_floating_point():
        raise RuntimeError(
            f"batch norm needs a floating-point input, got {x.dtype}; convert it with "
            "x.float()"
        )
    if ref is None or ref.dtype == x.dtype:
        return
    if x.dtype in _REDUCED and ref.dtype == torch.float32:
        return  # mixed precision: half/bfloat16 input, float32 parameters
    raise RuntimeError(
        f"mixed dtype: the input is {x.dtype} but the parameters and buffers are "
        f"{ref.dtype}; convert one of them (e.g. module.to({x.dtype}))"
    )


def _check_args(x, running_mean, running_var, weight, bias, training, eps) -> None:
    """Every check of batch_norm, run before any state is written; raises like torch."""
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...), got {x.dim()}D input")
    c = x.shape[1]
    for name, v in [("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)]:
        if v is not None and tuple(v.shape) != (c,):
            raise RuntimeError(
                f"{name} should contain {c} elements, one per channel of the input of "
                f"shape {tuple(x.shape)}, not {v.numel()} (shape {tuple(v.shape)})"
            )
    _check_dtypes(x, weight if weight is not None else running_mean)
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "eval mode needs running_mean and running_var (or training=True)"
        )
    if training:
        if c and x.numel() // c == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)}"
            )
        if not eps > 0:
            raise ValueError(
                f"batch_norm eps must be positive during training, got {eps}"
            )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Functional batch norm with the signature of ``torch.nn.functional.batch_norm``.

    In training the running statistics, if given, are updated in place:
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the unbiased
    batch variance. Every check runs before any state is written.
    """
    _check_args(x, running_mean, running_var, weight, bias, training, eps)
    return _batch_norm(x, running_mean, running_var, weight, bias, training,
                       momentum, eps)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """batch_norm without the checks: the caller has run _check_args."""
    if x.numel() == 0:  # an empty batch: empty output, statistics untouched (as torch)
        y = x.clone()
        if weight is not None:
            y = y * weight[0]
        if bias is not None:
            y = y + bias[0]
        return y
    y, mean, var = BatchNormFunction.apply(
        x, weight, bias, None if training else running_mean,
        None if training else running_var, training, eps)
    if training and running_mean is not None and running_var is not None:
        m = x.numel() // x.shape[1]
        with torch.no_grad():  # running = (1 - momentum) * running + momentum * stat
            unbiased_var = var * (m / (m - 1))  # store the unbiased variance
            if isinstance(momentum, Tensor):  # momentum=None: 1 / num_batches_tracked
                running_mean.mul_(1 - momentum).add_(mean * momentum)
                running_var.mul_(1 - momentum).add_(unbiased_var * momentum)
            else:
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)
    return y


class _BatchNorm:
    """What BatchNorm1d/2d/3d add to their ``torch.nn`` base class: a ``forward`` that
    runs bnlib's batch norm, checking everything before it changes any state.

    Each module subclasses its ``torch.nn`` counterpart, so it has the same constructor,
    parameters, buffers, ``state_dict`` and ``reset_*`` methods, and code that checks
    ``isinstance(m, nn.BatchNorm2d)`` (weight-decay rules, ``update_bn``, fusion) treats
    it as a batch norm; only the computation is replaced.
    """

    _expected_dims: tuple[int, ...] = ()

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"expected {want} input (got {x.dim()}D input of shape "
                f"{tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        # Normalize with batch statistics in training, and in eval when none are saved.
        bn_training = self.training or (self.running_mean is None
                                        and self.running_var is None)
        # Running statistics are read in eval and written in training, if tracked.
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        if x.shape[1] != self.num_features and (self.weight is not None
                                                or running_mean is not None):
            raise RuntimeError(
                f"expected input with {self.num_features} channels, shape (N, "
                f"{self.num_features}, ...), got {x.shape[1]} channels in an input of "
                f"shape {tuple(x.shape)}"
            )
        _check_args(x, running_mean, running_var, self.weight, self.bias, bn_training,
                    self.eps)

        # Only now, with every check passed, change the module's state.
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats \
                and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average over the batches seen
                factor = 1.0 / self.num_batches_tracked.double()
        return _batch_norm(x, running_mean, running_var, self.weight, self.bias,
                           bn_training, factor, self.eps)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input; drop-in for ``nn.BatchNorm1d``."""

    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input; drop-in for ``nn.BatchNorm2d``."""

    _expected_dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W) input; drop-in for ``nn.BatchNorm3d``."""

    _expected_dims = (5,)
