"""bnlib.plotting helpers return their axes; bnlib.repro makes runs repeatable."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bnlib import plotting, repro  # noqa: E402


def test_helpers_draw_on_the_given_axes():
    plotting.use_book_style()
    assert matplotlib.rcParams["axes.spines.top"] is False
    fig, ax = plt.subplots()
    curves = {"a": [1, 2], "b": [2, 1]}
    assert plotting.plot_curves(ax, [1, 2], curves, ylabel="y") is ax
    assert len(ax.lines) == 2 and ax.get_legend() is not None
    assert plotting.plot_percentiles(ax, [1, 2], np.ones((2, 3)), "red") is ax
    assert plotting.draw_box(ax, (0, 0), "BN") is ax
    assert plotting.draw_arrow(ax, (0, 0), (1, 0), "x") is ax
    assert plotting.draw_table(ax, ["name", "shape"], [["gamma", "(C,)"]]) is ax
    with pytest.raises(ValueError, match=r"percentiles must be \(2, 3\)"):
        plotting.plot_percentiles(ax, [1, 2], np.ones((3, 3)), "red")
    plt.close(fig)


def test_setup_makes_runs_repeatable():
    rng = repro.setup(seed=5)
    a = (rng.standard_normal(3), torch.randn(3))
    rng = repro.setup(seed=5)
    b = (rng.standard_normal(3), torch.randn(3))
    np.testing.assert_array_equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert torch.get_num_threads() == 1
    torch.use_deterministic_algorithms(False)


def test_setup_pins_the_math_libraries_code_paths(monkeypatch):
    """setup() asks MKL and oneDNN for their AVX2 code paths (the same rounding on
    every x86 CPU with AVX2 or better), unless the user chose otherwise."""
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    repro.setup(threads=torch.get_num_threads())
    assert os.environ["MKL_CBWR"] == "AVX2"
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "SSE41"
