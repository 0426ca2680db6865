"""Folding an eval-mode batch norm into the layer before it, for inference.

In eval mode batch norm is a fixed per-channel affine map,
``y = gamma * (z - mean) / sqrt(var + eps) + beta``. If ``z = W x + b`` comes from a
linear or convolutional layer, the two compose into one layer of the same kind:

    W' = W * s   (row / output channel c scaled by s_c),   s = gamma / sqrt(var + eps)
    b' = (b - mean) * s + beta

so the network does the same arithmetic with one layer fewer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batchnorm", "fold_sequential"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _num_outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def fold_batchnorm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a new layer equal to ``bn(layer(x))``; ``layer`` and ``bn`` are untouched.

    ``layer`` is a ``Linear`` or ``Conv1d/2d/3d`` (any groups, stride, padding, with or
    without bias); ``bn`` is a batch norm (``torch.nn`` or ``bnlib.nn``) in eval mode
    with running statistics. The arithmetic is done in float64 and the result cast back
    to the layer's dtype.
    """
    if not isinstance(layer, _FOLDABLE) or type(layer).__name__.startswith("Lazy"):
        raise TypeError(
            "fold_batchnorm folds into Linear, Conv1d, Conv2d or Conv3d, got "
            f"{type(layer).__name__}"
        )
    for attr in ("running_mean", "running_var", "eps", "num_features"):
        if not hasattr(bn, attr):
            raise TypeError(f"bn must be a batch-norm module, got {type(bn).__name__}")
    if bn.training:
        raise ValueError(
            "bn is in training mode, where it uses batch statistics and cannot be "
            "folded; call bn.eval() first"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn has no running statistics (track_running_stats=False), so eval mode "
            "uses batch statistics and there is nothing fixed to fold"
        )
    c = _num_outputs(layer)
    if bn.num_features != c:
        raise ValueError(
            f"the layer has {c} outputs but bn normalizes {bn.num_features} channels"
        )

    with torch.no_grad():
        dt = torch.float64
        mean, var = bn.running_mean.to(dt), bn.running_var.to(dt)
        gamma = bn.weight.to(dt) if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.to(dt) if bn.bias is not None else torch.zeros_like(mean)
        s = gamma / torch.sqrt(var + bn.eps)  # (C,)
        w = layer.weight.to(dt)  # (C, ...): output channels first, also for groups
        b = layer.bias.to(dt) if layer.bias is not None else torch.zeros_like(mean)
        w_new = w * s.view([-1] + [1] * (w.dim() - 1))
        b_new = (b - mean) * s + beta

        folded = copy.deepcopy(layer)
        wt = layer.weight
        folded.weight = nn.Parameter(w_new.to(wt.dtype), requires_grad=wt.requires_grad)
        folded.bias = nn.Parameter(b_new.to(wt.dtype), requires_grad=wt.requires_grad)
    return folded


def fold_sequential(model: nn.Sequential) -> nn.Sequential:
    """Fold every (Linear or Conv, batch norm) pair of a Sequential; a new model.

    Batch-norm modules are recognised by their running statistics; the model must be in
    eval mode. Other modules are copied unchanged.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential, got {type(model).__name__}")
    layers: list[nn.Module] = []
    mods = list(model)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, _FOLDABLE) and nxt is not None and hasattr(nxt, "running_var"):
            layers.append(fold_batchnorm(m, nxt))
            i += 2
        else:
            layers.append(copy.deepcopy(m))
            i += 1
    return nn.Sequential(*layers).train(model.training)
