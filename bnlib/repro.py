"""Reproducibility for notebooks and tests: one arithmetic path, seeds, one thread.

The book's stored outputs are re-checked by nbval on whatever machine runs ``make
test``, so a run must print the same numbers there as where they were stored. Three
things decide the bits of a result besides the code: the seeds, the number of threads
(the order of a parallel sum), and the *code path* each numeric library picks for the
processor it finds. On x86-64 those are

- Intel MKL (torch's matrix products): picks SSE/AVX2/AVX-512 code by the CPU. Its
  ``MKL_CBWR=AVX2`` setting is honoured on Intel processors only; on AMD it is ignored
  (measured: the same GEMM bits under AVX2, AVX512, SSE4_2 and unset). ``COMPATIBLE`` is
  the one vendor-neutral mode, so that is the one used here;
- ATen's own vectorized kernels (elementwise ops, reductions, a linear layer's weight
  gradient): AVX2 or AVX-512 by the CPU unless ``ATEN_CPU_CAPABILITY`` says;
- oneDNN (convolutions): capped with ``ONEDNN_MAX_CPU_ISA``;
- OpenBLAS inside NumPy (``@``, ``dot``): a kernel per core type unless
  ``OPENBLAS_CORETYPE`` says, and NumPy's own SIMD loops (``exp``, ``tanh``), which use
  AVX-512 where they find it unless ``NPY_DISABLE_CPU_FEATURES`` turns it off.

:data:`PINNED_ENV` fixes all of them to the AVX2 level that every x86-64 CPU of the
last decade has. Each library reads its setting once, when it first loads or first
runs (NumPy at import, ATen at its first operation, MKL at its first product), so the
settings must be in place before any of that: a chapter's first cell sets
``BNLIB_ARITHMETIC=pinned`` and imports bnlib, whose ``__init__`` then calls
:func:`pin_arithmetic` before it imports NumPy or torch. Library users who never set
the variable get no side effect. ``BNLIB_ARITHMETIC=native`` leaves every library on
its own path (``make test`` runs each chapter that way too, to check that the claims
do not depend on the rounding). :func:`setup` warns when a notebook's numbers will not
be the book's because the pinning came too late.

It matters: a sigmoid network trained at a large learning rate turns a last-bit
difference into test accuracies points apart after hundreds of steps, and a different
CPU is then much like a different seed. That is why the chapters print spreads over
seeds and bounds rather than the last digits of one chaotic run.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import warnings
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and torch are imported only after the pinning
    import numpy as np

__all__ = ["PINNED_ENV", "arithmetic_mode", "cpu_has_avx2", "fingerprint",
           "pin_arithmetic", "seed_everything", "setup"]

#: The environment that puts every x86-64 CPU with AVX2 on the same arithmetic.
PINNED_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
# Settings that select AVX2 code: only where the CPU has AVX2 (OpenBLAS would run
# Haswell kernels on a CPU without it and crash).
_NEEDS_AVX2 = ("OPENBLAS_CORETYPE",)
MODE_VARIABLE = "BNLIB_ARITHMETIC"


def arithmetic_mode() -> str:
    """``"pinned"``, ``"native"`` or ``""`` (unset), from ``BNLIB_ARITHMETIC``."""
    mode = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if mode not in ("", "pinned", "native"):
        raise ValueError(f"{MODE_VARIABLE} must be 'pinned' or 'native', got {mode!r}")
    return mode


def cpu_has_avx2() -> bool:
    """Whether this is an x86-64 CPU with AVX2 (read without importing NumPy/torch)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:  # Linux
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        pass
    try:  # macOS on Intel
        import subprocess

        out = subprocess.run(["sysctl", "-n", "machdep.cpu.leaf7_features"],
                             capture_output=True, text=True, timeout=5).stdout
        return "AVX2" in out.upper()
    except (OSError, subprocess.SubprocessError):
        return False


