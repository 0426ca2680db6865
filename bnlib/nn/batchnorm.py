"""The modules ``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d``: torch.nn's
classes with bnlib's forward (checks first, then the operator), and their registration
with ``torch.ao.quantization.fuse_modules``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import _batch_norm, _check_args, _empty_output

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]



def _mode(m: nn.Module) -> tuple[bool, Tensor | None, Tensor | None]:
    """How a batch-norm module normalizes now, as torch's BatchNorm decides it:
    ``(bn_training, running_mean, running_var)``. Batch statistics in training, and in
    eval when no running ones are kept; the running statistics are read in eval and
    written in training, if tracked (None otherwise)."""
    return _mode_of(m, m.running_mean, m.running_var)


def _mode_of(m: nn.Module, running_mean: Tensor | None, running_var: Tensor | None
             ) -> tuple[bool, Tensor | None, Tensor | None]:
    """_mode, given the module's running statistics."""
    bn_training = m.training or (running_mean is None and running_var is None)
    use_running = not m.training or m.track_running_stats
    if not use_running:
        return bn_training, None, None
    return bn_training, running_mean, running_var


def _tensors(m: nn.Module) -> tuple[Tensor | None, ...]:
    """``(weight, bias, running_mean, running_var)`` of a batch-norm module.

    Read from the module's parameter and buffer dicts where its class is one of ours
    as defined (nn.Module's attribute lookup costs about 2 us a name, and forward needs
    four); through attribute lookup for anything else (a subclass, or a parametrized
    module, whose class computes ``weight`` or ``bias``), and where a name was
    deleted, so that the error is torch's."""
    if type(m) in _PLAIN:
        params, buffers = m._parameters, m._buffers
        try:
            return (params["weight"], params["bias"], buffers["running_mean"],
                    buffers["running_var"])
        except KeyError:
            pass
    return m.weight, m.bias, m.running_mean, m.running_var


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
        weight, bias, running_mean, running_var = _tensors(self)
        bn_training, running_mean, running_var = _mode_of(self, running_mean,
                                                          running_var)
        nonempty = _check_args(x, running_mean, running_var, weight, bias,
                               bn_training, self.eps, self.num_features)

        # Only now, with every check passed, change the module's state.
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats \
                and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average over the batches seen
                factor = 1.0 / self.num_batches_tracked.double()
        if not nonempty:
            return _empty_output(x, weight, bias)
        return _batch_norm(x, running_mean, running_var, weight, bias, bn_training,
                           factor, self.eps)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input; drop-in for ``nn.BatchNorm1d``."""

    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input; drop-in for ``nn.BatchNorm2d``."""

    _expected_dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W) input; drop-in for ``nn.BatchNorm3d``."""

    _expected_dims = (5,)


_PLAIN = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


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
