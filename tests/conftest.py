"""Shared fixtures: devices (CPU always, CUDA where present), seeded generators."""

from __future__ import annotations

import os

# The book's arithmetic path (bnlib/repro.py) before NumPy and torch load, as in every
# chapter, so that the golden values are the chapters' own. BNLIB_ARITHMETIC=native
# in the environment runs the suite on this CPU's own path instead.
os.environ.setdefault("BNLIB_ARITHMETIC", "pinned")
import bnlib  # noqa: E402,F401,I001  (pins, with the variable above)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="no CUDA device: the GPU cases run where there is one")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
