"""Reproducibility for notebooks and tests: fixed seeds and one thread.

The book's stored outputs are re-checked by nbval, so every run must print the same
numbers: seed every generator, and use one thread, since the order of a parallel sum
changes its last bits. The same holds across processors: on x86, PyTorch's matrix
products come from Intel MKL, which picks its code path (SSE, AVX2, AVX-512) by the CPU,
and each path rounds differently. ``MKL_CBWR=AVX2`` (MKL's conditional numerical
reproducibility) makes every CPU with AVX2 or better take the same path, and
``ONEDNN_MAX_CPU_ISA=AVX2`` does the same for oneDNN's convolutions. It matters: a
sigmoid network trained at a large learning rate amplifies a last-bit difference into
test accuracies 4 points apart after 700 steps (chapter 5's plain baseline: 0.840 on
the default AVX-512 path of one Xeon, 0.880 with AVX2).
"""

from __future__ import annotations

import os
import random

import numpy as np

__all__ = ["seed_everything", "setup"]


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python's, NumPy's and torch's generators; return a fresh NumPy Generator."""
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (legacy global state, for third-party code)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def setup(seed: int = 0, threads: int = 1) -> np.random.Generator:
    """Prepare a notebook: ``threads`` threads, deterministic kernels, seeded
    generators.

    Returns a NumPy Generator seeded with ``seed`` for the notebook's own sampling.
    """
    # Before the first matrix product or convolution: MKL and oneDNN read these when
    # they first run. oneDNN (convolutions) is capped at AVX2 for the same reason.
    os.environ.setdefault("MKL_CBWR", "AVX2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        # CPU kernels are deterministic on one thread; on CUDA some are not unless told.
        # (On CPU the call is skipped: it imports the compiler stack, ~1-2 s.)
        torch.use_deterministic_algorithms(True)
    np.set_printoptions(precision=4, suppress=True)
    torch.set_printoptions(precision=4, sci_mode=False)
    return seed_everything(seed)
