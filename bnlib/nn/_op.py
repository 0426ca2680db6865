"""The operator ``bnlib::batch_norm`` and its autograd: the kernels of ``_kernels``
registered with ``torch.library`` (fake tensors for compile and export, the hand-written
backward, a vmap rule), and the ``autograd.Function`` classes that call them: eager,
under torch.func, and traced by torch.compile.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor

from ._kernels import (
    _REDUCED,
    _backward_differentiable,
    _backward_kernel,
    _bcast,
    _compute,
    _forward_kernel,
    _reduce_dims,
    _to,
)

__all__ = ["BatchNormFunction"]



@torch.library.custom_op("bnlib::batch_norm", mutates_args=())
def _batch_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                   running_mean: Tensor | None, running_var: Tensor | None,
                   training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, batch_mean, batch_var)``; in eval the last two are empty."""
    return _forward_kernel(x, weight, bias, running_mean, running_var, training,
                           eps)[:3]


@torch.library.custom_op("bnlib::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                            inv_std: Tensor, training: bool, need_dx: bool,
                            need_dweight: bool, need_dbias: bool
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``, each empty where not asked for."""
    return _backward_kernel(dy, x, weight, mean, inv_std, training,
                            need_dx, need_dweight, need_dbias)


@_batch_norm_op.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps):
    dt = torch.float32 if x.dtype in _REDUCED else x.dtype
    c = x.shape[1] if training else 0
    return torch.empty_like(x), x.new_empty(c, dtype=dt), x.new_empty(c, dtype=dt)


@_batch_norm_backward_op.register_fake
def _(dy, x, weight, mean, inv_std, training, need_dx, need_dweight, need_dbias):
    dt = (torch.float32 if x.dtype in _REDUCED else x.dtype) if weight is None \
        else weight.dtype
    return (torch.empty_like(x) if need_dx else x.new_empty(0, dtype=dt),
            x.new_empty(x.shape[1] if need_dweight else 0, dtype=dt),
            x.new_empty(x.shape[1] if need_dbias else 0, dtype=dt))


def _transformed(t: Tensor | None = None) -> bool:
    """True inside a torch.func transform (vmap, grad, jvp, ...), or for a tensor
    batched by autograd's own vmap (``is_grads_batched``): there the operator's
    registrations are needed, not its kernel's in-place arithmetic."""
    functorch = torch._C._functorch
    return torch._C._are_functorch_transforms_active() or (
        t is not None and (functorch.is_functorch_wrapped_tensor(t)
                           or functorch.is_legacy_batchedtensor(t)))


def _batched(t: Tensor) -> bool:
    """True for a tensor batched by vmap at the innermost transform level."""
    return torch._C._functorch.is_batchedtensor(t)


def _setup_context(ctx, inputs, output, inv_std=None):
    """Save x, gamma, mu and inv_std (the batch's in training, the running statistics'
    in eval) for the backward pass; returns them."""
    x, weight, _bias, running_mean, running_var, training, eps = inputs
    _y, mean, var = output
    if not training:  # eval: the running statistics are the constants used
        mean, var = running_mean, running_var
    if inv_std is None:
        inv_std = torch.rsqrt(_to(var, _compute(x).dtype) + eps)
    ctx.save_for_backward(x, weight, mean, inv_std)
    ctx.training, ctx.eps = training, eps
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' gradients
    return x, weight, mean, inv_std


def _backward(ctx, dy, _dmean, _dvar):
    """The gradient of y = batch_norm(x): the hand-written closed form. Where the
    backward itself will be differentiated (create_graph=True, forward-mode AD, a
    torch.func transform), the same formula from differentiable operations instead."""
    if dy is None:  # y was not used: no gradient flows back
        return None, None, None, None, None, None, None
    x, weight, mean, inv_std = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() or _fwAD._current_level >= 0 or _transformed(dy):
        dx, dw, db = _backward_differentiable(dy, x, weight, mean, inv_std,
                                              ctx.training, ctx.eps)
    else:  # traced by torch.compile as one operator; in eager, its kernel
        fn = _batch_norm_backward_op if torch.compiler.is_compiling() \
            else _backward_kernel
        dx, dw, db = fn(dy, x, weight, mean, inv_std, ctx.training,
                        need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None)


_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _fold(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """A vmapped (N, C, ...) tensor as (N, B * C, ...): each vmapped instance's
    channels become channels of their own (an unbatched tensor is repeated)."""
    if bdim is None:
        t = t.unsqueeze(1).expand(t.shape[0], size, *t.shape[1:])
    else:
        t = t.movedim(bdim, 1)  # (N, B, C, ...)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def _fold_vec(v: Tensor | None, bdim: int | None, size: int) -> Tensor | None:
    """A vmapped (C,) vector as (B * C,)."""
    if v is None or v.numel() == 0:
        return v
    v = v.expand(size, *v.shape) if bdim is None else v.movedim(bdim, 0)
    return v.reshape(-1)


def _unfold(t: Tensor, size: int) -> Tensor:
    """(N, B * C, ...) back to (N, B, C, ...): the vmapped dimension is 1."""
    return t.reshape(t.shape[0], size, -1, *t.shape[2:])


def _unfold_vec(v: Tensor, size: int) -> tuple[Tensor, int | None]:
    return (v, None) if v.numel() == 0 else (v.reshape(size, -1), 0)


@_batch_norm_op.register_vmap
def _(info, in_dims, x, weight, bias, running_mean, running_var, training, eps):
    b, (dx, dw, db, dm, dv, *_) = info.batch_size, in_dims
    y, mean, var = _batch_norm_op(
        _fold(x, dx, b), _fold_vec(weight, dw, b), _fold_vec(bias, db, b),
        _fold_vec(running_mean, dm, b), _fold_vec(running_var, dv, b), training, eps)
    (mean, mean_dim), (var, var_dim) = _unfold_vec(mean, b), _unfold_vec(var, b)
    # y as a fresh (B, N, C, ...) tensor, not a view of the op's output: torch.func
    # hands it on as the output of a custom Function, which an in-place op (ReLU(
    # inplace=True)) may then modify only if it is not a view.
    y = _unfold(y, b).movedim(1, 0).clone(memory_format=torch.contiguous_format)
    return (y, mean, var), (0, mean_dim, var_dim)


@_batch_norm_backward_op.register_vmap
def _(info, in_dims, dy, x, weight, mean, inv_std, training, *need):
    b, (d_dy, d_x, d_w, d_m, d_v, *_) = info.batch_size, in_dims
    dx, dw, db = _batch_norm_backward_op(
        _fold(dy, d_dy, b), _fold(x, d_x, b), _fold_vec(weight, d_w, b),
        _fold_vec(mean, d_m, b), _fold_vec(inv_std, d_v, b), training, *need)
    (dw, dw_dim), (db, db_dim) = _unfold_vec(dw, b), _unfold_vec(db, b)
    dx, dx_dim = (_unfold(dx, b), 1) if dx.numel() or need[0] else (dx, None)
    return (dx, dw, db), (dx_dim, dw_dim, db_dim)


class BatchNormFunction(torch.autograd.Function):
    """Batch norm as an ``autograd.Function``: the operator ``bnlib::batch_norm``, its
    hand-written backward, and a forward-mode derivative (``jvp``).

    ``apply(x, weight, bias, running_mean, running_var, training, eps)
    -> (y, batch_mean, batch_var)``. In training ``running_mean`` and ``running_var``
    are ignored (pass None) and the batch statistics are used and returned (the biased
    variance); in eval the given running statistics are used, and the last two outputs
    are empty. ``weight`` and ``bias`` may be None (no affine transform). Half and
    bfloat16 inputs are computed in float32 and returned in their own dtype, as torch
    does.

    The forward-mode derivative uses that batch norm's Jacobian with respect to x is
    symmetric, so its product with a tangent ``x_t`` is the backward formula with
    ``dy = x_t``; a tangent of gamma or beta adds ``gamma_t * x_hat + beta_t``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, eps):
        return _batch_norm_op(x, weight, bias, running_mean, running_var, training, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*_setup_context(ctx, inputs, output))

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _rm_t, _rv_t, _training_t, _eps_t):
        x, weight, mean, inv_std = ctx.saved_tensors
        xf = _compute(x)
        y_t = torch.zeros_like(xf)
        if x_t is not None:  # the Jacobian times x_t: the backward formula at dy = x_t
            y_t = y_t + _compute(_backward_differentiable(
                x_t, x, weight, mean, inv_std, ctx.training, ctx.eps)[0])
        if weight_t is not None or bias_t is not None:
            inv_std = _to(inv_std, xf.dtype)
            if weight_t is not None:  # + gamma_t * x_hat
                x_hat = (xf - _bcast(_to(mean, xf.dtype), xf)) * _bcast(inv_std, xf)
                y_t = y_t + x_hat * _bcast(_to(weight_t, xf.dtype), xf)
            if bias_t is not None:
                y_t = y_t + _bcast(_to(bias_t, xf.dtype), xf)
        return _to(y_t, x.dtype), None, None


class _EagerBatchNormFunction(torch.autograd.Function):
    """BatchNormFunction for plain eager calls: the same backward and jvp, with the
    operator's kernel called directly. It defines ``forward(ctx, ...)`` rather than
    ``setup_context``, because ``autograd.Function.apply`` binds a setup_context-style
    forward's signature with ``inspect`` on every call (about 40 us, as much as the
    whole of torch's batch norm on a small batch); torch.func needs setup_context, so
    under its transforms BatchNormFunction is used instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps):
        *out, inv_std = _forward_kernel(x, weight, bias, running_mean, running_var,
                                        training, eps)
        inputs = (x, weight, bias, running_mean, running_var, training, eps)
        saved = _setup_context(ctx, inputs, out, inv_std)
        if _fwAD._current_level >= 0:  # forward-mode AD: jvp needs them too
            ctx.save_for_forward(*saved)
        return tuple(out)

    backward = staticmethod(_backward)
    jvp = BatchNormFunction.jvp


class _TracedBatchNormFunction(torch.autograd.Function):
    """Batch norm for torch.compile: the same equations and closed-form backward, as
    plain tensor operations that Dynamo traces into the graph, so that Inductor fuses
    them into a few loops (the operator would be an opaque call to the eager kernels).
    Measured on CPU, (32, 64, 56, 56) float32 forward+backward: 0.70x torch.nn's time
    compiled this way, 1.33x as the opaque operator. No jvp: Dynamo refuses one."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, eps):
        xf, dims = _compute(x), _reduce_dims(x)
        if training:
            var, mean = torch.var_mean(xf, dims, correction=0)  # -> (C,) x2, biased
        else:
            mean, var = _to(running_mean, xf.dtype), _to(running_var, xf.dtype)
        inv_std = torch.rsqrt(var + eps)  # (C,)
        scale = inv_std if weight is None else _to(weight, xf.dtype) * inv_std
        y = (xf - _bcast(mean, xf)) * _bcast(scale, xf)
        if bias is not None:
            y = y + _bcast(_to(bias, xf.dtype), xf)
        if not training:
            mean, var = xf.new_empty(0), xf.new_empty(0)
        return _to(y, x.dtype), mean, var, inv_std

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, running_mean, _running_var, training, eps = inputs
        _y, mean, var, inv_std = output
        ctx.save_for_backward(x, weight, mean if training else running_mean, inv_std)
        ctx.training, ctx.eps = training, eps
        ctx.mark_non_differentiable(mean, var, inv_std)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dinv_std):
        x, weight, mean, inv_std = ctx.saved_tensors
        dx, dw, db = _backward_differentiable(dy, x, weight, mean, inv_std,
                                              ctx.training, ctx.eps)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        return (dx if need_dx else None, dw if need_dw else None,
                db if need_db else None, None, None, None, None)
