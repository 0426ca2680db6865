"""The book's figure style, and small drawing helpers that take an ``ax`` and return it.

Colours are fixed per meaning across the book: without batch norm is always grey-blue,
with batch norm always orange, so a reader can tell them apart at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Polygon

__all__ = [
    "COLORS",
    "use_book_style",
    "plot_curves",
    "plot_percentiles",
    "draw_box",
    "draw_arrow",
    "draw_table",
    "draw_reduction_cube",
]

#: One colour per meaning, the same in every figure of the book: ``"none"`` (without
#: batch norm), ``"bn"`` (with it), ``"dropout"``, ``"bn+dropout"``, ``"torch"``
#: (torch's own), ``"accent"`` and ``"grey"``.
COLORS = {
    "none": "#4C72B0",  # without batch norm
    "bn": "#DD8452",  # with batch norm
    "dropout": "#55A868",
    "bn+dropout": "#C44E52",
    "torch": "#8172B3",
    "accent": "#937860",
    "grey": "#8C8C8C",
}


def use_book_style() -> None:
    """Set matplotlib's defaults for the book: small PNG figures, readable labels."""
    mpl.rcParams.update({
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": 80,
        "savefig.dpi": 80,
        "figure.constrained_layout.use": True,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "legend.frameon": False,
        "font.size": 10,
        "lines.linewidth": 1.8,
        "image.cmap": "viridis",
        "svg.hashsalt": "bnlib",  # deterministic ids if a figure is saved as SVG
    })


def plot_curves(
    ax: Axes,
    steps: Sequence[float],
    curves: dict[str, Sequence[float]],
    xlabel: str = "training step",
    ylabel: str = "",
    colors: dict[str, str] | None = None,
) -> Axes:
    """One line per entry of ``curves`` (label -> values) against ``steps``."""
    for label, values in curves.items():
        color = (colors or {}).get(label)
        ax.plot(steps, values, label=label, color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(curves) > 1:
        ax.legend()
    return ax


def plot_percentiles(
    ax: Axes,
    steps: Sequence[float],
    percentiles: np.ndarray,
    color: str,
    label: str = "",
) -> Axes:
    """Percentile bands over training: ``percentiles`` is (len(steps), 3), e.g. the
    15th, 50th and 85th percentiles of an activation; the median is a solid line and
    the outer two are thinner lines with the band between them shaded."""
    p = np.asarray(percentiles)
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] != len(steps):
        raise ValueError(f"percentiles must be ({len(steps)}, 3), got {p.shape}")
    ax.fill_between(steps, p[:, 0], p[:, 2], color=color, alpha=0.2, lw=0)
    ax.plot(steps, p[:, 1], color=color, label=label)
    ax.plot(steps, p[:, 0], color=color, lw=0.8)
    ax.plot(steps, p[:, 2], color=color, lw=0.8)
    return ax


def draw_box(
    ax: Axes,
    xy: tuple[float, float],
    text: str,
    width: float = 1.6,
    height: float = 0.8,
    color: str = "#EAEAF2",
    fontsize: float = 10,
) -> Axes:
    """A rounded box centred at ``xy`` with ``text`` in it (for diagrams)."""
    x, y = xy
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                boxstyle="round,pad=0.05", fc=color, ec="#444444"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return ax


