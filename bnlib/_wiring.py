"""The wiring of a model, for :mod:`bnlib.diagnose`: what feeds each batch norm.

Three readers, from the cheapest: ``nn.Sequential`` order (:func:`_static_graph`),
``torch.fx.symbolic_trace`` (:func:`_fx_graph`: custom forwards and functional calls,
nothing runs), and one forward pass under hooks and a ``TorchFunctionMode``
(:class:`_Tracer`: the tensors themselves). Each gives a graph, module (or functional
call, an :class:`_Op`) -> what feeds it; the predicates below classify the nodes.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

# ---------------------------------------------------------------------------- wiring

# A wiring graph: module (or functional call, an _Op) -> the modules and calls that feed
# its (first) input; None stands for a source nothing traced produced (the input).
Graph = dict[object, set[object]]


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


def _tensors(value) -> list[Tensor]:
    """The tensors in a call's arguments (lists and tuples opened, one level)."""
    out = []
    for v in value:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, list | tuple):
            out += [t for t in v if isinstance(t, Tensor)]
    return out


class _Tracer(TorchFunctionMode):
    """Forward hooks that record, for each module, which module produced its input, and
    a ``TorchFunctionMode`` that records the functional calls between modules.

    A tensor's producer is the module or functional call that returned it. A leaf
    module always claims its output (``nn.Identity`` and dropout in eval mode return
    their input itself); a container claims it only when nothing inside did, or when
    the tensor was changed in place since (its ``_version`` moved). Functional calls
    (``F.dropout``, ``torch.cat``, ``x + y``, ``h.relu_()``) are recorded where a
    container's own forward makes them; inside a leaf module (a Linear, a BN) they are
    its implementation, not wiring.
    """

    def __init__(self, model: nn.Module,
                 on_bn_input: Callable[[nn.Module, Tensor], None]) -> None:
        super().__init__()
        self.graph: Graph = {}
        # id(tensor) -> (tensor, its _version then, producer): holding the tensor keeps
        # its id from being reused by another tensor during the forward
        self.produced: dict[int, tuple[Tensor, int, object]] = {}
        self.on_bn_input = on_bn_input
        self.names = {m: name for name, m in model.named_modules()}
        self.stack: list[nn.Module] = []  # the modules whose forward is running
        self.paused = False  # our own arithmetic (BN input statistics) is not wiring
        self.handles = []
        for m in dict.fromkeys(model.modules()):  # each module once, even if shared
            self.handles.append(m.register_forward_pre_hook(self._pre_hook))
            self.handles.append(m.register_forward_hook(self._hook))

    def _producer(self, t: Tensor) -> object:
        entry = self.produced.get(id(t))
        if entry is None or entry[0] is not t or entry[1] != t._version:
            return None
        return entry[2]

    def _pre_hook(self, module: nn.Module, args) -> None:
        self.stack.append(module)
        t = _first_tensor(args)
        if t is None:
            return
        self.graph.setdefault(module, set()).add(self._producer(t))
        if isinstance(module, _BN):
            self.paused = True
            try:
                self.on_bn_input(module, t)
            finally:
                self.paused = False

    def _hook(self, module: nn.Module, args, output) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        outputs = output if isinstance(output, list | tuple) else (output,)
        leaf = next(module.children(), None) is None
        for t in outputs:
            if not isinstance(t, Tensor):
                continue
            entry = self.produced.get(id(t))
            if leaf or entry is None or entry[0] is not t or entry[1] != t._version:
                self.produced[id(t)] = (t, t._version, module)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inside = self.stack[-1] if self.stack else None
        record = not self.paused and (
            inside is None or next(inside.children(), None) is not None)
        inputs = _tensors((*args, *kwargs.values())) if record else []
        sources = {self._producer(t) for t in inputs}  # before an in-place op
        versions = {id(t): t._version for t in inputs}
        out = func(*args, **kwargs)
        t = _first_tensor(out)
        if not inputs or t is None:
            return out  # a factory, a shape query, or a leaf module's own arithmetic
        if versions.get(id(t)) == t._version and any(t is i for i in inputs):
            return out  # an input returned unchanged (x.float() of a float tensor)
        name = func.__name__ if callable(func) else str(func)
        op = _op(name if isinstance(func, str) else func, args, kwargs,
                 self.names.get(inside, "") if inside is not None else "")
        self.graph[op] = sources
        self.produced[id(t)] = (t, t._version, op)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.produced.clear()


def _sources(
    m: object, graph: Graph, see_through: Callable[[object], bool]
) -> set[object]:
    """The modules and calls feeding ``m``, looking through those ``see_through``
    accepts."""
    out: set[object] = set()
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


def _users(graph: Graph) -> dict[object, set[object]]:
    """The graph reversed: each module or call -> what its output feeds."""
    users: dict[object, set[object]] = {}
    for node, sources in graph.items():
        for p in sources:
            users.setdefault(p, set()).add(node)
    return users


