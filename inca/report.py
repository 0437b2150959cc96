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
from matplotlib.figure import Figure
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

