"""bnlib.nn.SyncBatchNorm: over 2-3 gloo processes on 127.0.0.1 equal to one
process's BatchNorm on the concatenated batch (outputs, input gradients, summed weight
and bias gradients, running statistics on every process), with unequal and empty
shards; errors with no state changed; a failing peer makes the others fail within the
timeout, never hang; outside a process group it is bnlib.nn's BatchNorm; conversion
to and from BatchNorm; under DistributedDataParallel on CPU it trains what one process
trains on the whole batch.

Each spawned process runs a module-level function of this file (several checks per
spawn: starting processes is what costs) and saves its results with torch.save; the
parent computes the single-process float64 reference and compares.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from checks import named

from bnlib import nn as bnn
from bnlib.nn import (
    BatchRenorm2d,
    GhostBatchNorm2d,
    SyncBatchNorm,
    SyncBatchNormFunction,
    revert_sync_batchnorm,
)
from bnlib.spawn import launch

D = torch.float64
JOIN_S = 100  # the parent's limit on a whole spawn: past it the test fails, no hang


# --------------------------------------------------------------------------- harness


def _entry(rank, world_size, port, out_dir, body, args, timeout_s, backend):
    """A spawned process: join the group, run body, save its result (or the error)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=timedelta(seconds=30))
        dist.init_process_group(backend, store=store, world_size=world_size,
                                rank=rank, timeout=timedelta(seconds=timeout_s))
        result = body(rank, world_size, *args)
        torch.save({"result": result}, out / f"{rank}.pt")
    except BaseException as err:  # noqa: BLE001 - reported to the parent, re-raised
        (out / f"{rank}.err").write_text(f"{type(err).__name__}: {err}\n"
                                         + traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(body, world_size, tmp_path, *args, timeout_s=30, backend="gloo"):
    """Run body(rank, world_size, *args) in world_size processes; returns, per rank,
    ``(result, error)`` (one of the two None). Fails if they run past JOIN_S.

    The parent serves the rendezvous store on a port of 127.0.0.1 that it binds and
    holds (port 0: no race for a "free" port); the processes connect to it."""
    out = tmp_path / body.__name__
    out.mkdir()
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=30))
    port = store.port
    procs = [ctx.Process(target=_entry, daemon=True,
                         args=(rank, world_size, port, str(out), body, args, timeout_s,
                               backend))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} still running after {JOIN_S} s: a hang"
    results = []
    for rank in range(world_size):
        res, err = out / f"{rank}.pt", out / f"{rank}.err"
        results.append((torch.load(res)["result"] if res.exists() else None,
                        err.read_text() if err.exists() else None))
        assert res.exists() or err.exists(), f"rank {rank} died without a word"
    return results


def _ok(results):
    for rank, (_res, err) in enumerate(results):
        assert err is None, f"rank {rank} failed:\n{err}"
    return [res for res, _err in results]


# --------------------------------------------------------------------------- cases

# name: (per-sample shape (C, *spatial), shard sizes, dtype, module kwargs, offset)
CASES = {
    "2D-unequal": ((4,), [3, 5, 2], D, {}, 0.0),
    "2D-one-sample-shards": ((4,), [1, 1, 1], D, dict(momentum=None), 0.0),
    "3D-empty-shard": ((3, 5), [2, 0, 3], D, dict(momentum=None), 0.0),
    "4D-no-affine": ((3, 4, 3), [1, 2, 4], D, dict(affine=False), 0.0),
    "4D-untracked": ((3, 2, 5), [2, 3, 2], D, dict(track_running_stats=False), 0.0),
    "5D-no-bias": ((2, 3, 2, 3), [2, 1, 1], D, dict(bias=False), 0.0),
    "2D-offset-1e5": ((4,), [4, 6, 5], D, {}, 1e5),  # E[x^2] - E[x]^2 would fail
    "4D-float32": ((3, 4, 4), [4, 3, 5], torch.float32, {}, 0.0),
}
STEPS = 2  # training steps, then one in eval mode


def _bounds(sizes, rank):
    return sum(sizes[:rank]), sum(sizes[:rank + 1])


def _batch(case, step):
    """The whole batch x and upstream gradient dy of a step, float64: every process
    and the reference draw the same."""
    tail, sizes, _dtype, _kwargs, offset = CASES[case]
    g = torch.Generator().manual_seed(1000 * step + len(case))
    shape = (sum(sizes), *tail)
    x = torch.randn(shape, generator=g, dtype=D) * (1 + step) + step + offset
    return x, torch.randn(shape, generator=g, dtype=D)


