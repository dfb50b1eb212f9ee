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
    lower: Optional[Mapping[str, Sequence[float]]] = None,
    lower_ylabel: str = "",
) -> Figure:
    """Grouped bar chart: one group per layer (x axis), one bar per series (legend). ``lower``: series drawn in
    a second panel below on their own axis (log scale), e.g. values many orders of magnitude smaller that would
    squeeze the others together on one axis."""
    panels = [series] + ([lower] if lower else [])
    n, m = len(labels), max(len(series) + len(lower or {}), 1)
    fig = Figure(figsize=(max(8.0, 0.28 * n * m), 4.8 + 2.4 * (len(panels) - 1)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False, height_ratios=[2] + [1] * (len(panels) - 1))[:, 0]
    x = np.arange(n)
    colors = iter(f"C{i}" for i in range(m))
    for p, (ax, group) in enumerate(zip(axes, panels)):
        k = len(group)
        for s, (name, values) in enumerate(group.items()):
            ax.bar(x + (s - (k - 1) / 2) * 0.8 / k, np.asarray(values, dtype=float), 0.8 / k, label=name,
                   color=next(colors))
        if log_scale if p == 0 else True:
            ax.set_yscale("log", nonpositive="clip")
        ax.set_ylabel(ylabel if p == 0 else lower_ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, labels, rotation=90, fontsize=7)
    axes[-1].set_xlim(-0.6, n - 0.4)
    axes[0].set_title(title)
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
    cells when ``annotate`` (default: when T <= 20, smaller above 12). NaN cells (e.g. a masked diagonal) stay blank."""
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
    if annotate if annotate is not None else t <= 20:
        threshold = np.nanmin(values) + 0.5 * (np.nanmax(values) - np.nanmin(values))
        for i in range(t):
            for j in range(t):
                if np.isnan(values[i, j]):
                    continue
                color = "black" if values[i, j] > threshold else "white"
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=7 if t <= 12 else 5.5,
                        color=color)
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
