"""bnlib.nn.BatchNorm1d/2d/3d against torch.nn's: construction, state_dict, outputs,
gradients, running statistics, dtypes, layouts, errors (with no state changed),
gradcheck, torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch
from checks import GRADS, assert_all_close, named
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlib import nn as bnn

CLASSES = {
    "1d-2D": (bnn.BatchNorm1d, torch.nn.BatchNorm1d, (8, 5)),
    "1d-3D": (bnn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 5, 7)),
    "2d": (bnn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 6, 7)),
    "3d": (bnn.BatchNorm3d, torch.nn.BatchNorm3d, (3, 5, 4, 3, 5)),
}
CONFIGS = [
    dict(momentum=m, affine=a, track_running_stats=t, bias=b)
    for m, a, t, b in itertools.product([0.1, None], [True, False], [True, False],
                                        [True, False])
    if a or b  # bias=False only matters with affine=True
]


def _pair(kind, device="cpu", dtype=torch.float64, **kwargs):
    ours_cls, ref_cls, shape = CLASSES[kind]
    ours = ours_cls(shape[1], device=device, dtype=dtype, **kwargs)
    ref = ref_cls(shape[1], device=device, dtype=dtype, **kwargs)
    with torch.no_grad():  # non-trivial parameters and statistics, the same in both
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
        if ours.track_running_stats:
            ours.running_mean.uniform_(-1, 1)
            ours.running_var.uniform_(0.5, 2)
    ref.load_state_dict(ours.state_dict())
    return ours, ref, shape


def _assert_same_state(ours, ref, atol):
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o) == list(sd_r)
    for key in sd_r:
        assert sd_o[key].dtype == sd_r[key].dtype, key
        torch.testing.assert_close(sd_o[key], sd_r[key], atol=atol, rtol=atol,
                                   msg=named(key))


def _step(module, x, dy):
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y.detach(), grads


def _assert_same_step(ours, ref, x, dy, atol):
    y_o, g_o = _step(ours, x, dy)
    y_r, g_r = _step(ref, x, dy)
    assert y_o.dtype == y_r.dtype and y_o.shape == y_r.shape
    assert y_o.is_contiguous() == y_r.is_contiguous()
    torch.testing.assert_close(y_o, y_r, atol=atol, rtol=atol)
    assert_all_close(g_o, g_r, GRADS[:len(g_o)], atol=atol, rtol=atol)
    _assert_same_state(ours, ref, atol)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("kind", CLASSES)
def test_matches_torch_float64_train_then_eval(device, kind, config):
    ours, ref, shape = _pair(kind, device, **config)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64, device=device) * (1 + step) + step
        dy = torch.randn(shape, dtype=torch.float64, device=device)
        _assert_same_step(ours, ref, x, dy, atol=1e-12)
    ours.eval()
    ref.eval()
    _assert_same_step(ours, ref, x, dy, atol=1e-12)


@pytest.mark.parametrize("kind", CLASSES)
def test_same_constructor_parameters_buffers_and_repr(kind):
    for kwargs in CONFIGS:
        ours, ref, _ = _pair(kind, **kwargs)
        assert [n for n, _ in ours.named_parameters()] == \
            [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == \
            [n for n, _ in ref.named_buffers()]
        assert ours.extra_repr() == ref.extra_repr()
        for attr in ("num_features", "eps", "momentum", "affine",
                     "track_running_stats"):
            assert getattr(ours, attr) == getattr(ref, attr)


@pytest.mark.parametrize("kind", CLASSES)
def test_state_dicts_load_both_ways(kind):
    for kwargs in CONFIGS:
        ours, ref, shape = _pair(kind, **kwargs)
        ref.train()
        ref(torch.randn(shape, dtype=torch.float64))  # move ref's statistics on
        ours.load_state_dict(ref.state_dict(), strict=True)
        _assert_same_state(ours, ref, atol=0)
        fresh_ref = CLASSES[kind][1](shape[1], dtype=torch.float64, **kwargs)
        fresh_ref.load_state_dict(ours.state_dict(), strict=True)
        _assert_same_state(ours, fresh_ref, atol=0)


def test_state_dict_dtypes_default_float32():
    sd_o, sd_r = bnn.BatchNorm2d(3).state_dict(), torch.nn.BatchNorm2d(3).state_dict()
    assert {k: (v.dtype, v.shape) for k, v in sd_o.items()} == \
        {k: (v.dtype, v.shape) for k, v in sd_r.items()}


def test_old_checkpoint_without_num_batches_tracked_loads():
    """A version-1 checkpoint (before num_batches_tracked existed) loads as in torch."""
    sd = torch.nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    ours, ref = bnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for m in (ours, ref):
        m.num_batches_tracked.fill_(7)
        m.load_state_dict(sd)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_reset_parameters_and_running_stats():
    m = bnn.BatchNorm1d(4)
    m(torch.randn(8, 4))
    with torch.no_grad():
        m.weight.fill_(3)
    m.reset_parameters()
    ref = torch.nn.BatchNorm1d(4)
    _assert_same_state(m, ref, atol=0)


@pytest.mark.parametrize("kind", CLASSES)
def test_float32_matches_torch(device, kind):
    ours, ref, shape = _pair(kind, device, dtype=torch.float32)
    for _ in range(2):
        x = torch.randn(shape, device=device) * 3 + 1
        dy = torch.randn(shape, device=device)
        _assert_same_step(ours, ref, x, dy, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["1d-2D", "2d"])
def test_reduced_precision_inputs_accumulate_in_float32(device, kind, dtype):
    """Half/bfloat16 input with float32 parameters, as in autocast: same dtypes as
    torch, values equal to a float32 computation within the input's rounding."""
    ours, ref, shape = _pair(kind, device, dtype=torch.float32)
    x = (torch.randn(shape, device=device) * 2 + 1).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    y_o, g_o = _step(ours, x, dy)
    y_r, g_r = _step(ref, x, dy)
    assert y_o.dtype == y_r.dtype == dtype
    assert [g.dtype for g in g_o] == [g.dtype for g in g_r]
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y_o.float(), y_r.float(), atol=tol, rtol=tol)
    assert_all_close([g.float() for g in g_o], [g.float() for g in g_r],
                     GRADS[:len(g_o)], atol=tol * 10, rtol=tol)
    torch.testing.assert_close(ours.running_mean, ref.running_mean,
                               atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_module(dtype):
    """A module converted to bfloat16/half normalizes inputs of the same dtype."""
    ours, ref = bnn.BatchNorm1d(4).to(dtype), torch.nn.BatchNorm1d(4).to(dtype)
    x = torch.randn(16, 4).to(dtype)
    torch.testing.assert_close(ours(x), ref(x), atol=2e-2, rtol=2e-2)
    assert ours.running_var.dtype == dtype


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_channels_last_input(device, kind):
    ours, ref, shape = _pair(kind, device)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, dtype=torch.float64, device=device).to(memory_format=fmt)
    dy = torch.randn(shape, dtype=torch.float64, device=device).to(memory_format=fmt)
    y_o, _ = _step(ours, x, dy)
    y_r, _ = _step(ref, x, dy)
    assert y_o.is_contiguous(memory_format=fmt) == y_r.is_contiguous(memory_format=fmt)
    ours2, ref2, _ = _pair(kind, device)
    _assert_same_step(ours2, ref2, x, dy, atol=1e-12)


