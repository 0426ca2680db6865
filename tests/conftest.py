"""Shared fixtures: devices (CPU always, CUDA where present), seeded generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