def _module(cls, case, device, dtype):
    """cls(C, **kwargs) with non-trivial parameters and running statistics."""
    tail, _sizes, _dtype, kwargs, _offset = CASES[case]
    m = cls(tail[0], **kwargs).to(device, dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in [p for p in m.parameters()] + [m.running_mean, m.running_var]:
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=g, dtype=D) + 0.5)
    if "2D-offset" in case and m.running_mean is not None:
        m.running_mean.fill_(1e5)
    return m


def _run(m, x, dy):
    """One forward and backward: y, dx, dweight, dbias (None where absent)."""
    x = x.detach().clone().requires_grad_()
    for p in m.parameters():
        p.grad = None
    y = m(x)
    if m.training:
        y.backward(dy)
    grads = [x.grad, getattr(m.weight, "grad", None), getattr(m.bias, "grad", None)]
    return [None if t is None else t.detach().cpu() for t in [y] + grads]


def _body_cases(rank, world_size, device):
    """Every case on this process's shard; the results, for the parent to compare."""
    results = {}
    for case, (_tail, sizes, dtype, _kwargs, _offset) in CASES.items():
        lo, hi = _bounds(sizes, rank)
        m = _module(SyncBatchNorm, case, device, dtype)
        steps = []
        for step in range(STEPS + 1):
            if step == STEPS:
                m.eval()
            x, dy = (t[lo:hi].to(device, dtype) for t in _batch(case, step))
            steps.append(_run(m, x, dy))
        state = {k: v.cpu() for k, v in m.state_dict().items()}
        results[case] = dict(steps=steps, state=state)
    return results


def _reference(case):
    """The same steps on the whole batch in one process, with torch's BatchNorm in
    float64."""
    tail, sizes, _dtype, _kwargs, _offset = CASES[case]
    cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm2d,
           4: torch.nn.BatchNorm3d}[len(tail)]
    m = _module(cls, case, "cpu", D)
    steps = []
    for step in range(STEPS + 1):
        if step == STEPS:
            m.eval()
        steps.append(_run(m, *_batch(case, step)))
    return steps, m


# --------------------------------------------------------------------------- equality

MAX_DIFF: dict[str, float] = {}  # case -> max |ours - reference|, printed with -s


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="no CUDA device")])])
def test_matches_single_process_batchnorm(tmp_path, device):
    results = _ok(_spawn(_body_cases, 3, tmp_path, device))
    for case, (_tail, sizes, dtype, kwargs, _offset) in CASES.items():
        tol = dict(atol=1e-10, rtol=1e-10) if dtype == D else dict(atol=2e-5, rtol=2e-5)
        ref_steps, ref = _reference(case)
        diff = 0.0

        def close(ours, want, what, case=case, tol=tol):
            nonlocal diff
            assert (ours is None) == (want is None), (case, what)
            if ours is None:
                return
            torch.testing.assert_close(ours.to(D), want, **tol,
                                       msg=named(f"{case}: {what}"))
            if ours.numel():
                diff = max(diff, (ours.to(D) - want).abs().max().item())

        for step, (y_ref, dx_ref, *_) in enumerate(ref_steps):
            eval_untracked = step == STEPS and not kwargs.get("track_running_stats", 1)
            per_rank = [r[case]["steps"][step] for r in results]
            for rank, (y, dx, _dw, _db) in enumerate(per_rank):
                lo, hi = _bounds(sizes, rank)
                if eval_untracked:  # no running statistics: the shard's own batch's
                    local = _module(torch.nn.BatchNorm2d, case, "cpu", D).eval()
                    y_ref_shard = local(_batch(case, step)[0][lo:hi])
                    close(y, y_ref_shard, f"eval y, rank {rank}")
                    continue
                close(y, y_ref[lo:hi], f"step {step} y, rank {rank}")
                close(dx, None if dx_ref is None else dx_ref[lo:hi],
                      f"step {step} dx, rank {rank}")
            for i, what in ((2, "dweight"), (3, "dbias")):
                want = ref_steps[step][i]
                if want is None or eval_untracked:
                    continue
                total = sum(r[i].to(D) for r in per_rank)  # what DDP's all-reduce sums
                close(total, want, f"step {step} summed {what}")
        for rank, r in enumerate(results):  # the same state on every process
            assert list(r[case]["state"]) == list(ref.state_dict()), case
            for key, want in ref.state_dict().items():
                got = r[case]["state"][key]
                if key == "num_batches_tracked":
                    assert got.item() == want.item(), (case, rank)
                else:
                    close(got, want, f"{key}, rank {rank}")
            if rank:  # bit for bit the same as rank 0's
                for key, got in r[case]["state"].items():
                    assert torch.equal(got, results[0][case]["state"][key]), key
        MAX_DIFF[case] = diff
    print("\nmax |SyncBatchNorm - BatchNorm on the whole batch|:", MAX_DIFF)


