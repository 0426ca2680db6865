"""Synchronized batch norm: the statistics of a batch split across processes, combined
over ``torch.distributed``, as the module ``SyncBatchNorm``.

When a batch is split across processes (one per GPU, or per CPU worker), each process
sees a small shard. ``SyncBatchNorm`` normalizes every shard with the statistics of the
whole batch, so that P processes with shards x_1, ..., x_P compute what one process
computes on the concatenated batch [x_1; ...; x_P].

Forward. Each process p has n_p values per channel, their mean mu_p and their sum of
squared deviations M2_p = sum((x_p - mu_p)^2) (two passes over the shard). The triples
are gathered from every process and merged with Chan, Golub and LeVeque's parallel
formula (1979), which never subtracts two large sums as E[x^2] - E[x]^2 does:

    n   = sum_p n_p,     mu = sum_p n_p * mu_p / n
    M2  = sum_p M2_p + sum_p n_p * (mu_p - mu)^2,     var = M2 / n
    y   = gamma * (x - mu) * inv_std + beta,          inv_std = 1 / sqrt(var + eps)

An empty shard contributes n_p = 0 and nothing else. The merge runs in float64 on every
process, in the same order, so every process gets the same mu and var bit for bit, and
the same running statistics (updated with the unbiased M2 / (n - 1)).

Backward. The gradient of batch norm needs two per-channel sums over the whole batch,
sum(dy) and sum(dy * x_hat); they are all-reduced (one call, a (2C,) tensor) and dx is
the single-process closed form with n the total count:

    dx = gamma * inv_std * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)

dgamma = sum(dy * x_hat) and dbeta = sum(dy) are returned for the process's own shard,
as torch's SyncBatchNorm does: summed over processes (which DistributedDataParallel's
all-reduce does, up to its division by P) they are the single-process gradients.

Design decisions:

- ``SyncBatchNorm`` subclasses torch's ``_BatchNorm`` (the base of BatchNorm1d/2d/3d
  and of torch's SyncBatchNorm), **not** ``torch.nn.SyncBatchNorm``, whose ``forward``
  refuses CPU tensors. It has torch's SyncBatchNorm's constructor (with
  ``process_group``), parameters, buffers, ``state_dict`` (keys and version: a state
  dict loads either way), ``_check_input_dim``, ``convert_sync_batchnorm`` and repr.
  Why not subclass torch's: ``DistributedDataParallel`` refuses any module containing a
  ``torch.nn.SyncBatchNorm`` when the model is on CPU ("SyncBatchNorm layers only work
  with GPU modules"), and training on several CPU processes under DDP is this class's
  point. The trade, deliberate: ``isinstance(m, torch.nn.SyncBatchNorm)`` is False for
  it; ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` holds, which is what
  most code that looks for batch norms checks (``bnlib.diagnose``, weight-decay rules).
- It synchronizes only in training mode, when ``torch.distributed`` is initialized and
  the group has more than one process. Otherwise (eval mode, no process group, a group
  of one) it is ``bnlib.nn``'s BatchNorm exactly, with no communication; eval mode
  without running statistics uses the local batch's, as torch's does.
- Input: (N, C, *spatial) with any number of spatial dims, as torch's (dim >= 2).
  Shards may have different batch sizes, or none (N = 0). "More than one value per
  channel" is checked on the whole batch: a shard of one sample is fine when the
  others have more. Every other check runs on each process before any communication,
  in torch's order and with torch's exception types; nothing is written before every
  check has passed.
- Every process must make the same calls: the forward in training mode, and the
  backward through the layer (as with DDP). The backward always all-reduces, even where
  dx is not needed, so that no process waits for a call another skipped. Ranks that
  run different numbers of steps (an uneven last batch dropped on one rank only, an
  early ``break``) are not supported: the ranks with more steps wait for a partner.
- "No hang" means: until the process group's ``timeout``. A process that raises or
  dies makes the others fail in their next collective with a RuntimeError that says
  so, but only once the backend gives up on the missing peer, which is the
  ``timeout`` given to ``init_process_group`` (torch's defaults: 30 minutes for gloo,
  10 minutes for NCCL). Set a shorter one for interactive work
  (``bnlib.spawn.launch`` does).
- Processes that disagree on the channel count or the dtype raise the same
  RuntimeError, naming each rank's, on every process: a module's first synchronized
  call gathers every process's (C, dtype) in a vector of the same size everywhere;
  later calls carry C and the dtype in the statistics vector, checked on CPU each
  call. Without this a size mismatch inside gloo terminates one process outright.
- Communication per layer and training step: one all_gather of 2C + 3 float64 numbers
  in the forward (count, C, dtype, then the mean and M2 of each channel), one
  all_reduce of 2C float64 numbers in the backward, plus the 2-number handshake on a
  module's first call. On a GPU the counts stay on the device: no host
  synchronization per layer (the one-value-per-channel check, which needs the count
  on the host, is made on CPU only, like torch's SyncBatchNorm makes none).
- Double backward is not supported in synchronized mode (the backward's all-reduce is
  not differentiable): it raises. torch.compile and torch.func are not supported in
  synchronized mode either; in the other modes the module is bnlib.nn's BatchNorm.
- :meth:`bnlib.nn.SyncBatchNorm.convert_sync_batchnorm` swaps torch's and bnlib's
  BatchNorm1d/2d/3d (and torch's SyncBatchNorm) for bnlib's ``SyncBatchNorm``,
  keeping the very parameter and buffer tensors (so ``requires_grad``, devices and an
  optimizer's references survive) and each module's train/eval mode. Batch Renorm
  and Ghost BN are not batch norm and are left as they are. The replaced class is kept
  in the new module's ``revert_class`` attribute.
- :func:`bnlib.nn.revert_sync_batchnorm` (a module-level function, also reachable as
  ``SyncBatchNorm.revert_sync_batchnorm``) does the reverse, for bnlib's and torch's
  SyncBatchNorm, so that a model trained with it can be evaluated on one CPU. PyTorch
  has no such function. The class each SyncBatchNorm becomes is, in order: the
  ``batchnorm_class`` argument, the module's ``revert_class`` (set by conversion, or
  by hand), else ``bnlib.nn.BatchNorm2d``.
  ``revert_class`` is a plain attribute: it survives pickling and ``deepcopy`` but is
  not in the ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ._kernels import _affine, _bcast, _channel_dot, _channel_sum, _compute, _to
from .batchnorm import BatchNorm2d, _BatchNorm, _mode
from .functional import _check_tensors, _empty_output

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "revert_sync_batchnorm"]


# ------------------------------------------------------------------------- collectives


def _world_size(group) -> int:
    """The number of processes to synchronize with: 1 outside a process group (and for
    a process that is not a member of ``group``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return max(dist.get_world_size(group), 1)


def _collective(op, *args, group) -> None:
    """Run a collective; a failure (a peer that raised, died or timed out) becomes a
    RuntimeError that says what was being waited for."""
    try:
        op(*args, group=group)
    except RuntimeError as err:  # DistBackendError, a timeout, a closed connection
        raise RuntimeError(
            f"SyncBatchNorm: {op.__name__} over the process group failed. Every "
            "process of the group must call the layer's forward (in training mode) "
            "and backward; another process may have raised, died or skipped the "
            f"call. The backend said: {err}"
        ) from err


# dtypes as numbers, to travel in the float64 vector every process gathers anyway
_DTYPE_CODES = {torch.float16: 1.0, torch.bfloat16: 2.0, torch.float32: 3.0,
                torch.float64: 4.0}
_CODE_NAMES = {code: str(dtype).removeprefix("torch.")
               for dtype, code in _DTYPE_CODES.items()}


def _check_agreement(rows: list[list[float]], what: str) -> None:
    """Raise the same RuntimeError on every process if the gathered (C, dtype code)
    rows, one per rank, disagree. Every process holds every row, so every process
    raises, with the same message, before anything else is sent."""
    if len({(c, code) for c, code in rows}) == 1:
        return
    ranks = "; ".join(f"rank {r}: {int(c)} channels, "
                      f"{_CODE_NAMES.get(code, 'unsupported dtype')}"
                      for r, (c, code) in enumerate(rows))
    raise RuntimeError(
        f"SyncBatchNorm: the processes disagree on the {what} ({ranks}). Every process "
        "must run the same model, with the same num_features and dtype, on inputs of "
        "the same channel count and dtype: the statistics of channels that differ "
        "cannot be merged."
    )


def _handshake(x: Tensor, group, world_size: int) -> None:
    """A module's first synchronized call: gather every process's (C, dtype) in a
    vector of the same size everywhere (2 numbers), and check they agree. After it,
    the statistics vector (whose size depends on C) has the same size everywhere; a
    later change of dtype on one process is caught in it (see _gather_stats)."""
    mine = torch.tensor([x.shape[1], _DTYPE_CODES.get(x.dtype, 0.0)],
                        dtype=torch.float64, device=x.device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    _collective(dist.all_gather, gathered, mine, group=group)
    _check_agreement(torch.stack(gathered).tolist(), "input's channels or dtype")


def _gather_stats(xf: Tensor, dtype: torch.dtype, group, world_size: int,
                  on_host: bool) -> tuple[Tensor, int | None, Tensor, Tensor]:
    """``(n, n_host, mu, M2)`` of the whole batch: its count of values per channel
    (a float64 tensor on xf's device; ``n_host``, the same as an int, only when
    ``on_host``), and per channel its mean and sum of squared deviations, merged from
    every process's shard by Chan et al.'s formula. xf (N, C, ...) -> (), int | None,
    (C,) float64, (C,) float64.

    One all_gather of ``(n_p, C, dtype code, mu_p, M2_p)``, 2C + 3 float64 numbers per
    process. With ``on_host`` (CPU tensors: reading them costs no device sync) the C
    and dtype columns are checked on every call; on a GPU the counts stay on the
    device, with no host synchronization, and the agreement is the handshake's."""
    c = xf.shape[1]
    n_p = xf.numel() // c  # this shard's values per channel, 0 for an empty shard
    packed = torch.zeros(2 * c + 3, dtype=torch.float64, device=xf.device)
    packed[:3] = torch.tensor([n_p, c, _DTYPE_CODES.get(dtype, 0.0)],
                              dtype=torch.float64)
    if n_p:
        mu_p = _channel_sum(xf) / n_p  # (N, C, ...) -> (C,)
        xc = xf - _bcast(mu_p, xf)
        packed[3:c + 3] = mu_p
        packed[c + 3:] = _channel_dot(xc, xc)  # M2_p = sum((x - mu_p)^2), (C,)
    gathered = [torch.empty_like(packed) for _ in range(world_size)]
    _collective(dist.all_gather, gathered, packed, group=group)
    stats = torch.stack(gathered)  # (P, 2C + 3), the same on every process
    counts, mus, m2s = stats[:, :1], stats[:, 3:c + 3], stats[:, c + 3:]
    n_host = None
    if on_host:
        head = stats[:, :3].tolist()
        _check_agreement([row[1:] for row in head], "input's dtype")
        n_host = int(sum(row[0] for row in head))
    n = counts.sum()  # (), float64, on xf's device
    mu = (counts * mus).sum(0) / n.clamp(min=1)  # (P, C) -> (C,); 0 if every shard
    m2 = m2s.sum(0) + (counts * (mus - mu) ** 2).sum(0)  # is empty    (P, C) -> (C,)
    return n, n_host, mu, m2


# --------------------------------------------------------------------------- function


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with the whole batch's statistics, and its hand-written backward,
    which all-reduces the two gradient sums.

    ``apply(x, weight, bias, mean, inv_std, count, group) -> y``

    - x: (N, C, *spatial), this process's shard (N may be 0).
    - weight, bias: (C,) or None. mean, inv_std: (C,), the whole batch's statistics
      (constants here: the backward formula accounts for their dependence on x).
    - count: the whole batch's values per channel (an int, or a 0-dim tensor on x's
      device, which needs no host synchronization); group: the process group.
    - y: like x, ``weight * (x - mean) * inv_std + bias``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, inv_std, count, group):
        xf = _compute(x)  # (N, C, ...), float32 for half inputs
        scale = inv_std if weight is None else _to(weight, xf.dtype) * inv_std  # (C,)
        y = xf - _bcast(mean, xf)  # x - mu, in the output's buffer
        if bias is None:
            y = y.mul_(_bcast(scale, xf))
        else:
            y = _affine(y, scale, _to(bias, xf.dtype), inplace=True)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.count, ctx.group = count, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _to(y, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        """dx = gamma * inv_std * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n) with
        both sums all-reduced over the group; dgamma, dbeta are this shard's."""
        x, weight, mean, inv_std = ctx.saved_tensors
        xf = _compute(x)
        dy = _to(dy, xf.dtype)
        c, n = x.shape[1], ctx.count
        xc = xf - _bcast(mean, xf)  # x - mu, (N, C, ...)
        local = torch.cat([_channel_sum(dy), _channel_dot(xc, dy)])  # (2C,)
        total = local.to(torch.float64, copy=True)  # float64 on every process
        # Always, even where dx is not needed: every process must make the same calls.
        _collective(dist.all_reduce, total, group=ctx.group)
        dbeta_p, dgamma_p = local[:c], local[c:] * inv_std  # this shard's sums
        total = _to(total, local.dtype)
        dbeta, dgamma = total[:c], total[c:] * inv_std  # the whole batch's
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_dx:
            k_dy = inv_std if weight is None else _to(weight, xf.dtype) * inv_std
            # dx = k_dy * dy + k_xc * (x - mu) + k_0, with x_hat = (x - mu) * inv_std:
            k = k_dy / -n  # (C,)
            k_xc, k_0 = k * inv_std * dgamma, k * dbeta  # (C,)
            dx = _affine(xc, k_xc, k_0, inplace=True).addcmul_(dy, _bcast(k_dy, xf))
            dx = _to(dx, x.dtype)
        if need_dweight:
            dw = _to(dgamma_p, weight.dtype)
        if need_dbias:
            db = _to(dbeta_p, ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


# --------------------------------------------------------------------------- checks


def _check_shard(x, running_mean, running_var, weight, bias, eps,
                 num_features: int) -> None:
    """bnlib.nn's checks of a training-mode batch norm, for one shard of a batch: in
    the same order, with the same exception types, but without the one-value-per-
    channel check (that is made on the whole batch) and for empty shards too (an
    empty shard still takes part in the collectives)."""
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, got {eps}")
    c = x.shape[1]
    if c != num_features:
        raise RuntimeError(
            f"expected input with {num_features} channels, shape (N, {num_features}, "
            f"...), got {c} channels in an input of shape {tuple(x.shape)}"
        )
    _check_tensors(x, running_mean, running_var, weight, bias, True, num_features)


# --------------------------------------------------------------------------- module


def _bias_kwarg(bn: nn.Module) -> dict:
    """``{"bias": False}`` for an affine batch norm without a bias, else nothing (so
    that classes whose constructor has no ``bias`` argument still work)."""
    return {"bias": False} if bn.affine and bn.bias is None else {}


def _swap(bn: nn.Module, cls, **kwargs) -> nn.Module:
    """A ``cls`` batch norm holding bn's very parameters and buffers (shared, not
    copied: requires_grad, device and an optimizer's references are kept), bn's
    train/eval mode and qconfig."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device="meta", **kwargs, **_bias_kwarg(bn))
    for name in ("weight", "bias"):
        new._parameters[name] = bn._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = bn._buffers.get(name)
    new.training = bn.training
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def revert_sync_batchnorm(module: nn.Module,
                          batchnorm_class: type[nn.Module] | None = None) -> nn.Module:
    """Turn every SyncBatchNorm (bnlib's or torch's) in ``module`` back into a batch
    norm, to run the model in one process; the reverse of
    ``SyncBatchNorm.convert_sync_batchnorm``.

    Each becomes a ``batchnorm_class`` if given, else its ``revert_class`` (the class
    that convert_sync_batchnorm replaced, or one set by hand), else
    ``bnlib.nn.BatchNorm2d``: a batch norm has a fixed number of input dims, and a
    SyncBatchNorm that was never converted from one cannot know which. The new module
    holds the very same parameter and buffer tensors and keeps the train/eval mode.
    Returns ``module`` with its SyncBatchNorms replaced, or the new batch norm if
    ``module`` is itself one.
    """
    out = module
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        cls = batchnorm_class or getattr(module, "revert_class", None) or BatchNorm2d
        out = _swap(module, cls)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child, batchnorm_class))
    return out


class SyncBatchNorm(_TorchBatchNorm):
    """Batch norm over (N, C, *spatial) input with the statistics of the batch split
    across the processes of ``process_group`` (the whole world by default); drop-in
    for ``torch.nn.SyncBatchNorm``, on CPU (gloo) and CUDA (NCCL), and usable under
    ``DistributedDataParallel`` on CPU too.

    ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None, *,
    bias=True)``, torch's SyncBatchNorm's signature: parameters weight, bias (C,) and
    buffers running_mean, running_var (C,), num_batches_tracked, as torch's, with the
    same ``state_dict``. Outside a process group, with a group of one, and in eval mode
    it is ``bnlib.nn.BatchNorm``.

    It subclasses torch's ``_BatchNorm``, not ``torch.nn.SyncBatchNorm``: DDP refuses
    a CPU model containing one of those. So ``isinstance(m, torch.nn.SyncBatchNorm)``
    is False, a deliberate trade; test ``isinstance(m, (bnlib.nn.SyncBatchNorm,
    torch.nn.SyncBatchNorm))`` to find both. Under DDP, ``broadcast_buffers=False`` is
    enough: every process already holds the same running statistics.
    """

    revert_class: type[nn.Module] | None = None  # what revert_sync_batchnorm makes

    revert_sync_batchnorm = staticmethod(revert_sync_batchnorm)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    # _version, _load_from_state_dict (num_batches_tracked of old state dicts) and
    # extra_repr are _NormBase's, which torch's SyncBatchNorm does not override either.

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input of "
                             f"shape {tuple(x.shape)})")

    def _check_non_zero_input_channels(self, x: Tensor) -> None:
        if x.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be "
                             "non-zero")

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # FX tracing: a leaf module, as torch's are
            return _BatchNorm.forward(self, x)
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        group = dist.group.WORLD if self.process_group is None else self.process_group
        world_size = _world_size(group) if self.training else 1
        if world_size == 1:  # eval, or nothing to synchronize with: batch norm
            return _BatchNorm.forward(self, x)
        return self._sync_forward(x, group, world_size)

    def _sync_forward(self, x: Tensor, group, world_size: int) -> Tensor:
        _bn_training, running_mean, running_var = _mode(self)
        _check_shard(x, running_mean, running_var, self.weight, self.bias, self.eps,
                     self.num_features)
        if not getattr(self, "_agreed", False):  # the module's first synchronized call
            _handshake(x, group, world_size)  # the same error on every process
            self._agreed = True  # on every process: the next calls skip it alike
        xf = _compute(x)
        on_host = x.device.type == "cpu"
        with torch.no_grad():
            n, n_host, mu, m2 = _gather_stats(xf.detach(), x.dtype, group, world_size,
                                              on_host)
        if n_host == 1:  # the same n on every process: they all raise
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)} on this process and 1 value per channel over the "
                f"{world_size} processes: batch statistics need at least two values "
                "per channel"
            )

        # Only now, with every check passed, change the module's state.
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average over the batches seen
                factor = 1.0 / self.num_batches_tracked.double()
        if n_host == 0:  # every shard empty: what batch norm does with an empty batch
            return _empty_output(x, self.weight, self.bias)
        inv_std = torch.rsqrt(m2 / n + self.eps)  # (C,), float64
        y = SyncBatchNormFunction.apply(x, self.weight, self.bias, _to(mu, xf.dtype),
                                        _to(inv_std, xf.dtype), n, group)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # running += momentum * (stat - running)
                unbiased_var = m2 / (n - 1)  # the whole batch's, with the total count
                if n_host is None:  # on a GPU: no update from an all-empty batch
                    factor = torch.where(n > 1, torch.as_tensor(factor, device=n.device,
                                                                dtype=n.dtype), 0.0)
                for running, stat in ((running_mean, mu), (running_var, unbiased_var)):
                    running.lerp_(_to(stat, running.dtype), _to(factor, running.dtype)
                                  if isinstance(factor, Tensor) else factor)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module,
                               process_group=None) -> nn.Module:
        """Replace every BatchNorm1d/2d/3d in ``module`` (torch's and bnlib's) and
        every torch SyncBatchNorm by a bnlib ``SyncBatchNorm`` synchronizing over
        ``process_group`` (the whole world by default).

        The new modules hold the very parameter and buffer tensors of the old ones
        (requires_grad, device and an optimizer's references are kept) and their
        train/eval mode; each remembers the replaced class in ``revert_class``, for
        :func:`revert_sync_batchnorm`. bnlib SyncBatchNorms are left as they are, and
        so are other normalizations (Batch Renorm, Ghost BN, lazy batch norms).
        Returns ``module`` with the replacements made, or the new SyncBatchNorm if
        ``module`` is itself a batch norm.
        """
        out = module
        if isinstance(module, _CONVERTED) and not isinstance(module, SyncBatchNorm):
            out = _swap(module, cls, process_group=process_group)
            if not isinstance(module, nn.SyncBatchNorm):
                out.revert_class = type(module)
            else:
                out.revert_class = getattr(module, "revert_class", None)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


_CONVERTED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
