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
same bytes, measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
    copy: Callable[[], object]
    traffic: int  # tensors of x's size that must be read or written, at least
    target: float | None
    repeat: int = 1  # calls per timed sample (small inputs: many, against timer noise)


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
    copy_gbps: float


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

    def copy_of(x):
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
                              copy_of(x), traffic=5, target=target))

    # 2. bnlib.nn forward + backward, and eval forward, against torch.nn.
    def train_step(m, x, dy):
        y = m(x)
        return torch.autograd.grad(y, (x, m.weight, m.bias), dy)

    def eval_step(m, x):
        with torch.no_grad():
            return m(x)

    for shape in (image, table):
        x, dy = tensors(shape)
        xt = x.clone().requires_grad_()
        name = f"BatchNorm{max(len(shape) - 2, 1)}d"
        ours, theirs = (getattr(lib, name)(shape[1]).to(device)
                        for lib in (bnn, torch.nn))
        cases.append(Case("bnlib.nn fwd+bwd vs torch.nn", shape,
                          partial(train_step, ours, xt, dy),
                          partial(train_step, theirs, xt, dy),
                          copy_of(x), traffic=5,
                          target=1.5 if shape == image else None))
        ours_e, theirs_e = (getattr(lib, name)(shape[1]).to(device).eval()
                            for lib in (bnn, torch.nn))
        cases.append(Case("bnlib.nn eval fwd vs torch.nn", shape,
                          partial(eval_step, ours_e, x),
                          partial(eval_step, theirs_e, x),
                          copy_of(x), traffic=2, target=1.2))

    # 3. torch.compile of bnlib.nn (Inductor fuses the traced equations) against
    # torch.nn's eager kernel: the target is to be at least as fast.
    x, dy = tensors(image)
    xt = x.clone().requires_grad_()
    compiled = torch.compile(bnn.BatchNorm2d(image[1]).to(device), fullgraph=True)
    theirs = torch.nn.BatchNorm2d(image[1]).to(device)
    cases.append(Case("torch.compile(bnlib.nn) fwd+bwd vs torch.nn", image,
                      partial(train_step, compiled, xt, dy),
                      partial(train_step, theirs, xt, dy),
                      copy_of(x), traffic=5, target=1.0))

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
                          repeated(copy_of(x), n), traffic=2, target=1.5, repeat=n))

    # 5. The sizes the book trains: per-call overhead, not memory, is the cost.
    for shape in ((8, 16), (16, 32)) if quick else ((60, 100), (128, 256)):
        x, dy = tensors(shape)
        xt = x.clone().requires_grad_()
        ours, theirs = (lib.BatchNorm1d(shape[1]).to(device) for lib in (bnn, torch.nn))
        n = 20
        cases.append(Case("bnlib.nn fwd+bwd vs torch.nn (small)", shape,
                          repeated(partial(train_step, ours, xt, dy), n),
                          repeated(partial(train_step, theirs, xt, dy), n),
                          repeated(copy_of(x), n), traffic=5, target=2.0, repeat=n))
    return cases


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
    for case in _cases(device, quick):
        if quick:
            case.target = None  # the targets are for the full-size shapes
        fns = {"ours": case.ours, "theirs": case.theirs, "copy": case.copy}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        order = list(fns)
        for r in range(rounds):
            for k in order[r % 3:] + order[: r % 3]:  # rotate who goes first
                times[k].append(once(fns[k]))
        times = {k: [t / case.repeat for t in v] for k, v in times.items()}
        nbytes = int(np.prod(case.shape)) * 4
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(o / t for o, t in zip(times["ours"], times["theirs"],
                                                        strict=True))
        results.append(Result(
            case.name, case.shape,
            med["ours"] * 1e3, min(times["ours"]) * 1e3, max(times["ours"]) * 1e3,
            med["theirs"] * 1e3, min(times["theirs"]) * 1e3, max(times["theirs"]) * 1e3,
            ratio, min(times["ours"]) / min(times["theirs"]), case.target,
            case.traffic * nbytes / med["ours"] / 1e9,
            case.traffic * nbytes / med["theirs"] / 1e9,
            2 * nbytes / med["copy"] / 1e9,
        ))
    if limits is not None:
        limits.restore_original_limits()
    meta = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
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
        f"torch {meta['torch']}, numpy {meta['numpy']}, {meta['rounds']} interleaved "
        "rounds; times are medians (min-max) in ms",
        "",
        "| measure | shape | bnlib ms | torch ms | ratio | best/best | target "
        "| bnlib GB/s | torch GB/s | copy GB/s |",
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
            f"| {r.copy_gbps:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnlib.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="where to write the results as JSON "
                   "(default: bench-<device>.json)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    args = p.parse_args(argv)
    meta, results = run(args.rounds, args.threads, args.device, args.quick)
    print(format_table(meta, results))
    path = args.json or f"bench-{args.device}.json"
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