# --------------------------------------------------------------------------- edge cases


def _raises(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the caller compares types and messages
        return type(err).__name__, str(err)
    return None


def _model(bn1d=torch.nn.BatchNorm1d):
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), bnn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5), bn1d(5),
    ).double()


def _body_edges(rank, world_size):
    """Errors (no state changed, every process raising alike), the whole-batch value
    count, all-empty shards, no_grad, double backward, a converted model's step."""
    out = {}
    m = SyncBatchNorm(3, dtype=D)
    state0 = {k: v.clone() for k, v in m.state_dict().items()}
    bad = {
        "1D": lambda: m(torch.randn(4, dtype=D)),
        "no channels": lambda: m(torch.randn(4, 0, dtype=D)),
        "wrong channels": lambda: m(torch.randn(4, 2, dtype=D)),
        "integer": lambda: m(torch.ones(4, 3, dtype=torch.long)),
        "mixed dtype": lambda: m(torch.randn(4, 3)),
    }
    out["errors"] = {name: _raises(fn) for name, fn in bad.items()}
    m.eps = 0.0
    out["errors"]["eps=0"] = _raises(lambda: m(torch.randn(4, 3, dtype=D)))
    m.eps = 1e-5
    # one value per channel in the whole batch: rank 0 has one sample, rank 1 none
    n = 1 if rank == 0 else 0
    out["errors"]["one value"] = _raises(lambda: m(torch.randn(n, 3, dtype=D)))
    out["unchanged"] = all(torch.equal(v, state0[k]) for k, v in m.state_dict().items())
    # one sample on each process is two values per channel: fine
    y = m(torch.full((1, 3), float(rank), dtype=D))
    out["one sample each"] = y.detach()
    # every shard empty: an empty output, as BatchNorm's (num_batches_tracked counts)
    out["all empty"] = (tuple(m(torch.randn(0, 3, dtype=D)).shape),
                        m.num_batches_tracked.item())
    with torch.no_grad():  # synchronizes, no backward
        out["no_grad"] = m(torch.randn(4, 3, dtype=D) + rank).requires_grad
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    (dx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    out["double backward"] = _raises(lambda: dx.sum().backward())

    # a converted model: one training step on this shard, then revert and evaluate
    model = SyncBatchNorm.convert_sync_batchnorm(_model())
    x, _ = _model_batch()
    lo, hi = (0, 3) if rank == 0 else (3, 8)
    model(x[lo:hi]).pow(2).sum().backward()
    out["model grads"] = [p.grad.clone() for p in model.parameters()]
    model = revert_sync_batchnorm(model).eval()
    out["model types"] = [type(c).__name__ for c in model]
    out["model eval"] = model(x).detach()
    return out


def _model_batch():
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 2, 5, 5, generator=g, dtype=D), None