def draw_arrow(
    ax: Axes, start: tuple[float, float], end: tuple[float, float], text: str = ""
) -> Axes:
    """An arrow from ``start`` to ``end``, with an optional label above its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14,
                                 color="#444444", lw=1.2))
    if text:
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(mx, my + 0.12, text, ha="center", va="bottom", fontsize=9)
    return ax


def draw_table(
    ax: Axes,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    col_widths: Sequence[float] | None = None,
    highlight: dict[int, str] | None = None,
) -> Axes:
    """A drawn table (header row shaded); ``highlight`` maps row index -> face
    colour."""
    ax.axis("off")
    table = ax.table(cellText=[list(r) for r in rows], colLabels=list(header),
                     colWidths=col_widths, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.5)
    for (r, _c), cell in table.get_celld().items():
        cell.set_edgecolor("#BBBBBB")
        if r == 0:
            cell.set_facecolor("#EAEAF2")
            cell.set_text_props(weight="bold")
        elif highlight and (r - 1) in highlight:
            cell.set_facecolor(highlight[r - 1])
    return ax


# The normalizations that draw_reduction_cube knows, and the title it gives each.
_CUBE_TITLES = {"batch": "Batch Norm", "layer": "Layer Norm",
                "instance": "Instance Norm", "group": "Group Norm"}


def _cube_shaded(norm: str, n: int, c: int, hw: int, groups: int) -> np.ndarray:
    """The (n, c, hw) mask of the values that share one statistic with the value of
    example 0, channel 0 (the set a mean and a variance are taken over)."""
    i, j = np.ogrid[:n, :c]  # (n, 1), (1, c)
    rule = {"batch": j == 0,  # one channel, every example and position
            "layer": i == 0,  # one example, every channel and position
            "instance": (i == 0) & (j == 0),  # one example, one channel
            "group": (i == 0) & (j < c // groups)}[norm]  # one example, one group
    return np.broadcast_to(rule[:, :, None], (n, c, hw))  # (n, c) -> (n, c, hw)


def draw_reduction_cube(
    ax: Axes,
    norm: str,
    *,
    n: int = 6,
    c: int = 6,
    hw: int = 5,
    groups: int = 3,
    title: str | None = None,
    color: str = "#6F9FD8",
    labels: tuple[str, str, str] = ("N (examples)", "C", "H, W"),
    dx: float = 0.55,
    dy: float = 0.4,
) -> Axes:
    """A batch of shape (N, C, H, W) drawn as a cube of ``n`` x ``c`` x ``hw`` cells,
    with the values that one statistic of ``norm`` is taken over shaded: the picture
    of Wu and He (2018, Group Normalization), with H and W on one axis.

    N runs to the right, H*W up and C into the page; the shaded set is the one that
    contains the value of example 0, channel 0:

    - ``"batch"``: one channel, every example and position, (N, H, W);
    - ``"layer"``: one example, every channel and position, (C, H, W);
    - ``"instance"``: one example, one channel, (H, W);
    - ``"group"``: one example, the first of ``groups`` groups of ``c // groups``
      channels, (C/G, H, W).

    ``title`` defaults to the norm's name ("Batch Norm", ...), ``labels`` names the N,
    C and H*W axes, ``dx`` and ``dy`` set the slant of the C axis. Each drawn face is a
    ``Polygon`` whose ``gid`` is ``"cell i,j,k"`` (its cell's example, channel and
    position). Raises ValueError for an unknown ``norm``, or ``groups`` that does not
    divide ``c``.
    """
    if norm not in _CUBE_TITLES:
        raise ValueError(f"norm must be one of {', '.join(map(repr, _CUBE_TITLES))}, "
                         f"got {norm!r}")
    if norm == "group" and (groups < 1 or c % groups):
        raise ValueError(f"groups must divide the {c} channels, got {groups}")
    shaded = _cube_shaded(norm, n, c, hw, groups)  # (n, c, hw) bool

    def xy(i: float, j: float, k: float) -> tuple[float, float]:  # (n, c, hw) -> page
        return i + j * dx, k + j * dy

    faces = [((i, 0, k), [(i, 0, k), (i + 1, 0, k), (i + 1, 0, k + 1), (i, 0, k + 1)])
             for i in range(n) for k in range(hw)]  # front: channel 0
    faces += [((i, j, hw - 1),
               [(i, j, hw), (i + 1, j, hw), (i + 1, j + 1, hw), (i, j + 1, hw)])
              for i in range(n) for j in range(c)]  # top: the last position
    faces += [((n - 1, j, k),
               [(n, j, k), (n, j + 1, k), (n, j + 1, k + 1), (n, j, k + 1)])
              for j in range(c) for k in range(hw)]  # right side: the last example
    for (i, j, k), corners in faces:
        ax.add_patch(Polygon([xy(*p) for p in corners],
                             fc=color if shaded[i, j, k] else "white", ec="#555555",
                             lw=0.6, gid=f"cell {i},{j},{k}"))
    n_label, c_label, hw_label = labels
    ax.annotate("", xy(n, 0, -0.6), xy(0, 0, -0.6), arrowprops={"arrowstyle": "->"})
    ax.text(n / 2, -1.3, n_label, ha="center", va="center", fontsize=9)
    ax.annotate("", xy(-0.6, 0, hw), xy(-0.6, 0, 0), arrowprops={"arrowstyle": "->"})
    ax.text(-1.0, hw / 2, hw_label, ha="right", va="center", fontsize=9, rotation=90)
    ax.annotate("", xy(n + 0.4, c, 0), xy(n + 0.4, 0, 0),
                arrowprops={"arrowstyle": "->"})
    ax.text(*xy(n + 0.9, c / 2, 0), c_label, ha="left", va="center", fontsize=9)
    ax.set_title(_CUBE_TITLES[norm] if title is None else title)
    ax.set(xlim=(-2, n + c * dx + 1.6), ylim=(-1.8, hw + c * dy + 0.4), aspect="equal")
    ax.axis("off")
    return ax