@pytest.mark.parametrize("kind", CLASSES)
def test_non_contiguous_input(device, kind):
    ours, ref, shape = _pair(kind, device)
    big = torch.randn((shape[0] * 2, *shape[1:]), dtype=torch.float64, device=device)
    x = big[::2]  # every other sample: a strided view
    assert not x.is_contiguous()
    _assert_same_step(ours, ref, x, torch.randn_like(x), atol=1e-12)


@pytest.mark.parametrize("kind", CLASSES)
def test_zero_size_batch(device, kind):
    ours, ref, shape = _pair(kind, device)
    x = torch.randn((0, *shape[1:]), dtype=torch.float64, device=device)
    _assert_same_step(ours, ref, x, torch.randn_like(x), atol=0)
    assert ours.num_batches_tracked.item() == 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_follow_pytorch_rule(momentum):
    """running = (1 - momentum) * running + momentum * stat, unbiased variance stored;
    momentum=None: the plain average of the batch statistics seen so far."""
    m = bnn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    means, vars_ = [], []
    for _ in range(5):
        x = torch.randn(10, 3, dtype=torch.float64) * 2 + 3
        m(x)
        means.append(x.mean(0))
        vars_.append(x.var(0, unbiased=True))
        if momentum is not None:
            mean = (1 - momentum) * mean + momentum * means[-1]
            var = (1 - momentum) * var + momentum * vars_[-1]
    if momentum is None:
        mean, var = torch.stack(means).mean(0), torch.stack(vars_).mean(0)
    torch.testing.assert_close(m.running_mean, mean, atol=1e-13, rtol=0)
    torch.testing.assert_close(m.running_var, var, atol=1e-13, rtol=0)


