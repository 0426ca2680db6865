"""Batch-norm diagnostics: one call that looks at a model (and, optionally, a batch of
data) and reports the silent batch-norm bugs, with why each matters and how to fix it.

The batch-norm bugs people report most often raise no error: a layer frozen with
``requires_grad=False`` whose running statistics still move, a momentum ported from
Keras, a bias wasted before every BN, dropout feeding BN, a model evaluated with
statistics that were never trained or no longer match the data.
:func:`diagnose` finds them and returns a list of :class:`Finding`, in module order
(``model.named_modules()``), then in the order of the codes below:

- ``bias-before-bn``: a Linear or Conv layer with a bias feeds a BN directly (a
  ``Flatten``, ``Unflatten`` or ``Identity`` in between is seen through: a reshape
  keeps the bias constant per BN channel). BN subtracts the mean, so the bias cancels
  and its gradient is zero: use ``bias=False``.
- ``keras-momentum``: a BN's ``momentum`` is above 0.5. PyTorch's momentum is the
  weight of the new batch, ``running = (1 - momentum) * running + momentum * stat``;
  Keras' is the weight of the old value, so Keras' 0.99 is PyTorch's 0.01.
- ``frozen-but-updating``: a BN's affine parameters all have ``requires_grad=False``,
  but it is in training mode and tracks running statistics, so every forward still
  moves them (and normalizes with batch statistics). Put it in eval mode, again after
  every ``model.train()``.
- ``dropout-before-bn``: a Dropout with ``p > 0`` feeds a BN directly or through one
  Linear or Conv layer; elementwise activations (ReLU, GELU, ...) and reshapes on the
  way are seen through, since they do not undo dropout's variance shift. Dropout
  scales the variance in training, not at test time, so the running variance does not
  match test-time inputs (Li et al., 2019): move dropout after the last BN, or
  recompute the statistics with dropout off.
- ``untrained-running-stats``: a BN in eval mode whose ``num_batches_tracked`` is 0
  and whose running statistics still hold their initial values (mean 0, variance 1):
  it was never trained, or a checkpoint did not load its buffers.
- ``stale-running-stats`` (needs ``x``): a BN in eval mode where this batch, normalized
  with the running statistics, is far from standard,

      x_hat = (x - running_mean) / sqrt(running_var + eps),  per channel c:
      m_c = |mean(x_hat_c)|,   v_c = var(x_hat_c)   (statistics over all dims but 1)

  flagged when ``median_c(m_c) > 1`` or ``median_c(v_c)`` is outside ``[1/4, 4]``: the
  data has shifted since the statistics were computed; recompute them on data like
  this (AdaBN). Not reported for a layer already reported as
  ``untrained-running-stats``.
- ``small-batch`` (needs ``x``): a BN normalizes with batch statistics (training mode,
  or ``track_running_stats=False``) from fewer than 8 examples (dim 0 of its input;
  for a Ghost BN, its virtual batch size where smaller): the statistics are noisy.

Without ``x`` the wiring (what feeds a BN) is read from ``nn.Sequential`` order, nested
Sequentials flattened; a custom module inside a Sequential is opaque. With ``x`` one
forward pass runs under hooks, and the wiring is read from the tensors themselves:
each module's input is traced to the module that produced that very tensor (same
object, unmodified since), so any ``nn.Module`` works. A tensor made by a functional
call (``torch.relu(x)``, ``x + y``, ``x.view(...)``) has no producing module and
hides the wiring before it; a layer that did not run in the forward keeps its
``nn.Sequential`` wiring.

Every BN class counts: subclasses of torch's ``_BatchNorm``, which include
``SyncBatchNorm``, the lazy BNs, and bnlib's ``BatchNorm1d/2d/3d``, ``BatchRenorm`` and
``GhostBatchNorm``.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.parameter import UninitializedTensorMixin

__all__ = ["CODES", "Finding", "Findings", "diagnose"]

CODES = (
    "bias-before-bn",
    "keras-momentum",
    "frozen-but-updating",
    "dropout-before-bn",
    "untrained-running-stats",
    "stale-running-stats",
    "small-batch",
)
"""The finding codes, in the order findings on one module are listed."""

MAX_MOMENTUM = 0.5  # above this a momentum is almost surely Keras' convention
MIN_BATCH = 8  # fewer examples than this give noisy batch statistics
MAX_MEAN_SHIFT = 1.0  # median_c |mean(x_hat_c)| above this: stale statistics
VAR_RATIO = (0.25, 4.0)  # median_c var(x_hat_c) outside this: stale statistics

_BN = (_BatchNorm,)  # torch's SyncBatchNorm, lazy BNs and bnlib's BNs all subclass it
_WEIGHTED = (nn.Linear, _ConvNd)  # nn.Bilinear is not a single-input layer
_RESHAPE = (nn.Identity, nn.Flatten, nn.Unflatten)  # keep a bias constant per channel
_ACTIVATION = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
    nn.LogSigmoid, nn.Tanh, nn.Tanhshrink, nn.Softplus, nn.Softsign,
)


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    """One problem :func:`diagnose` found.

    - code: a short stable string, one of :data:`CODES`.
    - module: the qualified name of the batch-norm layer, as ``model.named_modules()``
      gives it (``""`` for the model itself).
    - message: what is wrong, why it matters, and the fix.
    """

    code: str
    module: str
    message: str

    def __str__(self) -> str:
        return f"{self.module or '(model)'}: [{self.code}] {self.message}"


class Findings(list):
    """A list of :class:`Finding` that prints one per line and shows as a table in a
    notebook (``_repr_html_``, ``_repr_markdown_``)."""

    def __str__(self) -> str:
        if not self:
            return "No batch-norm problems found."
        return "\n".join(str(f) for f in self)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        if not self:
            return f"<p>{html.escape(str(self))}</p>"
        rows = "".join(
            f"<tr><td><code>{html.escape(f.module or '(model)')}</code></td>"
            f"<td><code>{html.escape(f.code)}</code></td>"
            f"<td>{html.escape(f.message)}</td></tr>"
            for f in self
        )
        return ("<table><thead><tr><th>module</th><th>code</th><th>message</th>"
                f"</tr></thead><tbody>{rows}</tbody></table>")

    def _repr_markdown_(self) -> str:
        if not self:
            return str(self)

        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        lines = ["| module | code | message |", "|---|---|---|"]
        lines += [f"| `{cell(f.module or '(model)')}` | `{f.code}` | "
                  f"{cell(f.message)} |" for f in self]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- wiring

# A wiring graph: module -> the modules that feed its (first) input; None stands for a
# source no module produced (the model's input, a functional call).
Graph = dict[nn.Module, set[nn.Module | None]]


def _flatten_sequential(seq: nn.Sequential) -> list[nn.Module]:
    """The layers of a Sequential in order, nested Sequentials expanded."""
    out: list[nn.Module] = []
    for m in seq:
        out += _flatten_sequential(m) if isinstance(m, nn.Sequential) else [m]
    return out


def _static_graph(model: nn.Module) -> Graph:
    """Wiring read from ``nn.Sequential`` order: each layer is fed by the one before."""
    graph: Graph = {}
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            layers = _flatten_sequential(seq)
            for prev, m in itertools.pairwise(layers):
                graph.setdefault(m, set()).add(prev)
    return graph


def _first_tensor(value) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, list | tuple):
        return next((v for v in value if isinstance(v, Tensor)), None)
    return None


class _Tracer:
    """Forward hooks that record, for each module, which module produced its input.

    A tensor's producer is the module that returned it. A leaf module always claims its
    output (``nn.Identity`` and dropout in eval mode return their input itself); a
    container claims it only when no module inside did, or when the tensor was changed
    in place since (its ``_version`` moved: an in-place ReLU, ``x.relu_()`` in a custom
    forward). An input changed in place by something no hook saw has no producer.
    """

    def __init__(self, model: nn.Module,
                 on_bn_input: Callable[[nn.Module, Tensor], None]) -> None:
        self.graph: Graph = {}
        # id(tensor) -> (tensor, its _version then, producer): holding the tensor keeps
        # its id from being reused by another tensor during the forward
        self.produced: dict[int, tuple[Tensor, int, nn.Module]] = {}
        self.on_bn_input = on_bn_input
        self.handles = []
        for m in dict.fromkeys(model.modules()):  # each module once, even if shared
            self.handles.append(m.register_forward_pre_hook(self._pre_hook))
            self.handles.append(m.register_forward_hook(self._hook))

    def _producer(self, t: Tensor) -> nn.Module | None:
        entry = self.produced.get(id(t))
        if entry is None or entry[0] is not t or entry[1] != t._version:
            return None
        return entry[2]

    def _pre_hook(self, module: nn.Module, args) -> None:
        t = _first_tensor(args)
        if t is None:
            return
        self.graph.setdefault(module, set()).add(self._producer(t))
        if isinstance(module, _BN):
            self.on_bn_input(module, t)

    def _hook(self, module: nn.Module, args, output) -> None:
        outputs = output if isinstance(output, list | tuple) else (output,)
        leaf = next(module.children(), None) is None
        for t in outputs:
            if not isinstance(t, Tensor):
                continue
            entry = self.produced.get(id(t))
            if leaf or entry is None or entry[0] is not t or entry[1] != t._version:
                self.produced[id(t)] = (t, t._version, module)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.produced.clear()


def _sources(
    m: nn.Module, graph: Graph, see_through: Callable[[nn.Module], bool]
) -> set[nn.Module | None]:
    """The modules feeding ``m``, looking through those ``see_through`` accepts."""
    out: set[nn.Module | None] = set()
    stack, seen = [m], {m}
    while stack:
        for p in graph.get(stack.pop(), ()):
            if p is not None and see_through(p):
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
            else:
                out.add(p)
    return out


def _is_reshape(m: nn.Module) -> bool:
    return isinstance(m, _RESHAPE) or (isinstance(m, _DropoutNd) and m.p == 0)


def _is_elementwise(m: nn.Module) -> bool:
    return _is_reshape(m) or isinstance(m, _ACTIVATION)


def _is_dropout(m: nn.Module | None) -> bool:
    return isinstance(m, _DropoutNd) and m.p > 0


# ---------------------------------------------------------------------------- checks


def _uninitialized(t: Tensor | None) -> bool:
    return isinstance(t, UninitializedTensorMixin)


def _has_initial_stats(bn: _BatchNorm) -> bool:
    """True when ``bn``'s running statistics are exactly what construction gives."""
    if _uninitialized(bn.running_mean):  # a lazy BN that never ran
        return True
    nbt = bn.num_batches_tracked
    return (nbt is None or int(nbt) == 0) \
        and bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all())


