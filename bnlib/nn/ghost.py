"""Ghost Batch Normalization (Hoffer, Hubara and Soudry, 2017, "Train longer,
generalize better: closing the generalization gap in large batch training of neural
networks"): batch norm over small virtual batches of a large batch, as torch-style
modules ``GhostBatchNorm1d`` and ``GhostBatchNorm2d``.

In training the batch is split along dim 0 into ghost batches of
``virtual_batch_size`` samples (as ``torch.split`` does: the last may be smaller), and
each is normalized with its own statistics:

    x = [x_1; x_2; ...; x_G],   y_g = gamma * (x_g - mu_g) / sqrt(var_g + eps) + beta

so a large batch keeps the noise of the small batches batch norm was tuned for. The
gradient of each y_g is batch norm's, within its ghost batch. The running statistics
are updated once per call, with the plain mean of the ghost batches' means and of their
unbiased variances:

    running_mean = (1 - momentum) * running_mean + momentum * mean_g(mu_g)
    running_var  = (1 - momentum) * running_var  + momentum * mean_g(v_g)

where v_g = var_g * M_g / (M_g - 1) is ghost batch g's unbiased variance (M_g values
per channel); momentum=None gives the cumulative average, as in BatchNorm. So by
default the running statistics move once per call, and ``num_batches_tracked`` counts
calls. The paper's reference code instead runs a batch norm per ghost batch, moving
them once per ghost batch (G times per call, the later ghost batches weighing more);
``update_per_ghost_batch=True`` does that, and then ``num_batches_tracked`` counts
ghost batches (and momentum=None averages over them). Eval mode
is batch norm's. With ``virtual_batch_size >= N`` there is one ghost batch: batch
norm exactly. The argument is named as in Keras's
``BatchNormalization(virtual_batch_size=...)``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ._kernels import _compute, _reduce_dims, _to
from .batchnorm import _BatchNorm, _mode
from .functional import _batch_norm, _check_args, _empty_output, batch_norm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


def _check_virtual_batch_size(virtual_batch_size) -> None:
    if isinstance(virtual_batch_size, bool) \
            or not isinstance(virtual_batch_size, numbers.Integral) \
            or virtual_batch_size < 1:
        raise ValueError("virtual_batch_size must be a positive int (the number of "
                         f"samples per ghost batch), got {virtual_batch_size!r}")


def _check_ghost_batches(x: Tensor, virtual_batch_size: int) -> None:
    """Every ghost batch of x (N, C, *spatial) must hold more than one value per
    channel; only the last can be smaller than ``virtual_batch_size``."""
    n = x.shape[0]
    smallest = n % virtual_batch_size or min(n, virtual_batch_size)  # samples
    values_per_sample = x[0, 0].numel()  # prod(spatial)
    if smallest * values_per_sample <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel in every ghost batch when "
            f"training, got input size {tuple(x.shape)} split into ghost batches of "
            f"virtual_batch_size={virtual_batch_size}: the last has {smallest} "
            f"sample(s), {smallest * values_per_sample} value per channel; "
            f"change the batch size or virtual_batch_size"
        )


class _GhostBatchNorm(_TorchBatchNorm):
    """What GhostBatchNorm1d/2d share: torch's batch-norm parameters and buffers (the
    same ``state_dict``) and Ghost BN's forward."""

    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 update_per_ghost_batch: bool = False) -> None:
        _check_virtual_batch_size(virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.virtual_batch_size = virtual_batch_size
        self.update_per_ghost_batch = update_per_ghost_batch

    def extra_repr(self) -> str:
        per_ghost = getattr(self, "update_per_ghost_batch", False)
        return (f"{self.num_features}, virtual_batch_size={self.virtual_batch_size}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}"
                + (", update_per_ghost_batch=True" if per_ghost else ""))

    def _check_input_dim(self, x: Tensor) -> None:
        _BatchNorm._check_input_dim(self, x)  # bnlib.nn's check and message

    def forward(self, x: Tensor) -> Tensor:
        """Batch norm of each ghost batch in training, BatchNorm's eval otherwise;
        x (N, C, *spatial) -> y of the same shape."""
        self._check_input_dim(x)
        virtual_batch_size = self.virtual_batch_size
        _check_virtual_batch_size(virtual_batch_size)
        bn_training, running_mean, running_var = _mode(self)  # as BatchNorm decides
        nonempty = _check_args(x, running_mean, running_var, self.weight, self.bias,
                               bn_training, self.eps, self.num_features)
        if not self.training:  # eval: BatchNorm's
            if not nonempty:
                return _empty_output(x, self.weight, self.bias)
            return _batch_norm(x, running_mean, running_var, self.weight, self.bias,
                               bn_training, 0.0, self.eps)
        if nonempty:
            _check_ghost_batches(x, virtual_batch_size)

        # Only now, with every check passed, change the module's state.
        per_ghost = getattr(self, "update_per_ghost_batch", False)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and not (per_ghost and nonempty):
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average over the batches seen
                momentum = 1.0 / self.num_batches_tracked.double()
        if not nonempty:
            return _empty_output(x, self.weight, self.bias)

        y_g, mu_g, var_g = [], [], []
        dims = _reduce_dims(x)
        for x_g in x.split(virtual_batch_size):  # ghost batches, (n_g, C, ...) each
            y_g.append(batch_norm(x_g, None, None, self.weight, self.bias, True,
                                  eps=self.eps))
            if running_mean is not None:
                with torch.no_grad():  # (n_g, C, ...) -> (C,), unbiased variance
                    var, mu = torch.var_mean(_compute(x_g.detach()), dims,
                                             correction=1)
                mu_g.append(mu)
                var_g.append(var)
        if running_mean is not None and per_ghost:
            with torch.no_grad():  # the reference code: one update per ghost batch
                for mu, var in zip(mu_g, var_g, strict=True):
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:  # cumulative, over ghost batches
                        momentum = 1.0 / self.num_batches_tracked.double()
                    running_mean.lerp_(_to(mu, running_mean.dtype), momentum)
                    running_var.lerp_(_to(var, running_var.dtype), momentum)
        elif running_mean is not None:
            with torch.no_grad():  # running = (1 - m) * running + m * mean_g(stat_g)
                running_mean.lerp_(_to(torch.stack(mu_g).mean(0), running_mean.dtype),
                                   momentum)
                running_var.lerp_(_to(torch.stack(var_g).mean(0), running_var.dtype),
                                  momentum)
        return torch.cat(y_g)  # (N, C, ...)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input.

    ``GhostBatchNorm1d(num_features, virtual_batch_size, eps=1e-5, momentum=0.1,
    affine=True, track_running_stats=True, device=None, dtype=None, *,
    update_per_ghost_batch=False)``: parameters weight, bias (C,) and buffers
    running_mean, running_var (C,), num_batches_tracked, as ``nn.BatchNorm1d``. The
    running statistics move once per call, or once per ghost batch with
    ``update_per_ghost_batch=True`` (the paper's reference code).
    """

    _expected_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input.

    ``GhostBatchNorm2d(num_features, virtual_batch_size, eps=1e-5, momentum=0.1,
    affine=True, track_running_stats=True, device=None, dtype=None, *,
    update_per_ghost_batch=False)``: parameters weight, bias (C,) and buffers
    running_mean, running_var (C,), num_batches_tracked, as ``nn.BatchNorm2d``. The
    running statistics move once per call, or once per ghost batch with
    ``update_per_ghost_batch=True`` (the paper's reference code).
    """

    _expected_dims = (4,)