def test_edge_cases_over_two_processes(tmp_path):
    results = _ok(_spawn(_body_edges, 2, tmp_path))
    ref = bnn.BatchNorm1d(3, dtype=D)
    want = {name: err for name, err in [
        ("1D", ValueError), ("no channels", ValueError),
        ("wrong channels", RuntimeError), ("integer", NotImplementedError),
        ("mixed dtype", RuntimeError), ("eps=0", ValueError),
        ("one value", ValueError)]}
    for r in results:
        for name, err in want.items():
            assert r["errors"][name] is not None, name
            assert r["errors"][name][0] == err.__name__, (name, r["errors"][name])
        assert "1 value per channel over the 2 processes" in r["errors"]["one value"][1]
        assert "got 2 channels" in r["errors"]["wrong channels"][1]
        assert r["unchanged"], "a call that raised changed the state"
        # ranks hold [0] and [1]: mean 0.5, var 0.25, y = +-0.5 / sqrt(0.25 + eps)
        assert r["all empty"] == ((0, 3), 2)
        assert r["no_grad"] is False
        assert r["double backward"][0] == "RuntimeError"
    torch.testing.assert_close(results[0]["one sample each"].sum() * -1,
                               results[1]["one sample each"].sum())
    ref_y = ref(torch.tensor([[0.0] * 3, [1.0] * 3], dtype=D))
    torch.testing.assert_close(results[0]["one sample each"], ref_y[:1])
    torch.testing.assert_close(results[1]["one sample each"], ref_y[1:])

    model = _model()  # the converted model's step, in one process
    x, _ = _model_batch()
    model(x).pow(2).sum().backward()
    for p, g0, g1 in zip(model.parameters(), results[0]["model grads"],
                         results[1]["model grads"], strict=True):
        torch.testing.assert_close(g0 + g1, p.grad, atol=1e-10, rtol=1e-10)
    for r in results:
        assert r["model types"][1] == "BatchNorm2d" and r["model types"][5] == \
            "BatchNorm1d"
        # eval before the reference model stepped? compare with its running stats
    with torch.no_grad():  # the processes' running statistics are the whole batch's
        model.eval()
        torch.testing.assert_close(results[0]["model eval"], model(x), atol=1e-10,
                                   rtol=1e-10)
        torch.testing.assert_close(results[1]["model eval"], model(x), atol=1e-10,
                                   rtol=1e-10)


# --------------------------------------------------------------------------- DDP

DDP_STEPS, DDP_SHARD = 2, 4  # training steps; examples per rank and step


def _ddp_model(bn2d, bn1d):
    """A small CNN with two batch norms, float64, the same initial weights each call."""
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), bn2d(3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(3 * 3 * 3, 4), bn1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 1),
    ).double()


def _ddp_data(world_size):
    """Per step, the whole batch (inputs, targets) of world_size equal shards."""
    g = torch.Generator().manual_seed(21)
    n = world_size * DDP_SHARD
    return [(torch.randn(n, 2, 5, 5, generator=g, dtype=D) * 2 + 1,
             torch.randn(n, 1, generator=g, dtype=D)) for _ in range(DDP_STEPS)]


def _ddp_train(model, data, rows):
    """SGD with momentum on rows of each batch; the loss is the mean over those rows."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, t in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), t[rows]).backward()
        opt.step()


def _body_ddp(rank, world_size):
    """DDP on CPU around a model with bnlib's SyncBatchNorm: 2 steps on this shard."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _ddp_model(SyncBatchNorm, SyncBatchNorm)
    # broadcast_buffers=False: SyncBatchNorm already gives every rank the same running
    # statistics (the whole batch's), so there is nothing for DDP to copy from rank 0.
    # (torch 2.13 renames it forward_sync_buffers, which torch 2.1 lacks; hence the
    # old name, and its FutureWarning silenced.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DDP(model, broadcast_buffers=False)  # raises for torch's SyncBatchNorm
    rows = slice(rank * DDP_SHARD, (rank + 1) * DDP_SHARD)
    _ddp_train(ddp, _ddp_data(world_size), rows)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ddp_on_cpu_trains_as_one_process(tmp_path):
    """DDP accepts bnlib's SyncBatchNorm on CPU, and 2 ranks x 2 steps train what one
    process trains on the whole batch: parameters and running statistics, both ranks.

    Each rank's loss is the mean over its shard of 4; DDP averages the 2 ranks'
    gradients, which (equal shards) is the gradient of the mean loss over all 8, the
    single-process loss."""
    states = _ok(_spawn(_body_ddp, 2, tmp_path))
    ref = _ddp_model(bnn.BatchNorm2d, bnn.BatchNorm1d)
    _ddp_train(ref, _ddp_data(2), slice(None))
    want = ref.state_dict()
    diff = {}
    for rank, state in enumerate(states):
        assert list(state) == list(want)
        for key, value in want.items():
            if key.endswith("num_batches_tracked"):
                assert state[key].item() == value.item() == DDP_STEPS
                continue
            torch.testing.assert_close(state[key], value, atol=1e-12, rtol=1e-12,
                                       msg=named(f"rank {rank}: {key}"))
            kind = "running" if "running" in key else "parameters"
            d = (state[key] - value).abs().max().item()
            diff[kind] = max(diff.get(kind, 0.0), d)
        if rank:  # bit for bit rank 0's: the same averaged gradients, the same merge
            for key, value in state.items():
                assert torch.equal(value, states[0][key]), key
    assert not torch.equal(want["0.weight"], _ddp_model(torch.nn.BatchNorm2d,
                                                        torch.nn.BatchNorm1d)[0].weight)
    print(f"\nDDP + SyncBatchNorm vs one process, max |difference|: {diff}")