def _names(modules: Iterable[nn.Module | None], names: dict[nn.Module, str]) -> str:
    found = sorted(names.get(m, type(m).__name__) or "(model)" for m in modules)
    return ", ".join(f"'{n}'" for n in found)


def _wiring_findings(bn: _BatchNorm, graph: Graph,
                     names: dict[nn.Module, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    biased = [p for p in _sources(bn, graph, _is_reshape)
              if isinstance(p, _WEIGHTED) and p.bias is not None]
    if biased:
        found["bias-before-bn"] = (
            f"{_names(biased, names)} has a bias and feeds this BN directly: BN "
            "subtracts the mean, so the bias cancels and its gradient is zero; create "
            "the layer with bias=False (BN's beta is the bias).")
    dropouts: set[nn.Module | None] = set()
    for p in _sources(bn, graph, _is_elementwise):
        if _is_dropout(p):
            dropouts.add(p)
        elif isinstance(p, _WEIGHTED):
            dropouts |= {q for q in _sources(p, graph, _is_elementwise)
                         if _is_dropout(q)}
    if dropouts:
        found["dropout-before-bn"] = (
            f"dropout {_names(dropouts, names)} feeds this BN: it changes the variance "
            "in training but not at test time, so the running variance will not match "
            "test-time inputs (variance shift); move dropout after the last BN, or "
            "recompute the statistics with dropout off "
            "(bnlib.train.recompute_bn_statistics).")
    return found


def _attribute_findings(bn: _BatchNorm) -> dict[str, str]:
    found: dict[str, str] = {}
    if bn.momentum is not None and bn.momentum > MAX_MOMENTUM:
        found["keras-momentum"] = (
            f"momentum={bn.momentum:g}: PyTorch's momentum is the weight of the new "
            "batch, running = (1 - momentum) * running + momentum * batch, the "
            f"opposite of Keras'; Keras' {bn.momentum:g} is PyTorch's "
            f"{1 - bn.momentum:.2g}.")
    affine = [p for p in (bn.weight, bn.bias) if p is not None]
    tracks = bn.track_running_stats and bn.running_mean is not None
    if affine and not any(p.requires_grad for p in affine) and bn.training and tracks:
        found["frozen-but-updating"] = (
            "its weight and bias are frozen (requires_grad=False) but it is in "
            "training mode, so every forward still normalizes with batch statistics "
            "and moves its running statistics; call .eval() on it, again after every "
            "model.train().")
    if not bn.training and tracks and _has_initial_stats(bn):
        found["untrained-running-stats"] = (
            "it is in eval mode but its running statistics were never updated "
            "(num_batches_tracked is 0, mean 0, variance 1), so it normalizes with "
            "made-up statistics; train it, recompute them "
            "(bnlib.train.recompute_bn_statistics), or check that the checkpoint "
            "loaded its buffers.")
    return found


class _BatchStats:
    """What a BN saw in the traced forward: its smallest batch, its worst shift."""

    def __init__(self) -> None:
        self.min_batch: int | None = None
        # (median_c |mean(x_hat_c)|, median_c var(x_hat_c)) of the worst call seen
        self.shift: tuple[float, float] | None = None

    @staticmethod
    def _badness(shift: tuple[float, float]) -> float:
        """How far past its threshold the worse of the two is (> 1: stale)."""
        m, v = shift
        lo, hi = VAR_RATIO
        return max(m / MAX_MEAN_SHIFT, v / hi, lo / v if v > 0 else math.inf)

    def record(self, bn: _BatchNorm, x: Tensor) -> None:
        if x.dim() < 2:
            return
        if bn.training or bn.running_mean is None:  # normalizes with batch statistics
            n = x.shape[0]
            vbs = getattr(bn, "virtual_batch_size", None)  # bnlib's Ghost BN
            if isinstance(vbs, int):
                n = min(n, vbs)
            self.min_batch = n if self.min_batch is None else min(self.min_batch, n)
        elif x.numel() > x.shape[1]:  # eval mode, at least 2 values per channel
            dims = [0] + list(range(2, x.dim()))  # (N, C, ...) -> (C,)
            var_B, mu_B = torch.var_mean(x.float(), dims, correction=0)
            running_var = bn.running_var.float() + bn.eps
            m_c = (mu_B - bn.running_mean.float()).abs() / running_var.sqrt()  # (C,)
            v_c = var_B / running_var  # (C,)
            shift = (m_c.median().item(), v_c.median().item())
            if self.shift is None or self._badness(shift) > self._badness(self.shift):
                self.shift = shift

    def findings(self) -> dict[str, str]:
        found: dict[str, str] = {}
        lo, hi = VAR_RATIO
        if self.shift is not None and self._badness(self.shift) > 1:
            m, v = self.shift
            found["stale-running-stats"] = (
                "this batch, normalized with the running statistics, has a median "
                f"|mean| of {m:.3g} (expected <= {MAX_MEAN_SHIFT:g}) and variance "
                f"{v:.3g} (expected in [{lo:g}, {hi:g}]): "
                "the data has shifted since they were computed; recompute them on data "
                "like this (AdaBN: bnlib.train.recompute_bn_statistics).")
        if self.min_batch is not None and self.min_batch < MIN_BATCH:
            found["small-batch"] = (
                f"it normalizes with the statistics of {self.min_batch} example(s) "
                f"(fewer than {MIN_BATCH}), which are noisy and differ from the "
                "running ones; use GroupNorm, Batch Renorm (bnlib.renorm) or "
                "SyncBatchNorm across devices, or a larger batch (split into ghost "
                "batches with bnlib.ghost where small-batch noise helped).")
        return found


# -------------------------------------------------------------------------- diagnose


@torch.no_grad()
def _traced_forward(model: nn.Module, x: Tensor,
                    stats: dict[nn.Module, _BatchStats]) -> Graph:
    """Run ``model(x)`` under hooks and return its wiring; the model is left exactly as
    it was (parameters, buffers, train/eval modes, the random number generators)."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(table, name, t, t.detach().clone())  # table: a module's _buffers, ...
             for owner in dict.fromkeys(model.modules())
             for table in (owner._parameters, owner._buffers)
             for name, t in table.items() if t is not None]
    tracer = _Tracer(model, lambda bn, t: stats[bn].record(bn, t))
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model(x)
        return tracer.graph
    finally:
        tracer.remove()
        for table, name, t, copy in saved:
            table[name] = t  # the forward may have rebound the attribute
            # copy back only what changed (torch's kernels update running statistics
            # without bumping _version, so compare values): a needless in-place copy
            # would break a pending backward through an unchanged tensor
            if not torch.equal(t, copy):
                t.copy_(copy)
        for m, training in modes:
            m.training = training


def diagnose(model: nn.Module, x: Tensor | None = None) -> Findings:
    """Look at ``model`` (and, optionally, one batch ``x``) and report its silent
    batch-norm bugs: what is wrong, why, and how to fix it.

    - model: any ``nn.Module``, on any device; it is never changed (parameters,
      buffers, ``num_batches_tracked``, train/eval modes and the global random state
      are exactly as before the call, also when the forward raises).
    - x: optional, a batch the model accepts (``model(x)``), on the model's device.
      With it one forward pass runs, without gradients and in the model's current
      mode, to see the wiring through the actual tensors and the statistics at each
      BN input (which enables ``stale-running-stats`` and ``small-batch``). An error
      from the forward propagates, after the model is restored. During the forward a
      copy of the parameters and buffers is held, to restore them.

    Returns a :class:`Findings` list of :class:`Finding` (``code``, ``module``,
    ``message``), in ``model.named_modules()`` order and, on one module, in the order
    of :data:`CODES`; it is empty for a model without problems or without batch norm.
    The codes and their rules are listed in this module's docstring.

    A model with uninitialized lazy modules is checked without ``x`` only (a forward
    would initialize them): passing ``x`` raises ``ValueError``.
    """
    names = {m: name for name, m in model.named_modules()}
    bns = [m for m in names if isinstance(m, _BN)]
    if not bns:
        return Findings()
    graph = _static_graph(model)
    stats = {bn: _BatchStats() for bn in bns}
    if x is not None:
        lazy = any(_uninitialized(t)
                   for t in itertools.chain(model.parameters(), model.buffers()))
        if lazy:
            raise ValueError(
                "the model has uninitialized lazy modules, which a forward would "
                "initialize; run one forward first, or call diagnose without x")
        graph.update(_traced_forward(model, x, stats))
    findings = Findings()
    for bn in bns:
        found = {**_wiring_findings(bn, graph, names), **_attribute_findings(bn),
                 **stats[bn].findings()}
        if "untrained-running-stats" in found:
            found.pop("stale-running-stats", None)  # the same cause, already said
        findings += [Finding(code, names[bn], found[code])
                     for code in CODES if code in found]
    return findings
