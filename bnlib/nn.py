"""Batch-norm modules for PyTorch with a hand-written backward: drop-in for
``torch.nn``'s.

``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d`` subclass ``torch.nn``'s, so they
take the same constructor arguments, hold the same parameters and buffers (their
``state_dict`` loads into torch's and back), and pass ``isinstance`` checks. Only the
computation is replaced. The math is ours, in plain tensor operations, and the backward
pass is the closed form of the book's backward chapter:

    forward:   y  = gamma * (x - mu) * inv_std + beta,   inv_std = 1 / sqrt(var + eps)
    backward:  dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))
               dgamma = sum(dy * x_hat),   dbeta = sum(dy)

(in eval mode mu and var are the running statistics, constants, and
dx = gamma * inv_std * dy). Outputs, gradients and running statistics equal torch's.

How it plugs into PyTorch. The computation is a custom operator, ``bnlib::batch_norm``
(with ``bnlib::batch_norm_backward`` for its gradient), registered with
``torch.library`` the way PyTorch documents for operators that must work with its
tools: ``register_fake`` (shapes for ``torch.compile`` and ``torch.export``),
``register_autograd`` (the hand-written backward) and ``register_vmap`` (``torch.func``;
a vmapped batch norm is a batch norm over ``B * C`` channels). On top of it,
:class:`BatchNormFunction` adds forward-mode AD (``jvp``). So the modules work with:

- double backward (gradient penalties, MAML, Hessian-vector products): when
  ``create_graph=True`` the backward is computed from differentiable tensor operations
  that recompute ``mu`` and ``var`` from ``x``, so second-order gradients are exact;
- ``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``), forward-mode AD
  and ``gradcheck``'s batched-gradient check;
- ``torch.compile(fullgraph=True)``: Dynamo traces the same equations as tensor
  operations, which Inductor fuses (faster than torch's own kernel on CPU, see
  ``python -m bnlib.bench``);
- ``torch.export`` in training and eval mode: one ``bnlib.batch_norm`` node, and the
  exported program keeps the hand-written backward;
- ``torch.fx.symbolic_trace``: like torch's own batch norms, the modules are leaves
  (``call_module`` nodes), so FX passes see them as modules, and
  ``torch.ao.quantization.fuse_modules`` fuses Conv/Linear + BN (+ ReLU) with them.

TorchScript (``torch.jit.script``) is not supported: it is deprecated in PyTorch 2.13.

One deliberate difference from torch: a call that raises changes no state. torch bumps
``num_batches_tracked`` before it checks the batch size and the channel count; here
every check runs, in torch's order and with torch's exception types, before anything
is written.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor, nn

__all__ = ["BatchNormFunction", "batch_norm",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchRenormFunction", "BatchRenorm1d", "BatchRenorm2d",
           "GhostBatchNorm1d", "GhostBatchNorm2d",
           "SyncBatchNorm", "revert_sync_batchnorm"]

_REDUCED = (torch.float16, torch.bfloat16)  # computed in float32, like torch
_CHUNK_BYTES = 1 << 19  # a chunk of this size, and its temporaries, stay in L2 cache
_TILE_MIN = 1 << 15  # values: from here on, _rows' tiling pays for itself


# --------------------------------------------------------------------------- helpers


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


def _rows(v: Tensor, x: Tensor) -> Tensor | None:
    """v (C,) tiled to short contiguous rows that broadcast against a contiguous x.

    PyTorch's CPU kernels vectorize a three-operand op (addcmul) only when at most one
    operand is broadcast along the innermost dimension. For (N, C, *spatial) input a
    per-channel vector is broadcast along it, and the op runs element by element.
    Viewing x as (N, C, L / k, k) and v as (C, 1, k) rows keeps every operand contiguous
    along the innermost k, and the op runs at memory speed. Returns None where no k
    fits (and on GPU, where broadcasting costs nothing), and for inputs under 32 Ki
    values, where the tiling's own ops cost more than they save (element by element,
    addcmul takes about 1.5 ns a value; the tiling about 25 us, measured on one core).
    The result is the same bits either way.
    """
    if x.dim() == 2 or not x.is_contiguous() or x.device.type != "cpu" \
            or x.numel() < _TILE_MIN:
        return None  # (N, C) and channels_last: C is innermost, v is contiguous there
    length = x[0, 0].numel()
    k = next((k for k in range(128, 15, -1) if length % k == 0), None)
    if k is None:
        return None
    return v.view(-1, 1, 1).expand(-1, 1, k).contiguous()  # (C, 1, k)


def _affine(t: Tensor, scale: Tensor, shift: Tensor, inplace: bool = False) -> Tensor:
    """Per channel, t * scale + shift in one pass: (N, C, *spatial), (C,), (C,).
    With ``inplace`` the result is written into t (t must be a fresh tensor).

    The result is never a view: it is an operator's output, which the caller may
    modify in place (BN -> ReLU(inplace=True)), and autograd forbids that on a view
    created inside a custom Function."""
    scale_rows, shift_rows = _rows(scale, t), _rows(shift, t)
    if scale_rows is None:
        if inplace:
            return torch.addcmul(_bcast(shift, t), t, _bcast(scale, t), out=t)
        return torch.addcmul(_bcast(shift, t), t, _bcast(scale, t))
    n, c, k = t.shape[0], t.shape[1], scale_rows.shape[-1]
    out = t if inplace else torch.empty_like(t)  # contiguous, like t
    torch.addcmul(shift_rows, t.view(n, c, -1, k), scale_rows,
                  out=out.view(n, c, -1, k))  # (N, C, L / k, k)
    return out


# --------------------------------------------------------------------------- kernels
# Plain functions of tensors: the operator below runs them, and the book reads them.


def _forward_kernel(x, weight, bias, mean, var, training: bool, eps: float):
    """y, the batch mean and biased variance (training; two empty tensors in eval), and
    inv_std = 1 / sqrt(var + eps) for the backward pass.

    training: mu, var = batch statistics;  y = (x - mu) * (gamma * inv_std) + beta
    eval:     mu, var = running statistics; y = x * scale + (beta - mu * scale)
    """
    xf = _compute(x)  # (N, C, ...), float32 for half inputs
    m = x.numel() // x.shape[1]  # values per channel
    if training:
        mean = xf.mean(0) if x.dim() == 2 else _channel_sum(xf) / m  # -> (C,)
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
            y = _affine(y, scale, _to(bias, xf.dtype), inplace=True)
        stats = (mean, var)
    else:  # one pass over x, like torch's eval kernel
        shift = -mean * scale if bias is None else \
            torch.addcmul(_to(bias, xf.dtype), mean, scale, value=-1)
        y = _affine(xf, scale, shift)
        stats = (xf.new_empty(0), xf.new_empty(0))
    return _to(y, x.dtype), *stats, inv_std


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
        k = k_dy / -m  # (C,)
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


# --------------------------------------------------------------------------- operator


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


# --------------------------------------------------------------------------- functional


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
    else:  # nothing to differentiate: the kernel alone
        y, mean, var, _ = _forward_kernel(*args)
    if training and running_mean is not None and running_var is not None:
        m = x.numel() // x.shape[1]
        with torch.no_grad():  # running = (1 - momentum) * running + momentum * stat
            unbiased_var = var * (m / (m - 1))  # store the unbiased variance
            for running, stat in ((running_mean, mean), (running_var, unbiased_var)):
                if _transformed():  # vmap has batching rules for these, not lerp_
                    running.mul_(1 - momentum).add_(stat * momentum)
                else:  # running + momentum * (stat - running): one op, not three
                    running.lerp_(_to(stat, running.dtype), momentum)
    return y


# --------------------------------------------------------------------------- modules


def _mode(m: nn.Module) -> tuple[bool, Tensor | None, Tensor | None]:
    """How a batch-norm module normalizes now, as torch's BatchNorm decides it:
    ``(bn_training, running_mean, running_var)``. Batch statistics in training, and in
    eval when no running ones are kept; the running statistics are read in eval and
    written in training, if tracked (None otherwise)."""
    bn_training = m.training or (m.running_mean is None and m.running_var is None)
    use_running = not m.training or m.track_running_stats
    if not use_running:
        return bn_training, None, None
    return bn_training, m.running_mean, m.running_var


class _BatchNorm:
    """What BatchNorm1d/2d/3d add to their ``torch.nn`` base class: a ``forward`` that
    runs bnlib's batch norm, checking everything before it changes any state.

    Each module subclasses its ``torch.nn`` counterpart, so it has the same constructor,
    parameters, buffers, ``state_dict`` and ``reset_*`` methods, and code that checks
    ``isinstance(m, nn.BatchNorm2d)`` (weight-decay rules, ``update_bn``) treats it as a
    batch norm; only the computation is replaced.
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
        if isinstance(x, torch.fx.Proxy):  # FX tracing: a leaf module, as torch's are
            tracer = x.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self),
                                       (x,), {})
        self._check_input_dim(x)
        bn_training, running_mean, running_var = _mode(self)
        nonempty = _check_args(x, running_mean, running_var, self.weight, self.bias,
                               bn_training, self.eps, self.num_features)

        # Only now, with every check passed, change the module's state.
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats \
                and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average over the batches seen
                factor = 1.0 / self.num_batches_tracked.double()
        if not nonempty:
            return _empty_output(x, self.weight, self.bias)
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


