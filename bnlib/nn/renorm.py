"""Batch Renormalization (Ioffe, 2017, "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models"): batch norm corrected toward the
running statistics, as torch-style modules ``BatchRenorm1d`` and ``BatchRenorm2d``.

Batch norm trains with the batch's statistics and infers with the running ones; when
the two differ (small or non-i.i.d. batches) the network sees different activations in
training and in inference. Batch Renorm keeps the batch's normalization but corrects
it, per channel, toward what the running statistics would give:

    s_B = sqrt(var_B + eps),   s = sqrt(running_var + eps)
    r   = clip(s_B / s, 1 / r_max, r_max)
    d   = clip((mu_B - running_mean) / s, -d_max, d_max)
    y   = gamma * (x_hat * r + d) + beta,    x_hat = (x - mu_B) / s_B

with mu_B and the biased var_B of the batch, and r and d computed from the running
statistics *before* this batch updates them. Unclipped, x_hat * r + d equals
(x - running_mean) / s, the inference-time normalization. r and d are constants for the
gradient (stop-gradient), so the backward pass is batch norm's with gamma * r in place
of gamma:

    dx     = gamma * r / s_B * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    dgamma = sum(dy * (x_hat * r + d)),   dbeta = sum(dy)

The running statistics are then updated exactly as in batch norm (unbiased variance,
``running = (1 - momentum) * running + momentum * stat``), and eval mode is batch
norm's. With ``r_max = 1`` and ``d_max = 0``, r = 1 and d = 0: batch norm exactly. The
paper starts there and relaxes ``r_max`` and ``d_max`` over training (plain BN for 5k
steps, then r_max up to 3 by 40k steps and d_max up to 5 by 25k): ``warmup=(5000,
40000, 25000)`` runs that schedule from ``num_batches_tracked`` (see
``limits()``); without it ``r_max`` and ``d_max`` are plain attributes
that a schedule of your own may change between calls.

One difference from the paper, deliberate: the running statistics are batch norm's,
an average of the batch mean and of the *unbiased* batch variance sigma^2 (so that a
state dict is torch's BatchNorm's and eval mode is batch norm's exactly); the paper's
Algorithm 1 averages the batch standard deviation sigma_B (biased, with eps inside)
instead. The two running scales differ by the bias of sqrt (Jensen) and by M / (M - 1),
a few percent for small batches.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ._kernels import _bcast, _compute, _reduce_dims, _to
from ._op import _transformed
from .batchnorm import _BatchNorm
from .functional import _batch_norm, _check_args, _empty_output

__all__ = ["BatchRenormFunction", "BatchRenorm1d", "BatchRenorm2d"]


class BatchRenormFunction(torch.autograd.Function):
    """Batch Renorm's normalization with given r and d, and its hand-written backward.

    ``apply(x, gamma, beta, r, d, eps) -> (y, mu_B, var_B)``

    - x: (N, C, *spatial), the batch; the statistics are over all dims but 1.
    - gamma, beta: (C,) or None (no affine transform).
    - r, d: (C,), the correction: constants, they get no gradient (stop-gradient).
    - y: like x, ``gamma * (x_hat * r + d) + beta`` with ``x_hat = (x - mu_B) / s_B``.
    - mu_B, var_B: (C,), the batch mean and biased variance (no gradient), for the
      running statistics.

    Half and bfloat16 inputs are computed in float32 and returned in their own dtype.
    """

    generate_vmap_rule = True  # torch.func.vmap derives the batching rule

    @staticmethod
    def forward(x, gamma, beta, r, d, eps):
        xf, dims = _compute(x), _reduce_dims(x)
        var_B, mu_B = torch.var_mean(xf, dims, correction=0)  # (N, C, ...) -> (C,)
        x_hat = (xf - _bcast(mu_B, xf)) * _bcast(torch.rsqrt(var_B + eps), xf)
        y = x_hat * _bcast(_to(r, xf.dtype), xf) + _bcast(_to(d, xf.dtype), xf)
        if gamma is not None:
            y = y * _bcast(_to(gamma, xf.dtype), xf)
        if beta is not None:
            y = y + _bcast(_to(beta, xf.dtype), xf)
        return _to(y, x.dtype), mu_B, var_B

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gamma, beta, r, d, eps = inputs
        _y, mu_B, var_B = output
        inv_s_B = torch.rsqrt(var_B + eps)  # 1 / s_B, (C,)
        ctx.save_for_backward(x, gamma, r, d, mu_B, inv_s_B)
        ctx.eps, ctx.beta_dtype = eps, None if beta is None else beta.dtype
        ctx.mark_non_differentiable(mu_B, var_B)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, _dmu_B, _dvar_B):
        """dx = gamma * r / s_B * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
        dgamma = sum(dy * (x_hat * r + d)), dbeta = sum(dy); r and d get none."""
        if dy is None:  # y was not used
            return None, None, None, None, None, None
        x, gamma, r, d, mu_B, inv_s_B = ctx.saved_tensors
        xf, dims = _compute(x), _reduce_dims(x)
        dy = _to(dy, xf.dtype)
        if torch.is_grad_enabled() or _transformed(dy):
            # This backward will itself be differentiated (create_graph=True, or a
            # torch.func transform): recompute mu_B and s_B from x, so that autograd
            # sees how they depend on x. r and d stay constants.
            var_B, mu_B = torch.var_mean(xf, dims, correction=0)  # (C,)
            inv_s_B = torch.rsqrt(var_B + ctx.eps)
        m = x.numel() // x.shape[1]  # M, values per channel
        r, d = _to(r, xf.dtype), _to(d, xf.dtype)
        x_hat = (xf - _bcast(mu_B, xf)) * _bcast(inv_s_B, xf)  # (N, C, ...)
        sum_dy = dy.sum(dims)  # (N, C, ...) -> (C,)
        sum_dy_x_hat = (dy * x_hat).sum(dims)  # (N, C, ...) -> (C,)

        need_dx, need_dgamma, need_dbeta = ctx.needs_input_grad[:3]
        dx = dgamma = dbeta = None
        if need_dx:
            k = r * inv_s_B if gamma is None else _to(gamma, xf.dtype) * r * inv_s_B
            dx = _bcast(k, xf) * (dy - _bcast(sum_dy / m, xf)
                                  - x_hat * _bcast(sum_dy_x_hat / m, xf))
            dx = _to(dx, x.dtype)
        if need_dgamma:  # sum(dy * (x_hat * r + d))
            dgamma = _to(sum_dy_x_hat * r + sum_dy * d, gamma.dtype)
        if need_dbeta:
            dbeta = _to(sum_dy, ctx.beta_dtype)
        return dx, dgamma, dbeta, None, None, None


def _check_warmup(warmup) -> None:
    """None, (start, end) or (start, r_end, d_end): integers, 0 <= start <= ends."""
    if warmup is None:
        return
    ok = isinstance(warmup, tuple) and len(warmup) in (2, 3) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in warmup)
    if not ok or warmup[0] < 0 or any(end < warmup[0] for end in warmup[1:]):
        raise ValueError(
            "warmup must be None, (start, end) or (start, r_end, d_end): steps "
            "(num_batches_tracked) with 0 <= start <= end; plain batch norm before "
            f"start, r_max and d_max reached at their end; got {warmup!r}")


def _ramp(step: int, start: int, end: int, limit: float, plain: float) -> float:
    """plain before start, limit from end on, linear in between."""
    if step <= start:
        return plain
    if step >= end:
        return limit
    return plain + (limit - plain) * (step - start) / (end - start)


def _check_limits(r_max, d_max) -> None:
    """r_max >= 1 and d_max >= 0 (real numbers), else a ValueError naming the bound."""
    if isinstance(r_max, bool) or not isinstance(r_max, numbers.Real) \
            or not r_max >= 1:
        raise ValueError(f"r_max must be a number >= 1 (r = s_B / s is clipped to "
                         f"[1 / r_max, r_max]; 1 gives r = 1), got {r_max!r}")
    if isinstance(d_max, bool) or not isinstance(d_max, numbers.Real) \
            or not d_max >= 0:
        raise ValueError(f"d_max must be a number >= 0 (d = (mu_B - running_mean) / s "
                         f"is clipped to [-d_max, d_max]; 0 gives d = 0), got "
                         f"{d_max!r}")


class _BatchRenorm(_TorchBatchNorm):
    """What BatchRenorm1d/2d share: torch's batch-norm parameters and buffers (the same
    ``state_dict``), running statistics always tracked, and Batch Renorm's forward."""

    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None =
                 0.01, r_max: float = 3.0, d_max: float = 5.0, affine: bool = True,
                 device=None, dtype=None, *,
                 warmup: tuple[int, ...] | None = None) -> None:
        _check_limits(r_max, d_max)
        _check_warmup(warmup)
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats=True, device=device, dtype=dtype)
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at ``step`` (default: this call's,
        ``num_batches_tracked + 1``). Without ``warmup``, the attributes. With
        ``warmup=(start, end)`` (or ``(start, r_end, d_end)``): 1 and 0 (plain batch
        norm) up to step ``start``, then linear to ``r_max`` at ``r_end`` and to
        ``d_max`` at ``d_end``, held after."""
        warmup = getattr(self, "warmup", None)
        if warmup is None:
            return self.r_max, self.d_max
        if step is None:
            step = int(self.num_batches_tracked) + 1
        start, r_end, d_end = warmup if len(warmup) == 3 else (*warmup, warmup[1])
        return (_ramp(step, start, r_end, self.r_max, 1.0),
                _ramp(step, start, d_end, self.d_max, 0.0))

    @torch.no_grad()
    def corrections(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, d)`` for the batch x against the running statistics as they are now,
        before clipping: r = sigma_B / sigma, d = (mu_B - mu) / sigma, (C,) each, with
        sigma_B = sqrt(var_B + eps) (biased batch variance) and sigma = sqrt(running_var
        + eps). A training forward uses them clipped to ``limits()``; compare them with
        those limits to see how often the clip acts. Changes no state."""
        xf = _compute(x).detach()
        var_B, mu_B = torch.var_mean(xf, _reduce_dims(x), correction=0)  # (C,)
        s = torch.sqrt(_to(self.running_var, xf.dtype) + self.eps)
        return (torch.sqrt(var_B + self.eps) / s,
                (mu_B - _to(self.running_mean, xf.dtype)) / s)

    def extra_repr(self) -> str:
        warmup = getattr(self, "warmup", None)
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"r_max={self.r_max}, d_max={self.d_max}, affine={self.affine}"
                + ("" if warmup is None else f", warmup={warmup}"))

    def _check_input_dim(self, x: Tensor) -> None:
        _BatchNorm._check_input_dim(self, x)  # bnlib.nn's check and message

    def forward(self, x: Tensor) -> Tensor:
        """y = gamma * (x_hat * r + d) + beta in training, batch norm with the running
        statistics in eval; x (N, C, *spatial) -> y of the same shape."""
        self._check_input_dim(x)
        _check_limits(self.r_max, self.d_max)
        _check_warmup(getattr(self, "warmup", None))
        r_max, d_max = self.limits()
        running_mean, running_var = self.running_mean, self.running_var
        nonempty = _check_args(x, running_mean, running_var, self.weight, self.bias,
                               self.training, self.eps, self.num_features)
        if not self.training:  # eval: batch norm with the running statistics
            if not nonempty:
                return _empty_output(x, self.weight, self.bias)
            return _batch_norm(x, running_mean, running_var, self.weight, self.bias,
                               False, 0.0, self.eps)

        # Only now, with every check passed, change the module's state.
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative average over the batches seen, as BatchNorm
            momentum = 1.0 / self.num_batches_tracked.double()
        if not nonempty:
            return _empty_output(x, self.weight, self.bias)

        r, d = self.corrections(x)  # from the running statistics before this batch
        r, d = r.clamp(1 / r_max, r_max), d.clamp(-d_max, d_max)  # (C,)
        y, mu_B, var_B = BatchRenormFunction.apply(x, self.weight, self.bias, r, d,
                                                   self.eps)
        m = x.numel() // x.shape[1]  # values per channel
        with torch.no_grad():  # running = (1 - momentum) * running + momentum * stat
            running_mean.lerp_(_to(mu_B, running_mean.dtype), momentum)
            unbiased_var = var_B * (m / (m - 1))
            running_var.lerp_(_to(unbiased_var, running_var.dtype), momentum)
        return y


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm over (N, C) or (N, C, L) input.

    ``BatchRenorm1d(num_features, eps=1e-5, momentum=0.01, r_max=3.0, d_max=5.0,
    affine=True, device=None, dtype=None, *, warmup=None)``: parameters weight, bias
    (C,) and buffers running_mean, running_var (C,), num_batches_tracked, as
    ``nn.BatchNorm1d``. ``r_max`` (>= 1) and ``d_max`` (>= 0) may be changed between
    calls; ``warmup`` runs the paper's schedule (see ``limits()``).
    """

    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm over (N, C, H, W) input.

    ``BatchRenorm2d(num_features, eps=1e-5, momentum=0.01, r_max=3.0, d_max=5.0,
    affine=True, device=None, dtype=None, *, warmup=None)``: parameters weight, bias
    (C,) and buffers running_mean, running_var (C,), num_batches_tracked, as
    ``nn.BatchNorm2d``. ``r_max`` (>= 1) and ``d_max`` (>= 0) may be changed between
    calls; ``warmup`` runs the paper's schedule (see ``limits()``).
    """

    _expected_dims = (4,)
