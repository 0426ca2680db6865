"""Speed benchmark: bnlib against PyTorch's native batch-norm kernels, side by side.

    python -m bnlib.bench [--rounds 41] [--threads 1] [--device cpu] [--json FILE]

Sizes include the ones practitioners feel (issue 15): eval forward at resnet18's
(8, 64, 16, 16) and (8, 128, 8, 8) (target 1.5x torch.nn), training forward+backward
at (60, 100) and (128, 256) (target 2.0x). On a machine shared with other processes,
read the ratios (interleaved rounds), not the absolute times.

Every variant of a case runs once per round, in a rotating order, all in one process, so
that slow drifts of the machine (frequency, other load) hit every variant alike.
Reported are medians with min-max over rounds, the median over rounds of the per-round
ratio ``bnlib time / torch time`` (below 1 is faster than torch), and the ratio of the
two fastest rounds ("best/best"), which is free of the page faults that slow some
rounds of either. Batch norm is memory-bound, so each variant's achieved bandwidth (the
bytes it must move at least, divided by its time) is compared with a plain copy of the
same bytes, measured the same way, in the same rounds: ``copy_gbps`` copies x into a
preallocated tensor (``Tensor.copy_``, the machine's streaming bandwidth, the roof),
``clone_gbps`` copies it into a new one (``clone()``, which also pays for allocating
and first touching the destination, as a kernel's output does).

Some cases time further variants in the same rounds (``others``): autograd through
plain tensor operations (batch norm as differentiable tensor ops, autograd doing the
backward) next to bnlib.nn's hand-written backward, and ``torch.compile`` of
``torch.nn`` as the control for ``torch.compile`` of ``bnlib.nn``. The first call of
every variant is timed too (``first_call_ms``): for a compiled one it is the compile
time, with Inductor's on-disk caches disabled so that it is a cold compile.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch

from . import nn as bnn
from . import numpy_fast

__all__ = ["Case", "Result", "run", "main"]


@dataclass
class Case:
    """One comparison: ``ours`` against ``theirs``, each moving ``traffic``
    tensor-sizes."""

    name: str
    shape: tuple[int, ...]
    ours: Callable[[], object]
    theirs: Callable[[], object]
    copy: Callable[[], object]  # x copied into a preallocated tensor
    clone: Callable[[], object]  # x copied into a new tensor
    traffic: int  # tensors of x's size that must be read or written, at least
    target: float | None
    repeat: int = 1  # calls per timed sample (small inputs: many, against timer noise)
    others: dict[str, Callable[[], object]] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    shape: tuple[int, ...]
    ours_ms: float
    ours_min_ms: float
    ours_max_ms: float
    torch_ms: float
    torch_min_ms: float
    torch_max_ms: float
    ratio: float  # median over rounds of ours / torch
    best_ratio: float  # fastest round of ours / fastest round of torch
    target: float | None
    ours_gbps: float
    torch_gbps: float
    copy_gbps: float  # Tensor.copy_ into a preallocated tensor: the roof
    clone_gbps: float  # clone(): the copy plus allocating its destination
    # variant name -> {ms, min_ms, max_ms, ratio (median per-round ratio to torch),
    # ratio_to_ours (to the bnlib side), gbps}
    others: dict[str, dict[str, float]]
    # per variant ("ours", "torch", others): the first sample (``repeat`` calls), before
    # any warm-up; for a compiled variant, mostly its compile time
    first_call_ms: dict[str, float]


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    def once(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return once


def _numpy_step(x, dy, gamma, beta):
    _, cache = numpy_fast.batchnorm_forward(x, gamma, beta)
    return numpy_fast.batchnorm_backward(dy, cache)


def _cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bn_tensor_ops(x, weight, bias, eps=1e-5):
    """Training-mode batch norm from differentiable tensor operations (autograd does the
    backward; no running statistics), for (N, C) and (N, C, *spatial) inputs."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    xc = x - mu
    var = (xc**2).mean(dims, keepdim=True)
    x_hat = xc / torch.sqrt(var + eps)
    return weight.view(shape) * x_hat + bias.view(shape)