# --------------------------------------------------------------------------- failures


def _body_peer_raises(rank, world_size):
    """Rank 1 raises before the all-gather; rank 0 must fail, not wait forever."""
    if rank == 1:
        raise RuntimeError("rank 1 fails before the all-gather")
    m = SyncBatchNorm(3, dtype=D)
    start = time.monotonic()
    err = _raises(lambda: m(torch.randn(4, 3, dtype=D)))
    return dict(err=err, waited=time.monotonic() - start,
                nbt=m.num_batches_tracked.item())


def _body_peer_skips(rank, world_size, wait_s):
    """Rank 1 stays alive but never calls the layer; rank 0 must time out."""
    if rank == 1:
        time.sleep(wait_s)
        return None
    m = SyncBatchNorm(3, dtype=D)
    start = time.monotonic()
    err = _raises(lambda: m(torch.randn(4, 3, dtype=D)))
    return dict(err=err, waited=time.monotonic() - start)


def test_peer_that_raises_makes_the_others_fail(tmp_path):
    (r0, err0), (r1, err1) = _spawn(_body_peer_raises, 2, tmp_path, timeout_s=10)
    assert err0 is None and r1 is None
    assert "rank 1 fails before the all-gather" in err1
    assert r0["err"] is not None, "rank 0 went on as if rank 1 had answered"
    kind, message = r0["err"]
    assert kind == "RuntimeError"
    assert message.startswith("SyncBatchNorm: all_gather over the process group failed")
    assert r0["waited"] < 10 + 5  # within the process group's timeout
    assert r0["nbt"] == 0  # no state changed


def test_peer_that_skips_the_call_times_out(tmp_path):
    timeout_s = 3
    (r0, err0), (_r1, err1) = _spawn(_body_peer_skips, 2, tmp_path, timeout_s + 1,
                                     timeout_s=timeout_s)
    assert err0 is None, err0
    assert r0["err"] is not None and r0["err"][0] == "RuntimeError"
    assert "SyncBatchNorm: all_gather" in r0["err"][1]
    assert timeout_s - 1 < r0["waited"] < timeout_s + 5


# ------------------------------------------------------------------------- one process


def _bn_class(x):
    return {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d,
            5: bnn.BatchNorm3d}[x.dim()]


def _assert_is_batchnorm(device):
    """SyncBatchNorm equals bnlib.nn's BatchNorm bit for bit: outputs, gradients,
    state, over training steps and eval, for 2D-5D input."""
    for shape in [(6, 3), (4, 3, 5), (3, 3, 4, 2), (2, 3, 2, 3, 2)]:
        for kwargs in [{}, dict(momentum=None, bias=False),
                       dict(track_running_stats=False), dict(affine=False)]:
            x = torch.randn(shape, dtype=D, device=device)
            ours = SyncBatchNorm(3, **kwargs, dtype=D, device=device)
            ref = _bn_class(x)(3, **kwargs, dtype=D, device=device)
            ref.load_state_dict(ours.state_dict())
            for step in range(3):
                if step == 2:
                    ours.eval(), ref.eval()
                dy = torch.randn_like(x)
                for a, b in zip(_run(ours, x + step, dy), _run(ref, x + step, dy),
                                strict=True):
                    assert (a is None and b is None) or torch.equal(a, b), kwargs
            for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(),
                                 strict=True):
                assert torch.equal(a, b), k


def test_without_process_group_is_batchnorm(device):
    assert not dist.is_initialized()
    _assert_is_batchnorm(device)
    m = SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"at least 2D input \(got 1D input"):
        m(torch.randn(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 3))
    assert m.num_batches_tracked.item() == 0