def test_no_grad_is_not_eval_mode():
    """Training mode is module.training, never torch.is_grad_enabled()."""
    m = bnn.BatchNorm1d(3)
    x = torch.randn(8, 3) + 5
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert m.num_batches_tracked.item() == 1
    assert m.running_mean.abs().min() > 0.1


def test_functional_matches_torch_functional():
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    rm_o, rv_o = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm_r, rv_r = rm_o.clone(), rv_o.clone()
    for training in (True, False):
        y_o = bnn.batch_norm(x, rm_o, rv_o, w, b, training, 0.2, 1e-3)
        y_r = torch.nn.functional.batch_norm(x, rm_r, rv_r, w, b, training, 0.2, 1e-3)
        torch.testing.assert_close(y_o, y_r, atol=1e-12, rtol=0)
        torch.testing.assert_close(rm_o, rm_r, atol=1e-14, rtol=0)
        torch.testing.assert_close(rv_o, rv_r, atol=1e-14, rtol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(training, affine):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5 if affine else None
    b = torch.rand(3, dtype=torch.float64, requires_grad=True) if affine else None
    mean = None if training else torch.randn(3, dtype=torch.float64)
    var = None if training else torch.rand(3, dtype=torch.float64) + 0.5
    inputs = (x, w, b, mean, var, training, 1e-5)

    def f(*args):
        return bnn.BatchNormFunction.apply(*args)[0]

    assert torch.autograd.gradcheck(f, inputs)


def test_backward_is_hand_written():
    """The gradient comes from one hand-written backward node, not from autograd of
    tensor ops: y's grad_fn leads straight to the leaves x, gamma and beta."""
    m = bnn.BatchNorm1d(3)
    y = m(torch.randn(5, 3, requires_grad=True))
    assert "BatchNormFunction" in type(y.grad_fn).__name__
    leaves = [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None]
    assert leaves == ["AccumulateGrad"] * 3


# --------------------------------------------------------------------------- errors

ERROR_CASES = [
    # (kind, input shape, dtype, train, exception, message)
    ("2d", (4, 5, 6), torch.float32, True, ValueError, r"expected 4D input \(got 3D"),
    ("1d-2D", (4, 5, 6, 7), torch.float32, True, ValueError,
     r"expected 2D or 3D input \(got 4D"),
    ("3d", (4, 5, 6, 7), torch.float32, True, ValueError, r"expected 5D input"),
    ("2d", (4, 6, 3, 3), torch.float32, True, RuntimeError,
     r"expected input with 5 channels.*got 6"),
    ("2d", (4, 6, 3, 3), torch.float32, False, RuntimeError,
     r"expected input with 5 channels.*got 6"),
    ("1d-2D", (1, 5), torch.float32, True, ValueError,
     "Expected more than 1 value per channel when training"),
    ("2d", (1, 5, 1, 1), torch.float32, True, ValueError,
     "Expected more than 1 value per channel when training"),
    ("1d-2D", (4, 5), torch.int64, True, RuntimeError, "floating-point"),
    ("1d-2D", (4, 5), torch.float64, True, RuntimeError, "mixed dtype"),
]


@pytest.mark.parametrize(("kind", "shape", "dtype", "train", "error", "match"),
                         ERROR_CASES)
def test_errors_like_torch_and_no_state_change(kind, shape, dtype, train, error, match):
    ours_cls, ref_cls, _ = CLASSES[kind]
    ours, ref = ours_cls(5).train(train), ref_cls(5).train(train)
    ours(torch.randn(CLASSES[kind][2]))  # some state to protect
    ref(torch.randn(CLASSES[kind][2]))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.ones(shape).to(dtype)
    with pytest.raises(error, match=match):
        ours(x)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed call"
    with pytest.raises((ValueError, RuntimeError)):  # torch rejects it too
        ref(x)


def test_torch_bumps_counter_on_failure_but_we_do_not():
    ours, ref = bnn.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    x = torch.randn(4, 6, 3, 3)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(RuntimeError):
        ours(x)
    assert ref.num_batches_tracked.item() == 1  # torch's documented-by-test behaviour
    assert ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_non_positive_eps_rejected_in_training(eps):
    ours, ref = bnn.BatchNorm1d(3, eps=eps), torch.nn.BatchNorm1d(3, eps=eps)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be positive"):
        ours(x)
    with pytest.raises(ValueError):
        ref(x)
    assert ours.num_batches_tracked.item() == 0


# --------------------------------------------------------------------------- hypothesis


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 5), c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    momentum=st.sampled_from([0.1, 0.5, None]), eps=st.sampled_from([1e-5, 1e-2]),
    affine=st.booleans(), seed=st.integers(0, 2**16),
)
def test_hypothesis_matches_torch(n, c, spatial, momentum, eps, affine, seed):
    torch.manual_seed(seed)
    shape = (n, c, *spatial)
    name = {0: "BatchNorm1d", 1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}
    kw = dict(momentum=momentum, eps=eps, affine=affine, dtype=torch.float64)
    ours = getattr(bnn, name[len(spatial)])(c, **kw)
    ref = getattr(torch.nn, name[len(spatial)])(c, **kw)
    x = torch.randn(shape, dtype=torch.float64) * 3
    dy = torch.randn(shape, dtype=torch.float64)
    _assert_same_step(ours, ref, x, dy, atol=1e-10)
    ours.eval()
    ref.eval()
    _assert_same_step(ours, ref, x, dy, atol=1e-10)