def _torch_native_step(x, w, b, dy):
    y = torch.nn.functional.batch_norm(x, None, None, w, b, True)
    return torch.autograd.grad(y, (x, w, b), dy)


def _cases(device: str, quick: bool) -> list[Case]:
    """The benchmark's cases (float32); ``quick`` shrinks them for the test suite."""
    gen = torch.Generator().manual_seed(0)
    image, table = (((4, 8, 16, 16), (64, 32)) if quick
                    else ((32, 64, 56, 56), (256, 1024)))
    cases: list[Case] = []

    def tensors(shape):
        x = torch.randn(shape, generator=gen).to(device)
        dy = torch.randn(shape, generator=gen).to(device)
        return x, dy

    def copy_of(x):  # x into a preallocated tensor: no allocation is timed
        return partial(torch.empty_like(x).copy_, x)

    def clone_of(x):
        return x.clone

    # 1. numpy_fast forward + backward against torch's native kernel (CPU only: NumPy).
    if device == "cpu":
        for shape, target in ((image, 1.25), (table, 1.75)):
            x, dy = tensors(shape)
            xn, dyn = x.numpy(), dy.numpy()
            c = shape[1]
            gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
            xt = x.clone().requires_grad_()
            w = torch.ones(c, requires_grad=True)
            b = torch.zeros(c, requires_grad=True)

            ours = partial(_numpy_step, xn, dyn, gamma, beta)
            theirs = partial(_torch_native_step, xt, w, b, dy)
            cases.append(Case("numpy_fast fwd+bwd vs torch native", shape, ours, theirs,
                              copy_of(x), clone_of(x), traffic=5, target=target))

    # 2. bnlib.nn forward + backward, and eval forward, against torch.nn.
    def train_step(m, x, dy):
        y = m(x)
        return torch.autograd.grad(y, (x, m.weight, m.bias), dy)

    def eval_step(m, x):
        with torch.no_grad():
            return m(x)

    def tensor_ops_step(w, b, x, dy):
        return torch.autograd.grad(bn_tensor_ops(x, w, b), (x, w, b), dy)

    def tensor_ops(shape, x, dy):
        w = torch.ones(shape[1], device=device, requires_grad=True)
        b = torch.zeros(shape[1], device=device, requires_grad=True)
        return partial(tensor_ops_step, w, b, x, dy)

    TENSOR_OPS = "autograd through tensor ops"

    for shape in (image, table):
        x, dy = tensors(shape)
        xt = x.clone().requires_grad_()
        name = f"BatchNorm{max(len(shape) - 2, 1)}d"
        ours, theirs = (getattr(lib, name)(shape[1]).to(device)
                        for lib in (bnn, torch.nn))
        cases.append(Case("bnlib.nn fwd+bwd vs torch.nn", shape,
                          partial(train_step, ours, xt, dy),
                          partial(train_step, theirs, xt, dy),
                          copy_of(x), clone_of(x), traffic=5,
                          target=1.5 if shape == image else None,
                          others={TENSOR_OPS: tensor_ops(shape, xt, dy)}))
        ours_e, theirs_e = (getattr(lib, name)(shape[1]).to(device).eval()
                            for lib in (bnn, torch.nn))
        cases.append(Case("bnlib.nn eval fwd vs torch.nn", shape,
                          partial(eval_step, ours_e, x),
                          partial(eval_step, theirs_e, x),
                          copy_of(x), clone_of(x), traffic=2, target=1.2))

    # 3. torch.compile of bnlib.nn (Inductor fuses the traced equations) against
    # torch.nn's eager kernel: the target is to be at least as fast. The control,
    # timed in the same rounds: torch.compile of torch.nn itself.
    x, dy = tensors(image)
    xt = x.clone().requires_grad_()
    compiled = torch.compile(bnn.BatchNorm2d(image[1]).to(device), fullgraph=True)
    theirs = torch.nn.BatchNorm2d(image[1]).to(device)
    control = torch.compile(torch.nn.BatchNorm2d(image[1]).to(device), fullgraph=True)
    cases.append(Case("torch.compile(bnlib.nn) fwd+bwd vs torch.nn", image,
                      partial(train_step, compiled, xt, dy),
                      partial(train_step, theirs, xt, dy),
                      copy_of(x), clone_of(x), traffic=5, target=1.0,
                      others={"torch.compile(torch.nn)": partial(train_step, control,
                                                                 xt, dy)}))

    def repeated(fn, n):
        def run():
            for _ in range(n):
                fn()
        return run

    # 4. Eval forward at the sizes of resnet18 on 64x64 images (issue 15): per call,
    # many calls per sample. The target is 1.5x torch.nn.
    for shape in ((2, 8, 4, 4),) if quick else ((8, 64, 16, 16), (8, 128, 8, 8)):
        x, _ = tensors(shape)
        ours_e, theirs_e = (lib.BatchNorm2d(shape[1]).to(device).eval()
                            for lib in (bnn, torch.nn))
        n = 20
        cases.append(Case("bnlib.nn eval fwd vs torch.nn (resnet18 sizes)", shape,
                          repeated(partial(eval_step, ours_e, x), n),
                          repeated(partial(eval_step, theirs_e, x), n),
                          repeated(copy_of(x), n), repeated(clone_of(x), n),
                          traffic=2, target=1.5, repeat=n))

    # 5. The sizes the book trains: per-call overhead, not memory, is the cost.
    for shape in ((8, 16), (16, 32)) if quick else ((60, 100), (128, 256)):
        x, dy = tensors(shape)
        xt = x.clone().requires_grad_()
        ours, theirs = (lib.BatchNorm1d(shape[1]).to(device) for lib in (bnn, torch.nn))
        n = 20
        cases.append(Case("bnlib.nn fwd+bwd vs torch.nn (small)", shape,
                          repeated(partial(train_step, ours, xt, dy), n),
                          repeated(partial(train_step, theirs, xt, dy), n),
                          repeated(copy_of(x), n), repeated(clone_of(x), n),
                          traffic=5, target=2.0, repeat=n,
                          others={TENSOR_OPS: repeated(tensor_ops(shape, xt, dy), n)}))
    return cases