def test_group_of_one_is_batchnorm(tmp_path):
    """A process group of one process: nothing to synchronize, no communication."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                            world_size=1, rank=0, timeout=timedelta(seconds=10))
    try:
        _assert_is_batchnorm("cpu")
    finally:
        dist.destroy_process_group()


def test_constructor_and_state_dict_match_torch():
    # bnlib's annotations are strings (from __future__ import annotations): evaluated,
    # the signature is torch's, names, kinds, defaults and annotations.
    sig = inspect.signature(SyncBatchNorm.__init__, eval_str=True)
    assert sig == inspect.signature(torch.nn.SyncBatchNorm.__init__)
    ours = SyncBatchNorm(5, momentum=0.3, process_group="pg", dtype=D)
    assert ours.process_group == "pg"
    # not torch's SyncBatchNorm, on purpose (DDP refuses those on CPU); a batch norm
    assert not isinstance(ours, torch.nn.SyncBatchNorm)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert ours._version == torch.nn.SyncBatchNorm._version
    with pytest.raises(ValueError, match="at least 2D input"):
        ours._check_input_dim(torch.zeros(3))
    ours._check_input_dim(torch.zeros(2, 5))
    theirs = torch.nn.SyncBatchNorm(5, momentum=0.3, dtype=D)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.state_dict()._metadata == theirs.state_dict()._metadata
    with torch.no_grad():
        for i, t in enumerate(ours.state_dict().values()):
            t.copy_(torch.arange(t.numel(), dtype=t.dtype).view(t.shape) + i)
    theirs.load_state_dict(ours.state_dict())  # ours -> torch's
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    fresh = SyncBatchNorm(5, momentum=0.3, dtype=D)
    fresh.load_state_dict(theirs.state_dict())  # torch's -> ours
    for (k, a), b in zip(fresh.state_dict().items(), ours.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    # a state dict of before num_batches_tracked (version 1) loads, as into torch's
    old = theirs.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    fresh.load_state_dict(old)
    assert repr(ours) == repr(theirs)
    assert repr(SyncBatchNorm(3, affine=False, bias=False)) == repr(
        torch.nn.SyncBatchNorm(3, affine=False, bias=False))


def test_convert_and_revert():
    frozen = bnn.BatchNorm3d(2)
    frozen.weight.requires_grad_(False)
    inner = torch.nn.Sequential(torch.nn.BatchNorm1d(4, bias=False), frozen).eval()
    model = torch.nn.Sequential(
        bnn.BatchNorm2d(3), inner, torch.nn.SyncBatchNorm(5, momentum=None),
        BatchRenorm2d(3), GhostBatchNorm2d(3, 2), torch.nn.Linear(2, 2),
    ).double()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    keys = list(model.state_dict())
    modes = [m.training for m in model.modules()]

    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(SyncBatchNorm) == 4
    assert [type(converted[i]) for i in (3, 4, 5)] == [
        BatchRenorm2d, GhostBatchNorm2d, torch.nn.Linear]
    assert [converted[0].revert_class, converted[1][0].revert_class,
            converted[1][1].revert_class, converted[2].revert_class] == [
        bnn.BatchNorm2d, torch.nn.BatchNorm1d, bnn.BatchNorm3d, None]
    assert converted[2].momentum is None and converted[1][0].bias is None
    after = converted.state_dict(keep_vars=True)
    assert list(converted.state_dict()) == keys
    assert all(after[k] is v for k, v in before.items())  # the very tensors
    assert not converted[1][1].weight.requires_grad
    assert [m.training for m in converted.modules()] == modes
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())

    again = SyncBatchNorm.convert_sync_batchnorm(converted)  # already converted
    assert again[0] is converted[0]

    reverted = SyncBatchNorm.revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted.modules()][1:] == [
        bnn.BatchNorm2d, torch.nn.Sequential, torch.nn.BatchNorm1d, bnn.BatchNorm3d,
        bnn.BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d, torch.nn.Linear]
    assert all(reverted.state_dict(keep_vars=True)[k] is v for k, v in before.items())
    assert [m.training for m in reverted.modules()] == modes
    assert reverted[1][0].bias is None and reverted[2].momentum is None

    # a SyncBatchNorm made directly: BatchNorm2d, or the class asked for
    assert type(revert_sync_batchnorm(SyncBatchNorm(3))) is bnn.BatchNorm2d
    assert type(revert_sync_batchnorm(SyncBatchNorm(3), torch.nn.BatchNorm1d)) is \
        torch.nn.BatchNorm1d
    m = SyncBatchNorm(3)
    m.revert_class = bnn.BatchNorm3d
    assert type(revert_sync_batchnorm(m)) is bnn.BatchNorm3d
    bn = SyncBatchNorm.convert_sync_batchnorm(bnn.BatchNorm1d(3).eval())
    assert type(bn) is SyncBatchNorm and not bn.training


@pytest.mark.parametrize("dtype, layout", [
    (torch.float32, torch.channels_last), (torch.float16, torch.contiguous_format),
    (torch.bfloat16, torch.channels_last)])
def test_synchronized_path_dtypes_and_layouts(monkeypatch, dtype, layout):
    """The synchronized path in one process, in a pretend world of two processes whose
    shards are equal (the collectives copied and doubled): it must equal BatchNorm on
    the batch [x; x], in float32 arithmetic for half inputs, in x's memory format."""
    monkeypatch.setattr(dist, "all_gather", lambda out, t, group=None: [
        o.copy_(t) for o in out])
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: t.mul_(2))
    x = (torch.randn(3, 4, 5, 6) * 2 + 1).to(dtype, memory_format=layout)
    dy = torch.randn_like(x)
    ours, ref = SyncBatchNorm(4), bnn.BatchNorm2d(4)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x1 = x.clone().requires_grad_()
    y = ours._sync_forward(x1, None, 2)
    y.backward(dy)
    x2 = torch.cat([x, x]).requires_grad_()
    y2 = ref(x2)
    y2.backward(torch.cat([dy, dy]))
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, y2[:3], **tol)
    torch.testing.assert_close(x1.grad, x2.grad[:3], **tol)
    torch.testing.assert_close(ours.weight.grad * 2, ref.weight.grad, **tol)
    torch.testing.assert_close(ours.bias.grad * 2, ref.bias.grad, **tol)
    for key, want in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, **tol)


