"""Small matplotlib figures for per-layer and per-task-pair results.

Object-oriented matplotlib only (``matplotlib.figure.Figure``, no ``pyplot``): no global backend is
set and nothing is shown; the caller saves the returned figure.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["curves", "per_layer_bars", "heatmap"]


def per_layer_bars(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    ylabel: str = "",
    log_scale: bool = False,
) -> Figure:
    """Grouped bar chart: one group per layer (x axis), one bar per series (legend)."""
    n, m = len(labels), max(len(series), 1)
    fig = Figure(figsize=(max(8.0, 0.28 * n * m), 4.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / m
    x = np.arange(n)
    for s, (name, values) in enumerate(series.items()):
        ax.bar(x + (s - (m - 1) / 2) * width, np.asarray(values, dtype=float), width, label=name)
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    if log_scale:
        ax.set_yscale("log", nonpositive="clip")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=m, fontsize=8)
    return fig


def heatmap(
    matrix: Sequence[Sequence[float]],
    labels: Sequence[str],
    *,
    title: str = "",
    colorbar_label: str = "",
    annotate: Optional[bool] = None,
    fmt: str = "{:.3g}",
) -> Figure:
    """Square heatmap of a ``T × T`` matrix with ``labels`` on both axes; values are written in the
    cells when ``annotate`` (default: when T <= 12). NaN cells (e.g. a masked diagonal) stay blank."""
    values = np.asarray(matrix, dtype=float)
    t = len(labels)
    size = max(4.5, 0.6 * t + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(t), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(t), labels, fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if annotate if annotate is not None else t <= 12:
        threshold = np.nanmin(values) + 0.5 * (np.nanmax(values) - np.nanmin(values))
        for i in range(t):
            for j in range(t):
                if np.isnan(values[i, j]):
                    continue
                color = "black" if values[i, j] > threshold else "white"
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=7, color=color)
    return fig


def curves(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    thin: Optional[Mapping[str, Sequence[float]]] = None,
    marker: Optional[tuple[float, float]] = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Figure:
    """Lines of ``series`` against ``x`` (thick, with points), ``thin`` ones behind them, and an optional
    star at ``marker`` = (x, y)."""
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, values in (thin or {}).items():
        ax.plot(x, np.asarray(values, dtype=float), linewidth=0.8, alpha=0.5, label=name)
    for name, values in series.items():
        ax.plot(x, np.asarray(values, dtype=float), "o-", linewidth=2.2, color="black", label=name)
    if marker is not None:
        ax.plot([marker[0]], [marker[1]], "*", markersize=16, color="tab:red", label=f"best ({marker[0]:g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize=8)
    return fig
