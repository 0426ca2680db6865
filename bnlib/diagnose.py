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
- ``dropout-before-bn``: a Dropout with ``p > 0`` (any kind but ``AlphaDropout`` and
  ``FeatureAlphaDropout``, which keep mean and variance by design), or a functional
  ``F.dropout``, feeds a BN directly or through one Linear or Conv layer; elementwise
  activations (ReLU, GELU, ...), reshapes, ``torch.cat`` and ``+`` on the way are seen
  through, since they do not undo dropout's variance shift. Dropout scales the
  variance in training, not at test time, so the running variance does not match
  test-time inputs (Li et al., 2019): move dropout after the last BN, or recompute the
  statistics with dropout off.
- ``untrained-running-stats``: a BN in eval mode whose ``num_batches_tracked`` is 0
  and whose running statistics still hold their initial values (mean 0, variance 1):
  it was never trained, or a checkpoint did not load its buffers.
- ``stale-running-stats`` (needs ``x``): a BN in eval mode whose running statistics
  are far from this batch's, compared like with like and against the spread sampling
  alone gives at this batch size. Per channel c, over all dims but 1, with N examples:

      d_c = |mean_B,c - running_mean_c| / sqrt(running_var_c + eps)
      r   = mean_c (var_B,c + eps) / (running_var_c + eps)   (var_B unbiased)

  flagged when ``median_c(d_c) > 1 + 1.5 / sqrt(N)`` or ``r`` is outside ``[1/4, 4]``
  widened by 4 sampling standard deviations, ``sqrt(2 / ((N - 1) C))`` (the variance
  is not compared for N = 1). eps on both sides: a running variance far below eps (as
  in MobileNet) is no alarm. Correct statistics give no finding at any batch size;
  the data has shifted since they were computed: recompute them on data like this
  (AdaBN). Not reported for a layer already reported as ``untrained-running-stats``.
- ``small-batch`` (needs ``x``): a BN normalizes with batch statistics (training mode,
  or ``track_running_stats=False``) from fewer than 8 examples (dim 0 of its input;
  for a Ghost BN, its virtual batch size where smaller; for a SyncBatchNorm in
  training, the batch over all its processes): the statistics are noisy.

Without ``x`` the wiring (what feeds a BN) is read by tracing the model with
``torch.fx.symbolic_trace`` (nothing runs: forward sees proxies; the model is put
back as it was), which sees custom forwards and functional calls; where the model does
not trace (data-dependent control flow), from ``nn.Sequential`` order, nested
Sequentials flattened. With ``x`` one forward pass runs on a copy of ``x`` under hooks
and a ``TorchFunctionMode``, and the wiring is read from the tensors themselves: each
module's input is traced to the module or functional call (``F.dropout``,
``torch.cat``, ``x + y``, ``h.relu_()``) that produced that very tensor (same object,
unmodified since), so any ``nn.Module`` works; calls inside a leaf module (a Linear, a
BN) are its implementation, not wiring. A layer that did not run keeps its
``nn.Sequential`` wiring. A Linear or Conv whose output also feeds another path
(``bn(h) + h``) is not ``bias-before-bn``: its bias does not cancel.

The probe never issues a collective: a SyncBatchNorm normalizes with this process's
statistics during it, and a ``DistributedDataParallel`` wrapper's forward (which
broadcasts buffers) is bypassed for its module's, so ``diagnose`` may run on one rank.

Every BN class counts: subclasses of torch's ``_BatchNorm``, which include
``SyncBatchNorm``, the lazy BNs, and bnlib's ``BatchNorm1d/2d/3d``, ``BatchRenorm`` and
``GhostBatchNorm``.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedTensorMixin

from ._wiring import (
    _BN,
    _WEIGHTED,
    Graph,
    _fx_graph,
    _is_dropout,
    _is_elementwise,
    _is_reshape,
    _only_feeds_bn,
    _Op,
    _sources,
    _static_graph,
    _Tracer,
    _users,
)

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


def _names(modules: Iterable[object], names: dict[nn.Module, str]) -> str:
    found = sorted(f"'{names.get(m, type(m).__name__) or '(model)'}'"
                   if not isinstance(m, _Op) else m.label for m in modules)
    return ", ".join(found)