# ----------------------------------------------------------------- ranks that disagree


def _body_disagree(rank, world_size, what):
    """Rank 1 differs from rank 0 in its channel count or dtype, from the first call
    ("channels", "dtype") or after a step taken together ("later")."""
    c, dtype = (5 if rank == 1 and what == "channels" else 4), D
    if rank == 1 and what == "dtype":
        dtype = torch.float32
    m = SyncBatchNorm(c, dtype=dtype)
    if what == "later":
        m(torch.randn(6, c, dtype=D))
        if rank == 1:
            m.float()
            dtype = torch.float32
    nbt = m.num_batches_tracked.item()
    err = _raises(lambda: m(torch.randn(6, c, dtype=dtype)))
    return dict(err=err, changed=m.num_batches_tracked.item() - nbt)


@pytest.mark.parametrize("what", ["channels", "dtype", "later"])
def test_ranks_that_disagree_raise_the_same_clear_error_on_every_rank(what):
    """Before: gloo's size check terminated one process (no Python error) and the
    other got a RuntimeError; a dtype mismatch crashed in the backward's all-reduce.
    Now every rank raises the same RuntimeError naming each rank's C and dtype, and
    changes no state."""
    r0, r1 = launch(_body_disagree, 2, what, timeout_s=90)
    assert r0["err"] is not None and r0["err"] == r1["err"], (r0, r1)
    kind, message = r0["err"]
    assert kind == "RuntimeError"
    assert message.startswith("SyncBatchNorm: the processes disagree on the input's")
    second = {"channels": "5 channels, float64", "dtype": "4 channels, float32",
              "later": "4 channels, float32"}[what]
    assert f"rank 0: 4 channels, float64; rank 1: {second}" in message
    assert r0["changed"] == r1["changed"] == 0


def _body_counts(rank, world_size):
    """The count n reaches the backward as a tensor, not a host int."""
    m = SyncBatchNorm(3, dtype=D)
    seen = []
    original = SyncBatchNormFunction.forward

    def spy(ctx, x, weight, bias, mean, inv_std, count, group):
        seen.append(count)
        return original(ctx, x, weight, bias, mean, inv_std, count, group)

    SyncBatchNormFunction.forward = staticmethod(spy)
    x = torch.randn(4 + rank, 3, dtype=D, requires_grad=True)
    m(x).sum().backward()
    return dict(is_tensor=isinstance(seen[0], torch.Tensor), n=float(seen[0]))


def test_the_count_stays_a_tensor_on_the_device():
    """No int(counts.sum().item()) per layer: on a GPU that is a host synchronization.
    The whole batch's count (4 + 5 values) travels as a tensor."""
    r0, r1 = launch(_body_counts, 2, timeout_s=90)
    assert r0 == r1 == dict(is_tensor=True, n=9.0)
