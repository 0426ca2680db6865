"""The functional API, ``batch_norm`` (the signature of
``torch.nn.functional.batch_norm``), and the checks every batch-norm module runs before
it changes any state: in torch's order, with torch's exception types.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor

from ._kernels import _REDUCED, _compute, _eval_kernel, _forward_kernel, _scalar, _to
from ._op import (
    BatchNormFunction,
    _batch_norm_op,
    _batched,
    _EagerBatchNormFunction,
    _TracedBatchNormFunction,
    _transformed,
)

__all__ = ["batch_norm"]



def _check_args(x, running_mean, running_var, weight, bias, training, eps,
                num_features: int | None = None) -> bool:
    """Every check of batch_norm, in torch's order and with torch's exception types,
    run before any state is written. Returns False for an empty input (which torch
    returns early, unchecked), True otherwise. A module passes its ``num_features``,
    for a message in its terms."""
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...), got {x.dim()}D input")
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}: batch statistics need at least two values per channel"
        )
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, got {eps}")
    if x.numel() == 0:
        return False
    if _fwAD._current_level >= 0 and _has_tangent(x) and (
            _has_tangent(running_mean) or _has_tangent(running_var)):
        raise RuntimeError(
            "batch_norm is not differentiable wrt running_mean and running_var: they "
            "are statistics, not inputs, and cannot carry a forward-mode tangent "
            "(make the dual of x only, or detach the running statistics)"
        )
    if training and _transformed() and running_mean is not None and (
            _batched(x) and not (_batched(running_mean) and _batched(running_var))):
        raise RuntimeError(
            "vmap: batch norm got a batched input while running_mean and running_var, "
            "which training updates in place, are not batched. Batch them too "
            "(torch.func.stack_module_state), or stop tracking running statistics "
            "(torch.func.replace_all_batch_norm_modules_), or use eval mode."
        )
    _check_tensors(x, running_mean, running_var, weight, bias, training, num_features)
    return True


def _has_tangent(t: Tensor | None) -> bool:
    """True for a tensor that carries a forward-mode AD tangent (a dual tensor)."""
    return t is not None and _fwAD.unpack_dual(t).tangent is not None


def _check_tensors(x, running_mean, running_var, weight, bias, training,
                   num_features: int | None = None) -> None:
    """The checks torch's kernel makes, in its order: the channel count, the (C,)
    shapes, running statistics in eval, a floating-point input, one dtype."""
    c = x.shape[1]
    mean, var = running_mean, running_var
    if (mean is not None and var is not None and weight is not None and bias is not None
            and x.dtype == mean.dtype == var.dtype == weight.dtype == bias.dtype
            and mean.shape == var.shape == weight.shape == bias.shape == (c,)
            and (num_features is None or c == num_features) and x.is_floating_point()):
        return  # the usual case, which passes every check below: decided at once
    if num_features is not None and c != num_features and any(
            v is not None for v in (running_mean, running_var, weight, bias)):
        raise RuntimeError(
            f"expected input with {num_features} channels, shape (N, {num_features}, "
            f"...), got {c} channels in an input of shape {tuple(x.shape)}"
        )
    named = [("running_mean", running_mean), ("running_var", running_var),
             ("weight", weight), ("bias", bias)]
    for name, v in named:
        if v is not None and tuple(v.shape) != (c,):
            raise RuntimeError(
                f"{name} should contain {c} elements, one per channel of the input of "
                f"shape {tuple(x.shape)}, not {v.numel()} (shape {tuple(v.shape)})"
            )
    if not training:
        for name, v in named[:2]:
            if v is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode (or "
                                   "pass training=True)")
    if not x.is_floating_point():
        raise NotImplementedError(
            f"batch norm needs a floating-point input, got {x.dtype}; convert it with "
            "x.float()"
        )
    # Parameters and buffers share one dtype: x's, or float32 for half/bfloat16 x.
    present = [(name, v) for name, v in named if v is not None]
    ok = {x.dtype, torch.float32} if x.dtype in _REDUCED else {x.dtype}
    if present and not (present[0][1].dtype in ok
                        and all(v.dtype == present[0][1].dtype for _, v in present)):
        kinds = ", ".join(f"{name} {v.dtype}" for name, v in present)
        raise RuntimeError(
            f"mixed dtype: the input is {x.dtype} but the parameters and buffers are "
            f"{kinds}; convert one of them (e.g. module.to({x.dtype}))"
        )


def _empty_output(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """What torch returns for an empty batch: an empty output, statistics untouched."""
    y = x.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    return y


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

    ``x`` is (N, C, ...); ``running_mean``, ``running_var``, ``weight`` and ``bias`` are
    (C,) or None. In training the running statistics, if given, are updated in place:
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the unbiased
    batch variance. Every check runs before any state is written.
    """
    if not _check_args(x, running_mean, running_var, weight, bias, training, eps):
        return _empty_output(x, weight, bias)
    return _batch_norm(x, running_mean, running_var, weight, bias, training,
                       momentum, eps)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """batch_norm without the checks: the caller has run _check_args."""
    if training:
        running_mean_in = running_var_in = None
    else:
        running_mean_in, running_var_in = running_mean, running_var
    args = (x, weight, bias, running_mean_in, running_var_in, training, eps)
    eager = False
    if torch.compiler.is_exporting():  # one operator node, which keeps its backward
        y, mean, var = _batch_norm_op(*args)
    elif torch.compiler.is_compiling():  # tensor ops for Inductor to fuse
        y, mean, var, _ = _TracedBatchNormFunction.apply(*args)
    elif _transformed():  # torch.func: the operator's vmap rule, setup_context
        y, mean, var = BatchNormFunction.apply(*args)
    elif _fwAD._current_level >= 0 or (torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad))):
        y, mean, var = _EagerBatchNormFunction.apply(*args)
        eager = True
    elif training:  # nothing to differentiate: the kernel alone
        y, mean, var, _ = _forward_kernel(*args)
        eager = True
    else:  # the same, in eval: no statistics to return
        y = _to(_eval_kernel(_compute(x), weight, bias, running_mean, running_var,
                             eps, need_inv_std=False)[0], x.dtype)
    if training and running_mean is not None and running_var is not None:
        m = x.numel() // x.shape[1]
        if eager and isinstance(momentum, float) and running_mean.dtype == mean.dtype \
                and running_var.dtype == mean.dtype and not (
                    running_mean.requires_grad or running_var.requires_grad):
            # Nothing here can be recorded by autograd (the statistics are not
            # differentiable, the buffers do not require grad), so no torch.no_grad(),
            # whose enter and exit cost as much as one of these ops.
            unbiased_var = var * _scalar(m / (m - 1), var)  # the unbiased variance
            # running + momentum * (stat - running), both in one call
            torch._foreach_lerp_([running_mean, running_var], [mean, unbiased_var],
                                 momentum)
        else:
            with torch.no_grad():  # the same, where autograd could record it
                unbiased_var = var * _scalar(m / (m - 1), var)
                pairs = ((running_mean, mean), (running_var, unbiased_var))
                if _transformed():  # vmap has batching rules for these, not lerp_
                    for running, stat in pairs:
                        running.mul_(1 - momentum).add_(stat * momentum)
                else:
                    for running, stat in pairs:
                        running.lerp_(_to(stat, running.dtype), momentum)
    return y