# --------------------------------------------------------------------------- fusion


def _as_torch_batchnorm(bn: nn.Module) -> nn.Module:
    """torch's own batch norm class holding bn's very parameters and buffers (shared,
    not copied), for fusers that accept only torch's exact classes (QAT's ConvBn)."""
    base = next(c for c in type(bn).__mro__ if c.__module__.startswith("torch.nn"))
    twin = base(bn.num_features, bn.eps, bn.momentum, bn.affine,
                bn.track_running_stats, device="meta")
    twin._parameters, twin._buffers = bn._parameters, bn._buffers
    return twin.train(bn.training)


def _register_fusers() -> None:
    """Teach ``torch.ao.quantization.fuse_modules`` our classes: it looks fusers up by
    exact type, so each pattern with torch's BatchNormXd gets one with ours, which
    hands torch's fuser a torch BatchNormXd sharing our parameters and buffers."""
    try:
        from torch.ao.quantization import fuser_method_mappings as fmm
    except ImportError:  # pragma: no cover - torch without quantization
        return
    table = getattr(fmm, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if table is None:  # pragma: no cover - a torch that moved it
        return
    ours = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
            nn.BatchNorm3d: BatchNorm3d}

    def wrap(fuser):
        def fuse(is_qat, *mods):
            mods = [_as_torch_batchnorm(m) if isinstance(m, _BatchNorm) else m
                    for m in mods]
            return fuser(is_qat, *mods)
        return fuse

    for pattern, fuser in list(table.items()):
        if any(t in ours for t in pattern):
            table.setdefault(tuple(ours.get(t, t) for t in pattern), wrap(fuser))


_register_fusers()


# --------------------------------------------------------------------------- re-exports
# Batch Renorm and Ghost BN live in their own files and import the helpers above.

from .ghost import GhostBatchNorm1d, GhostBatchNorm2d  # noqa: E402
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenormFunction  # noqa: E402
from .sync import SyncBatchNorm, revert_sync_batchnorm  # noqa: E402
