"""The page's plots, drawn with matplotlib's Agg canvas and returned as PNG data URIs.

Figures are made with the object API (``matplotlib.figure.Figure`` on a ``FigureCanvasAgg``):
no pyplot, so nothing global changes in a program that has its own matplotlib backend, and
nothing needs a display. matplotlib is imported when the first plot is drawn, so importing
guard (or guard.audit) does not pay for it.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["new_figure", "to_uri", "grid", "line_plot", "heatmap", "COLORS"]

DPI = 80
COLORS = ("#2456a6", "#d1495b", "#2e933c", "#edae49", "#7b4ea3", "#00798c", "#6c757d", "#a05a2c", "#e377c2", "#17becf")


def new_figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas, ``width`` x ``height`` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def to_uri(fig: Any) -> str:
    """The figure as a PNG data URI (drawn once: margins are set by the layout, not by a tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def grid(
    n: int, *, cols: int = 3, panel: tuple[float, float] = (3.4, 2.6), top: float = 0.35, bottom: float = 0.5
) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels in rows of ``cols`` (empty trailing panels hidden).

    Margins are fixed in inches (``top``: room above the first row for titles or a legend), so
    the figure is drawn once when saved."""
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    width, height = panel[0] * cols, panel[1] * rows + top + bottom - 0.5
    fig = new_figure(width, height)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.subplots_adjust(
        left=0.55 / width,
        right=1 - 0.15 / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=0.35,
        hspace=0.6 * 2.6 / panel[1],
    )
    return fig, axes[:n]


def line_plot(
    series: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[float] | None]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    size: tuple[float, float] = (6.4, 3.6),
    ylim: tuple[float, float] | None = (0.0, 1.0),
    xpercent: bool = False,
    ypercent: bool = True,
) -> str:
    """Lines (name, x, y, std or None) with a shaded +-std band, markers at the points."""
    from matplotlib.ticker import PercentFormatter

    fig = new_figure(*size)
    fig.subplots_adjust(left=0.8 / size[0], right=1 - 0.15 / size[0], bottom=0.55 / size[1], top=1 - 0.35 / size[1])
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, xs, ys, std) in enumerate(series):
        x, y = np.asarray(xs, float), np.asarray(ys, float)
        color = COLORS[k % len(COLORS)]
        ax.plot(x, y, marker="o", color=color, label=name)
        if std is not None:
            s = np.asarray(std, float)
            ax.fill_between(x, y - s, y + s, color=color, alpha=0.18, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if xpercent:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if ypercent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    return to_uri(fig)


def heatmap(ax: Any, values: np.ndarray, title: str, *, vmax: float = 1.0) -> None:
    """A grid of shares in [0, vmax] with each value written in its cell."""
    im = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=vmax)
    for (r, c), v in np.ndenumerate(values):
        ax.text(
            c, r, f"{100 * v:.0f}%", ha="center", va="center", fontsize=9, color="white" if v > 0.6 * vmax else "black"
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return im
