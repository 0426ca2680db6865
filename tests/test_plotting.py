"""bnlib.plotting: the helpers draw on the axes they are given and return them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bnlib import plotting  # noqa: E402


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


def _shares_a_statistic(norm: str, n: int, c: int, hw: int, groups: int) -> np.ndarray:
    """The (n, c, hw) mask of the values that torch's own normalization of ``norm`` uses
    to normalize example 0, channel 0, position 0: where its gradient is nonzero."""
    x = torch.randn(n, c, hw, dtype=torch.float64, requires_grad=True)  # (N, C, H*W)
    normalize = {
        "batch": lambda t: torch.nn.functional.batch_norm(t, None, None, training=True),
        "layer": lambda t: torch.nn.functional.layer_norm(t, t.shape[1:]),
        "instance": lambda t: torch.nn.functional.instance_norm(t),
        "group": lambda t: torch.nn.functional.group_norm(t, groups),
    }[norm]
    normalize(x)[0, 0, 0].backward()
    return (x.grad.abs() > 1e-12).numpy()


@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "group"])
def test_reduction_cube_shades_the_values_of_one_statistic(norm):
    """Each visible face is shaded exactly when its value is in the set that torch's
    batch/layer/instance/group norm takes the statistic of value (0, 0, 0) over."""
    n, c, hw, groups = 4, 6, 3, 3
    expected = _shares_a_statistic(norm, n, c, hw, groups)
    fig, ax = plt.subplots()
    assert plotting.draw_reduction_cube(ax, norm, n=n, c=c, hw=hw, groups=groups) is ax
    drawn = {}
    for patch in ax.patches:
        i, j, k = map(int, patch.get_gid().removeprefix("cell ").split(","))
        drawn[i, j, k] = patch.get_facecolor()[:3] != (1.0, 1.0, 1.0)
    visible = {(i, 0, k) for i in range(n) for k in range(hw)}  # front, top, right
    visible |= {(i, j, hw - 1) for i in range(n) for j in range(c)}
    visible |= {(n - 1, j, k) for j in range(c) for k in range(hw)}
    assert set(drawn) == visible
    assert all(drawn[cell] == expected[cell] for cell in visible)
    assert any(drawn.values()) and not all(drawn.values())
    assert ax.get_title() == f"{norm.capitalize()} Norm"
    plt.close(fig)


def test_reduction_cube_rejects_what_it_cannot_draw():
    fig, ax = plt.subplots()
    allowed = "'batch', 'layer', 'instance', 'group'"
    with pytest.raises(ValueError, match=f"one of {allowed}, got 'pixel'"):
        plotting.draw_reduction_cube(ax, "pixel")
    with pytest.raises(ValueError, match="groups must divide the 6 channels, got 4"):
        plotting.draw_reduction_cube(ax, "group", groups=4)
    plt.close(fig)
