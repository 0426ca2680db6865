"""Folding an eval-mode batch norm into the layer before it, for inference.

In eval mode batch norm is a fixed per-channel affine map,
``y = gamma * (z - mean) / sqrt(var + eps) + beta``. If ``z = W x + b`` comes from a
linear or convolutional layer, the two compose into one layer of the same kind:

    W' = W * s   (row / output channel c scaled by s_c),   s = gamma / sqrt(var + eps)
    b' = (b - mean) * s + beta

so the network does the same arithmetic with one layer fewer.

:func:`fold_batchnorm` folds one pair; :func:`fold_sequential` the pairs of an
``nn.Sequential``; :func:`fold_model` every foldable batch norm of any model that
``torch.fx`` traces (resnets, densenets, mobilenets...). The last two warn, naming each
batch norm they leave and why.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fold_batchnorm", "fold_model", "fold_sequential"]

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
    left: list[tuple[str, str]] = []
    mods = list(model)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, _FOLDABLE) and nxt is not None and hasattr(nxt, "running_var"):
            layers.append(fold_batchnorm(m, nxt))
            i += 2
        else:
            if hasattr(m, "running_var"):
                prev = type(mods[i - 1]).__name__ if i else "the model's input"
                left.append((str(i), f"it follows {prev}, not a Linear or Conv layer "
                                     "of this Sequential"))
            layers.append(copy.deepcopy(m))
            i += 1
    _warn_left("fold_sequential", left)
    return nn.Sequential(*layers).train(model.training)


def _warn_left(who: str, left: list[tuple[str, str]]) -> None:
    """One warning naming every batch norm left unfolded, and why."""
    if left:
        items = "; ".join(f"'{name}': {why}" for name, why in left)
        warnings.warn(f"{who} left {len(left)} batch norm(s) unfolded: {items}",
                      stacklevel=3)


class _LeafTracer(fx.Tracer):
    """FX tracing with every batch norm a leaf (bnlib's Batch Renorm and Ghost BN too,
    whose forward FX could not trace), as torch's own are."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def fold_model(model: nn.Module) -> nn.Module:
    """A new model equal to ``model`` in eval mode, with every batch norm that can be
    folded folded into the layer before it; ``model`` is untouched.

    The model is traced with ``torch.fx`` (so any model FX traces works: resnets,
    densenets, mobilenets). A batch norm is folded when its input is the output of a
    ``Linear`` or ``Conv1d/2d/3d`` that is used by nothing else, each called once, and
    it has running statistics; the rest are left in place, and one warning names each
    of them and why (its input is a functional call, a concatenation, a layer used
    elsewhere...). Returns a ``torch.fx.GraphModule`` in eval mode.

    Raises ValueError for a model in training mode or with a batch norm in training
    mode (they use batch statistics: nothing fixed to fold; call ``model.eval()``), and
    TypeError, saying why, for a model FX cannot trace.
    """
    training = [name for name, m in model.named_modules()
                if m.training and (isinstance(m, _BatchNorm) or m is model)]
    if training:
        raise ValueError(
            "fold_model needs a model in eval mode (training mode normalizes with "
            f"batch statistics, which cannot be folded); in training mode: "
            f"{training[:5]}; "
            "call model.eval() first")
    root = copy.deepcopy(model)
    try:
        graph = _LeafTracer().trace(root)
    except Exception as err:  # noqa: BLE001 - any reason FX gives, reported as TypeError
        raise TypeError(
            f"fold_model traces the model with torch.fx, and {type(model).__name__} "
            f"does not trace ({type(err).__name__}: {err}); fold its layers with "
            "fold_batchnorm instead") from err
    traced = fx.GraphModule(root, graph, type(model).__name__)
    modules = dict(traced.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    left: list[tuple[str, str]] = []
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn, prev = modules[node.target], node.args[0] if node.args else None
        layer = modules.get(prev.target) if isinstance(prev, fx.Node) \
            and prev.op == "call_module" else None
        why = _why_not(bn, node, layer, prev, calls)
        if why is not None:
            left.append((node.target, why))
            continue
        parent, _, name = prev.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name,
                fold_batchnorm(layer, bn))
        node.replace_all_uses_with(prev)
        graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.recompile()
    _warn_left("fold_model", left)
    return traced.eval()


def _why_not(bn, node, layer, prev, calls: dict[str, int]) -> str | None:
    """Why the batch norm at ``node`` cannot be folded into ``layer``, or None."""
    if layer is None:
        what = "the model's input" if isinstance(prev, fx.Node) \
            and prev.op == "placeholder" else f"a functional call ({prev})"
        return f"its input is {what}, not a Linear or Conv layer's output"
    if not isinstance(layer, _FOLDABLE) or type(layer).__name__.startswith("Lazy"):
        return (f"its input comes from '{prev.target}' ({type(layer).__name__}), not "
                "a Linear or Conv layer")
    if len(prev.users) > 1:
        return f"the output of '{prev.target}' is also used elsewhere"
    if calls[prev.target] > 1 or calls[node.target] > 1:
        return "the layer or the batch norm is called more than once (shared)"
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    if bn.num_features != _num_outputs(layer):
        return (f"'{prev.target}' has {_num_outputs(layer)} outputs but it normalizes "
                f"{bn.num_features} channels")
    return None