def pin_arithmetic(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`PINNED_ENV` in ``environ`` (default ``os.environ``); return it.

    Overrides what was there, so that a stray ``MKL_CBWR`` cannot change the book's
    numbers. Must run before NumPy is imported and before torch's first operation;
    warns if NumPy or torch are already loaded.
    """
    environ = os.environ if environ is None else environ
    settings = {k: v for k, v in PINNED_ENV.items()
                if k not in _NEEDS_AVX2 or cpu_has_avx2()}
    environ.update(settings)
    late = [m for m in ("numpy", "torch") if m in sys.modules]
    if late and environ is os.environ:
        warnings.warn(
            f"bnlib pinned the arithmetic after {' and '.join(late)} loaded: NumPy and "
            "torch may already be on their own code paths, so the numbers may differ "
            "from the book's in the last digits. Restart the kernel and run the "
            "notebook from its first cell.", stacklevel=2)
    return settings


def _pinning_in_effect() -> list[str]:
    """What is not on the pinned path in this process (empty if all is)."""
    import torch

    wrong = [f"{k}={os.environ.get(k)!r}" for k in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
             if os.environ.get(k) != PINNED_ENV[k]]
    if cpu_has_avx2() and torch.backends.cpu.get_cpu_capability() != "AVX2":
        wrong.append(f"ATen capability {torch.backends.cpu.get_cpu_capability()}")
    return wrong


def fingerprint() -> dict[str, str]:
    """A short hash of this process's bits for each kind of operation the book uses.

    Two processes that return the same dict compute the same bits for a matrix
    product and its gradient (float32 and float64), a convolution and its gradient,
    ``exp``, ``tanh``, ``sigmoid``, a variance and a log-softmax in torch, and a
    matrix product, ``exp`` and ``tanh`` in NumPy; plus the versions, which decide
    the rest. ``make test`` compares it with the one stored beside the chapters
    (``book/data/arithmetic.json``) before it compares any output.
    """
    import hashlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    def h(a) -> str:
        if isinstance(a, torch.Tensor):
            a = a.detach().contiguous().numpy()
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:10]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        out = {"torch": torch.__version__.split("+")[0], "numpy": np.__version__}
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(60, 784, generator=g, dtype=dtype)
            w = torch.randn(100, 784, generator=g, dtype=dtype, requires_grad=True)
            y = torch.sigmoid(F.linear(x, w))
            F.cross_entropy(y[:, :10], torch.arange(60) % 10).backward()
            name = "" if dtype is torch.float32 else "64"
            out[f"gemm{name}"], out[f"gemm{name}_bwd"] = h(y), h(w.grad)
        xi = torch.randn(32, 3, 28, 28, generator=g)
        k = torch.randn(8, 3, 3, 3, generator=g, requires_grad=True)
        c = F.conv2d(xi, k, padding=1)
        c.relu().sum().backward()
        out["conv"], out["conv_bwd"] = h(c), h(k.grad)
        z = torch.randn(64, 64, generator=g)
        out["exp"], out["tanh"] = h(z.exp()), h(z.tanh())
        out["sigmoid"] = h(z.sigmoid())
        out["var"], out["log_softmax"] = h(z.var(0)), h(z.log_softmax(1))
        r = np.random.default_rng(0)
        a, b = r.standard_normal((60, 784)), r.standard_normal((784, 100))
        out["np_gemm"] = h(a @ b)
        out["np_gemm32"] = h(a.astype(np.float32) @ b.astype(np.float32))
        v = r.standard_normal(4096).astype(np.float32)
        out["np_exp"], out["np_tanh"] = h(np.exp(v)), h(np.tanh(v))
    finally:
        torch.set_num_threads(threads)
    return out


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python's, NumPy's and torch's generators; return a fresh NumPy Generator."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (legacy global state, for third-party code)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def setup(seed: int = 0, threads: int = 1) -> np.random.Generator:
    """Prepare a notebook: ``threads`` threads, deterministic kernels, seeded
    generators.

    Where ``BNLIB_ARITHMETIC=pinned`` (every chapter's first cell sets it), warns if
    the pinned arithmetic is not in effect. Returns a NumPy Generator seeded with
    ``seed`` for the notebook's own sampling.
    """
    import numpy as np
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if arithmetic_mode() == "pinned" and (wrong := _pinning_in_effect()):
        warnings.warn("the book's arithmetic is not pinned in this kernel ("
                      + ", ".join(wrong) + "): printed numbers may differ from the "
                      "book's. Restart the kernel and run from the first cell.",
                      stacklevel=2)
    if torch.cuda.is_available():
        # CPU kernels are deterministic on one thread; on CUDA some are not unless told.
        # (On CPU the call is skipped: it imports the compiler stack, ~1-2 s.)
        torch.use_deterministic_algorithms(True)
    np.set_printoptions(precision=4, suppress=True)
    torch.set_printoptions(precision=4, sci_mode=False)
    return seed_everything(seed)