def _wiring_findings(bn: _BatchNorm, graph: Graph,
                     names: dict[nn.Module, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    users = _users(graph)
    biased = [p for p in _sources(bn, graph, _is_reshape)
              if isinstance(p, _WEIGHTED) and p.bias is not None
              and _only_feeds_bn(p, users)]
    if biased:
        found["bias-before-bn"] = (
            f"{_names(biased, names)} has a bias and feeds this BN directly: BN "
            "subtracts the mean, so the bias cancels and its gradient is zero; create "
            "the layer with bias=False (BN's beta is the bias).")
    dropouts: set[object] = set()
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


def _is_sync(bn: nn.Module) -> bool:
    """A batch norm that synchronizes statistics across processes in training (torch's
    SyncBatchNorm, bnlib's: both have a ``process_group``)."""
    return isinstance(bn, nn.SyncBatchNorm) or (
        isinstance(bn, _BN) and hasattr(bn, "process_group")
        and hasattr(bn, "convert_sync_batchnorm"))


def _world(bn: nn.Module) -> int:
    """How many processes a SyncBatchNorm's statistics span (1 outside a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    group = bn.process_group or dist.group.WORLD
    return max(dist.get_world_size(group), 1)


class _BatchStats:
    """What a BN saw in the traced forward: its smallest batch, its worst shift."""

    def __init__(self) -> None:
        self.min_batch: int | None = None
        self.sync_world = 1  # > 1: min_batch counts the batch over that many processes
        # (median_c |mean shift|, pooled variance ratio, their limits) of the worst call
        self.shift: tuple[float, float, float, tuple[float, float]] | None = None

    @staticmethod
    def _badness(shift) -> float:
        """How far past its limit the worse of the two is (> 1: stale)."""
        m, v, m_max, (lo, hi) = shift
        return max(m / m_max, v / hi, lo / v if v > 0 else math.inf)

    def record(self, bn: _BatchNorm, x: Tensor) -> None:
        if x.dim() < 2:
            return
        if bn.training or bn.running_mean is None:  # normalizes with batch statistics
            n = x.shape[0]
            vbs = getattr(bn, "virtual_batch_size", None)  # bnlib's Ghost BN
            if isinstance(vbs, int):
                n = min(n, vbs)
            if bn.training and _is_sync(bn):  # the statistics of every process's batch
                self.sync_world = _world(bn)
                n *= self.sync_world
            self.min_batch = n if self.min_batch is None else min(self.min_batch, n)
        elif x.numel() > 0:  # eval mode
            self._record_shift(bn, x)

    def _record_shift(self, bn: _BatchNorm, x: Tensor) -> None:
        """Compare like with like, against the spread sampling alone gives.

        Mean: d_c = |mean_B - running_mean| / sqrt(running_var + eps); sampling alone
        gives about 1 / sqrt(N) (N examples), so the limit is 1 + 1.5 / sqrt(N).
        Variance: r_c = (s2_B + eps) / (running_var + eps), with s2_B the unbiased
        batch variance: eps on both sides (a running variance far below eps, as in
        MobileNet's layers, is then no alarm), and E[r_c] = 1 for correct statistics.
        Its mean over the C channels has a sampling spread of about sqrt(2 / (k C)),
        k = N - 1; the limits [1/4, 4] widen by 4 of those. With one example per
        batch the variance (of spatial positions only) is not compared."""
        n = x.shape[0]
        m = x.numel() // x.shape[1]  # values per channel
        dims = [0] + list(range(2, x.dim()))  # (N, C, ...) -> (C,)
        var_B, mu_B = torch.var_mean(x.float(), dims, correction=1 if m > 1 else 0)
        denom = bn.running_var.float() + bn.eps  # (C,)
        d_c = (mu_B - bn.running_mean.float()).abs() / denom.sqrt()  # (C,)
        m_max = MAX_MEAN_SHIFT + 1.5 / math.sqrt(n)
        lo, hi = VAR_RATIO
        if n > 1 and m > 1:
            r = ((var_B + bn.eps) / denom).mean().item()  # pooled over channels
            spread = 4 * math.sqrt(2 / ((n - 1) * x.shape[1]))
            lo, hi = max(min(lo, 1 - spread), 0.0), max(hi, 1 + spread)
        else:
            r = 1.0  # nothing to compare
        shift = (d_c.median().item(), r, m_max, (lo, hi))
        if self.shift is None or self._badness(shift) > self._badness(self.shift):
            self.shift = shift

    def findings(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.shift is not None and self._badness(self.shift) > 1:
            m, v, m_max, (lo, hi) = self.shift
            found["stale-running-stats"] = (
                "this batch, compared with the running statistics, has a median "
                f"|mean shift| of {m:.3g} running standard deviations (expected <= "
                f"{m_max:.3g} at this batch size) and a variance ratio (batch + eps) / "
                f"(running + eps) of {v:.3g} (expected in [{lo:.3g}, {hi:.3g}]): "
                "the data has shifted since they were computed; recompute them on data "
                "like this (AdaBN: bnlib.train.recompute_bn_statistics).")
        if self.min_batch is not None and self.min_batch < MIN_BATCH:
            if self.sync_world > 1:
                found["small-batch"] = (
                    f"it normalizes with the statistics of {self.min_batch} example(s) "
                    f"over its {self.sync_world} processes (fewer than {MIN_BATCH}), "
                    "which are noisy and differ from the running ones; use GroupNorm "
                    "or Batch Renorm (bnlib.nn.BatchRenorm1d/2d), more processes, or "
                    "a larger batch on each.")
            else:
                found["small-batch"] = (
                    f"it normalizes with the statistics of {self.min_batch} example(s) "
                    f"(fewer than {MIN_BATCH}), which are noisy and differ from the "
                    "running ones; use GroupNorm, Batch Renorm "
                    "(bnlib.nn.BatchRenorm1d/2d) or SyncBatchNorm across devices, or "
                    "a larger batch (split into ghost batches with "
                    "bnlib.nn.GhostBatchNorm1d/2d where small-batch noise helped).")
        return found


# -------------------------------------------------------------------------- diagnose


def _local_forward(bn: _BatchNorm) -> Callable[[Tensor], Tensor]:
    """A SyncBatchNorm's forward with this process's statistics only: the probe must
    never issue a collective (called on one rank, it would block until the process
    group's timeout). Running statistics are not moved (momentum 0)."""
    def forward(x: Tensor) -> Tensor:
        bn_training = bn.training or bn.running_mean is None
        use = not bn.training or bn.track_running_stats
        return nn.functional.batch_norm(
            x, bn.running_mean if use else None, bn.running_var if use else None,
            bn.weight, bn.bias, bn_training, 0.0, bn.eps)
    return forward


@contextlib.contextmanager
def _preserved(model: nn.Module):
    """Run the block and put the model back exactly as it was: buffers (values and
    bindings), train/eval modes, the random number generators. Parameters are not
    copied (memory): no forward without gradients changes them."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(owner._buffers, name, t, t.detach().clone())
             for owner in dict.fromkeys(model.modules())
             for name, t in owner._buffers.items() if t is not None]
    devices = [t.device for *_, t, _c in saved if t.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for table, name, t, copy in saved:
            table[name] = t  # the forward may have rebound the attribute
            # copy back only what changed (torch's kernels update running statistics
            # without bumping _version, so compare values): a needless in-place copy
            # would break a pending backward through an unchanged tensor
            if not torch.equal(t, copy):
                t.copy_(copy)
        for m, training in modes:
            m.training = training


@torch.no_grad()
def _traced_forward(model: nn.Module, x: Tensor,
                    stats: dict[nn.Module, _BatchStats]) -> Graph:
    """Run the model on a copy of ``x`` under hooks and a function mode, and return its
    wiring; the model is left exactly as it was (see _preserved), and so is x. No
    collective is issued: SyncBatchNorms use local statistics, and a
    DistributedDataParallel wrapper's own forward (which broadcasts buffers) is
    skipped for its module's."""
    syncs = [m for m in dict.fromkeys(model.modules()) if _is_sync(m)]
    tracer = _Tracer(model, lambda bn, t: stats[bn].record(bn, t))
    run = model.module if isinstance(model, nn.parallel.DistributedDataParallel) \
        else model
    try:
        for m in syncs:
            m.forward = _local_forward(m)  # an instance attribute, deleted below
        with _preserved(model), tracer:
            run(x.clone())  # an in-place first layer must not change the caller's x
        return tracer.graph
    finally:
        tracer.remove()
        for m in syncs:
            m.__dict__.pop("forward", None)


def diagnose(model: nn.Module, x: Tensor | None = None) -> Findings:
    """Look at ``model`` (and, optionally, one batch ``x``) and report its silent
    batch-norm bugs: what is wrong, why, and how to fix it.

    - model: any ``nn.Module``, on any device; it is never changed (parameters,
      buffers, ``num_batches_tracked``, train/eval modes and the global random state
      are exactly as before the call, also when the forward raises).
    - x: optional, a batch the model accepts (``model(x)``), on the model's device.
      With it one forward pass runs, without gradients and in the model's current
      mode, to see the wiring through the actual tensors and the statistics at each
      BN input (which enables ``stale-running-stats`` and ``small-batch``). The
      forward runs on a copy of x (x itself is never changed) and issues no
      collective. An error from the forward propagates, after the model is restored.
      During the forward a copy of the buffers (not of the parameters) is held, to
      restore them.

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
    lazy = any(_uninitialized(t)
               for t in itertools.chain(model.parameters(), model.buffers()))
    if x is None and not lazy:  # FX sees custom forwards and functional calls
        with _preserved(model):  # FX runs forward's Python code (on proxies)
            traced = _fx_graph(model)
        if traced is not None:
            graph = {**graph, **traced}
    stats = {bn: _BatchStats() for bn in bns}
    if x is not None:
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