def _only_feeds_bn(p: object, users: dict[object, set[object]]) -> bool:
    """True when everything ``p``'s output feeds, through reshapes, is a batch norm:
    then BN's mean subtraction cancels p's bias. A use on another path (``bn(h) + h``)
    keeps it."""
    stack, seen = [p], {p}
    while stack:
        node = stack.pop()
        if node is not p and not users.get(node):
            return False  # a reshape of p's output is itself an output
        for u in users.get(node, ()):
            if isinstance(u, _BN):
                continue
            if not _is_reshape(u):
                return False
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return True


def _is_reshape(m: object) -> bool:
    if isinstance(m, _Op):
        return m.kind == "reshape" or (m.kind == "dropout" and m.p == 0)
    return isinstance(m, _RESHAPE) or (isinstance(m, _DropoutNd) and m.p == 0)


def _is_elementwise(m: object) -> bool:
    if isinstance(m, _Op):
        return _is_reshape(m) or m.kind == "elementwise"
    return _is_reshape(m) or isinstance(m, _ACTIVATION)


def _is_dropout(m: object) -> bool:
    """Dropout that shifts the variance: not AlphaDropout/FeatureAlphaDropout, which
    keep mean and variance by design (SELU networks)."""
    if isinstance(m, _Op):
        return m.kind == "dropout" and m.p > 0
    return isinstance(m, _DropoutNd) and m.p > 0 \
        and not isinstance(m, nn.AlphaDropout | nn.FeatureAlphaDropout)




_BN = (_BatchNorm,)  # torch's SyncBatchNorm, lazy BNs and bnlib's BNs all subclass it
_WEIGHTED = (nn.Linear, _ConvNd)  # nn.Bilinear is not a single-input layer
_RESHAPE = (nn.Identity, nn.Flatten, nn.Unflatten)  # keep a bias constant per channel
_ACTIVATION = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
    nn.LogSigmoid, nn.Tanh, nn.Tanhshrink, nn.Softplus, nn.Softsign,
)

# Functional calls by name (torch functions, Tensor methods, operators), by what they
# do to the wiring: dropout (variance shift), reshapes (keep a bias constant per
# channel: seen through for both rules), elementwise (seen through for dropout only).
_DROPOUT_FUNCTIONS = {"dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d",
                      "feature_dropout", "feature_dropout_"}  # not alpha_dropout
_RESHAPE_FUNCTIONS = {"view", "reshape", "flatten", "unflatten", "squeeze",
                      "unsqueeze", "contiguous", "clone", "cat", "concat",
                      "concatenate", "add", "add_", "iadd", "__add__", "__iadd__",
                      "__radd__", "permute", "transpose", "movedim", "to", "float",
                      "detach"}
_ELEMENTWISE_FUNCTIONS = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu",
    "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh",
    "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus", "logsigmoid",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
}


class _Op:
    """A functional call in the wiring graph (``F.dropout``, ``torch.cat``, ``x + y``,
    ``h.relu_()``): what it does to the wiring (``kind``: "dropout", "reshape",
    "elementwise" or "other"), its dropout rate, and a label for messages."""

    __slots__ = ("kind", "p", "label")

    def __init__(self, kind: str, p: float, label: str) -> None:
        self.kind, self.p, self.label = kind, p, label

    def __repr__(self) -> str:
        return self.label


def _function_name(func) -> str:
    if func in (operator.add, operator.iadd):
        return "add"
    return getattr(func, "__name__", str(func)).removesuffix("_default")


def _op(func, args, kwargs, where: str) -> _Op:
    """The _Op for a call of ``func`` (a function, or a Tensor method's name)."""
    name = func if isinstance(func, str) else _function_name(func)
    if name in _DROPOUT_FUNCTIONS:
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        p = float(p) if isinstance(p, int | float) else 0.5
        kind = "dropout"
    else:
        p = 0.0
        kind = ("reshape" if name in _RESHAPE_FUNCTIONS else
                "elementwise" if name in _ELEMENTWISE_FUNCTIONS else "other")
    label = f"{name}(p={p:g})" if kind == "dropout" else name
    return _Op(kind, p, f"functional {label} in '{where}'" if where else
               f"functional {label}")


def _fx_graph(model: nn.Module) -> Graph | None:
    """The wiring of ``model`` from ``torch.fx.symbolic_trace``, functional calls
    included (``F.dropout``, ``torch.cat``, ``+``), or None where it does not trace
    (data-dependent control flow, ...). Nothing runs: FX calls forward on proxies."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any model FX cannot trace: use Sequentials
        return None
    modules = dict(model.named_modules())
    node_of: dict[torch.fx.Node, object] = {}
    graph: Graph = {}
    for node in traced.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            node_of[node] = None
            continue
        if node.op == "output":
            continue
        if node.op == "call_module":
            obj = modules[node.target]
            first = node.args[0] if node.args else None
            inputs = [first] if isinstance(first, torch.fx.Node) else []
        else:  # call_function, call_method
            stack = list(node.meta.get("nn_module_stack", {}))
            obj = _op(node.target, node.args, node.kwargs, stack[-1] if stack else "")
            inputs = node.all_input_nodes
        graph.setdefault(obj, set()).update({node_of.get(a) for a in inputs} or {None})
        node_of[node] = obj
    return graph