def _result(case: Case, times: dict[str, list[float]],
            first: dict[str, float]) -> Result:
    """Medians, per-round ratios and bandwidths of one case's timed rounds."""
    times = {k: [t / case.repeat for t in v] for k, v in times.items()}
    nbytes = int(np.prod(case.shape)) * 4
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a, b):  # median over rounds of the per-round ratio a / b
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    others = {k: {"ms": med[k] * 1e3, "min_ms": min(times[k]) * 1e3,
                  "max_ms": max(times[k]) * 1e3, "ratio": ratio(k, "theirs"),
                  "ratio_to_ours": ratio(k, "ours"),
                  "gbps": case.traffic * nbytes / med[k] / 1e9}
              for k in case.others}
    return Result(
        case.name, case.shape,
        med["ours"] * 1e3, min(times["ours"]) * 1e3, max(times["ours"]) * 1e3,
        med["theirs"] * 1e3, min(times["theirs"]) * 1e3, max(times["theirs"]) * 1e3,
        ratio("ours", "theirs"), min(times["ours"]) / min(times["theirs"]), case.target,
        case.traffic * nbytes / med["ours"] / 1e9,
        case.traffic * nbytes / med["theirs"] / 1e9,
        2 * nbytes / med["copy"] / 1e9, 2 * nbytes / med["clone"] / 1e9, others,
        {("torch" if k == "theirs" else k): v * 1e3 for k, v in first.items()
         if k not in ("copy", "clone")},
    )


