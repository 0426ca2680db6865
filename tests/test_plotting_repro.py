"""bnlib.plotting helpers return their axes; bnlib.repro makes runs repeatable."""

from __future__ import annotations

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