# --------------------------------------------------------------------------- compile


def _compiled_matches_eager(backend, momentum=0.1):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(6, 4),
                                bnn.BatchNorm1d(4, momentum=momentum))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 4),
                               bnn.BatchNorm1d(4, momentum=momentum))
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, backend=backend, fullgraph=True)  # no graph breaks
    for _ in range(2):
        x = torch.randn(8, 6)
        y_e, y_c = model(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
        y_e.sum().backward()
        y_c.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5,
                                   msg=named(name))
    _assert_same_state(model, twin, atol=1e-6)
    model.eval()
    compiled.eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_compile_fullgraph_aot_eager(momentum):
    _compiled_matches_eager("aot_eager", momentum)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    _compiled_matches_eager("inductor")


def test_isinstance_of_torch_classes_and_update_bn():
    """Code that looks for torch's batch norms finds bnlib's: swa_utils.update_bn
    recomputes their statistics over a loader, like for torch's own."""
    assert isinstance(bnn.BatchNorm2d(3), torch.nn.BatchNorm2d)
    assert isinstance(bnn.BatchNorm1d(3), torch.nn.modules.batchnorm._BatchNorm)
    data = [torch.randn(16, 4) * 2 + 1 for _ in range(5)]
    ours, ref = bnn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    for m in (ours, ref):
        torch.optim.swa_utils.update_bn(data, m)
    _assert_same_state(ours, ref, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, torch.cat(data).mean(0))


# --------------------------------------------------------------------------- layout


def _bnlib_imports() -> dict[str, set[str]]:
    """Each bnlib module -> the bnlib modules it imports (relative imports resolved)."""
    import ast
    import pathlib

    import bnlib

    root = pathlib.Path(bnlib.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        parts = ("bnlib", *path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        package = parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + tuple((node.module or "").split(".")))
                deps.add(target.rstrip("."))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "bnlib"):
                deps.add(node.module)
        graph[name] = {d for d in deps if d != name}
    return graph


def test_bnlib_imports_one_way_and_modules_stay_short():
    """No import cycle anywhere in bnlib (a package importing its own submodules is
    the only upward edge), no module over 600 lines, and the old module paths of
    Batch Renorm, Ghost BN and SyncBatchNorm are gone: one import path, bnlib.nn."""
    import importlib.util
    import pathlib

    import bnlib

    graph = _bnlib_imports()

    def reach(start, seen):
        for d in graph.get(start, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    for name, deps in graph.items():
        for d in deps:
            if d.startswith(name + "."):
                continue  # a package re-exporting its submodule
            assert name not in reach(d, {d}) or name.startswith(d + "."), (
                f"import cycle: {name} imports {d}, which imports {name} back")
    root = pathlib.Path(bnlib.__file__).parent
    for path in root.rglob("*.py"):
        n = len(path.read_text().splitlines())
        assert n <= 600, f"{path.relative_to(root)} has {n} lines (at most 600)"
    for old in ("bnlib.ghost", "bnlib.renorm", "bnlib.sync", "bnlib.nn.nn"):
        assert importlib.util.find_spec(old) is None, f"{old} still exists"
    expected = {"BatchNormFunction", "batch_norm", "BatchNorm1d", "BatchNorm2d",
                "BatchNorm3d", "BatchRenormFunction", "BatchRenorm1d", "BatchRenorm2d",
                "GhostBatchNorm1d", "GhostBatchNorm2d", "SyncBatchNorm",
                "SyncBatchNormFunction", "revert_sync_batchnorm"}
    assert set(bnn.__all__) == expected
    assert all(hasattr(bnn, name) for name in expected)
    kernels_deps = graph["bnlib.nn._kernels"]
    assert not kernels_deps, f"the kernels import {kernels_deps}: they are the bottom"