def run(rounds: int = 41, threads: int = 1, device: str = "cpu", quick: bool = False,
        warmup: int = 3) -> tuple[dict, list[Result]]:
    """Run every case; return (metadata, results)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    torch.set_num_threads(threads)
    try:  # NumPy's BLAS (used for (N, C) sums) gets the same number of threads
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(threads)
    except ImportError:
        limits = None
    once = _timer(device)
    results = []
    # Cold compiles: the first call of a compiled variant times its compilation (not in
    # quick mode, the test suite's, where a cache hit saves time).
    cold = contextlib.nullcontext() if quick else torch._inductor.config.patch(
        force_disable_caches=True)
    with cold:
        cases = _cases(device, quick)
        for case in cases:
            if quick:
                case.target = None  # the targets are for the full-size shapes
            fns = {"ours": case.ours, "theirs": case.theirs, "copy": case.copy,
                   "clone": case.clone, **case.others}
            first = {k: once(fn) for k, fn in fns.items()}  # a whole sample
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(warmup - 1):
                for fn in fns.values():
                    fn()
            order = list(fns)
            for r in range(rounds):
                k0 = r % len(order)
                for k in order[k0:] + order[:k0]:  # rotate who goes first
                    times[k].append(once(fns[k]))
            results.append(_result(case, times, first))
    if limits is not None:
        limits.restore_original_limits()
    meta = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "cpu": _cpu_model(),  # the processor's model name
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "dtype": "float32",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "date": datetime.date.today().isoformat(),
    }
    return meta, results


def format_table(meta: dict, results: list[Result]) -> str:
    """The results as a Markdown table, with a line of metadata above it."""
    lines = [
        f"device {meta['device']}, {meta['threads']} thread(s), {meta['dtype']}, "
        f"{meta.get('cpu', '?')}, torch {meta['torch']}, numpy {meta['numpy']}, "
        f"{meta['rounds']} interleaved "
        "rounds; times are medians (min-max) in ms",
        "",
        "| measure | shape | bnlib ms | torch ms | ratio | best/best | target "
        "| bnlib GB/s | torch GB/s | copy GB/s (clone) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = "" if r.target is None else ("ok" if r.ratio <= r.target else "MISSED")
        target = "reported" if r.target is None else f"<= {r.target}x {ok}"
        lines.append(
            f"| {r.name} | {tuple(r.shape)} "
            f"| {r.ours_ms:.3f} ({r.ours_min_ms:.3f}-{r.ours_max_ms:.3f}) "
            f"| {r.torch_ms:.3f} ({r.torch_min_ms:.3f}-{r.torch_max_ms:.3f}) "
            f"| {r.ratio:.2f}x | {r.best_ratio:.2f}x | {target} "
            f"| {r.ours_gbps:.1f} | {r.torch_gbps:.1f} "
            f"| {r.copy_gbps:.1f} ({r.clone_gbps:.1f}) |"
        )
        for name, o in r.others.items():  # further variants, in the bnlib column
            lines.append(
                f"| {name} (same rounds) | {tuple(r.shape)} "
                f"| {o['ms']:.3f} ({o['min_ms']:.3f}-{o['max_ms']:.3f}) "
                f"| {r.torch_ms:.3f} | {o['ratio']:.2f}x | | reported "
                f"| {o['gbps']:.1f} | {r.torch_gbps:.1f} | |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnlib.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="where to write the results as JSON "
                   "(default: book/data/bench-<device>.json, where the book reads it, "
                   "if book/data exists here; else bench-<device>.json)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    args = p.parse_args(argv)
    meta, results = run(args.rounds, args.threads, args.device, args.quick)
    print(format_table(meta, results))
    book_data = "book/data" if os.path.isdir("book/data") and not args.quick else "."
    path = args.json or os.path.join(book_data, f"bench-{args.device}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
