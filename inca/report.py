"""Reports: Markdown tables and PNG plots (JSON goes through :mod:`inca.io`'s atomic writes).

Plots are drawn with matplotlib's object API (:class:`~matplotlib.figure.Figure` rendered by its Agg
canvas), never ``pyplot``: importing inca does not switch the caller's backend or touch pyplot's
global figure registry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .io import atomic_write


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *map(line, cells)]) + "\n"


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


Series = dict[str, tuple[Sequence[float], Sequence[float]]]
LEGEND_ENTRIES = 40  # series a legend of plot_curves names: two columns of 20


def plot_lines(
    path: str | os.PathLike,
    panels: dict[str, Series],
    xlabel: str,
    ylabel: str,
    title: str,
    marks: dict[str, dict[str, Sequence[float]]] | None = None,
    dashed: dict[str, Series] | None = None,
) -> None:
    """One subplot per panel (e.g. per task), one line per series (x, y) in it; ``marks[panel][series]``
    highlights xs of a series with stars (e.g. the best layers), ``dashed[panel][series]`` is a companion (x, y)
    drawn dashed in the series' colour (e.g. test accuracy beside the val accuracy that chose)."""
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(6.5 * cols, 4.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        for label, (x, y) in series.items():
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=label)
            companion = (dashed or {}).get(panel, {}).get(label)
            if companion is not None:
                ax.plot(*companion, linestyle="--", linewidth=1, color=line.get_color())
            for mark in (marks or {}).get(panel, {}).get(label, []):
                best = list(x).index(mark)
                ax.plot([x[best]], [y[best]], marker="*", markersize=13, color=line.get_color())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_scatter(
    path: str | os.PathLike, points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, title: str
) -> None:
    """Labelled points, x on a log scale (e.g. accuracy against trainable parameters)."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_heatmap(
    path: str | os.PathLike, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, xlabel: str
) -> None:
    """A rows x cols grid with each cell's value written in it (e.g. tasks x layers accuracy)."""
    fig = Figure(figsize=(max(5, 0.55 * len(cols) + 2.5), max(2.5, 0.45 * len(rows) + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)



def plot_curves(
    path: str | os.PathLike,
    panels: dict[str, dict[str, Sequence[float | None]]],
    title: str,
    highlight: str | None = None,
    marks: dict[str, int] | None = None,
) -> None:
    """Per-epoch curves side by side, one panel each (``panels[ylabel][series]``: one value per epoch from epoch 1,
    None where there is none), each series in one colour across the panels and one legend for them all;
    ``highlight`` drawn bold, and ``marks[series]`` (an epoch) starred in every panel (e.g. the best epoch). The
    legend names at most :data:`LEGEND_ENTRIES` series (``highlight`` first when they are more), then how many more."""
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20 else "viridis"]
    colors = {label: palette(i if len(labels) <= 20 else i / max(1, len(labels) - 1)) for i, label in enumerate(labels)}
    listed = labels
    if len(labels) > LEGEND_ENTRIES:
        listed = sorted(labels, key=lambda label: label != highlight)[: LEGEND_ENTRIES - 1]
    handles = [Line2D([], [], color=colors[label], linewidth=2.4 if label == highlight else 1.0) for label in listed]
    if len(listed) < len(labels):
        handles.append(Line2D([], [], linestyle="none"))
        listed = [*listed, f"... {len(labels) - len(listed)} more"]
    columns = -(-len(listed) // 20)  # legend columns of at most 20 entries
    fig = Figure(figsize=(5.5 * len(panels) + 1.6 * columns + 1, 4.2))
    axes = fig.subplots(1, len(panels) + 1, squeeze=False,
                        gridspec_kw={"width_ratios": [4] * len(panels) + [1.2 * columns]})[0]
    for ax, (ylabel, series) in zip(axes, panels.items()):
        for label, values in series.items():
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            x = np.arange(1, len(y) + 1)
            bold = label == highlight
            ax.plot(x, y, color=colors[label], linewidth=2.4 if bold else 1.0, zorder=3 if bold else 2,
                    marker="o" if len(y) < 30 else None, markersize=2.5)
            mark = (marks or {}).get(label)
            if mark and 0 < mark <= len(y) and np.isfinite(y[mark - 1]):
                ax.plot([mark], [y[mark - 1]], marker="*", markersize=12, color=colors[label], zorder=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].axis("off")
    axes[-1].legend(handles, listed, loc="upper left", fontsize=8 if len(labels) <= 10 else 6, ncols=columns,
                    frameon=False)
    fig.suptitle(title)
    save_figure(fig, path)
