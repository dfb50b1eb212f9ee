"""The comparison's table (markdown, also printed), its figure and its files.

The table has one line per (method, source) and one column per number of tasks: average accuracy, the
normalized accuracy in parentheses (:data:`~.rows.NORMALIZED`) and α. The figure draws every series with its
own colour and marker (``tab20`` and a 20-marker cycle, hollow markers) and shifts the series sideways by a
little, so that identical curves stay visible side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..io.atomic import write_atomic
from .rows import NORMALIZED

__all__ = ["ROW_ORDER", "COMPUTED", "series_styles", "markdown", "legend", "figure", "write_outputs"]

ROW_ORDER = ["zero_shot", "fine_tuned", "simple_average", "task_arithmetic", "task_arithmetic_val_alpha",
             "ties_merging", "ties_merging_val_alpha", "fusion_bench_tsvm", "fusion_bench_tsvm_val_alpha",
             "iso_c", "iso_c_val_alpha", "iso_cts", "iso_cts_val_alpha", "tsv_merge", "tsv_merge_val_alpha",
             "tsv_merge_alpha_grid", "tsv_compress"]
COMPUTED = "this command"
"""The source shown for rows computed by the command itself (they carry no ``source``)."""

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H", "1", "2", "3", "4", "x"]
LINESTYLES = ["-", "--", "-.", ":"]
Key = Tuple[str, str]


def series_styles(n: int) -> List[dict]:
    """Matplotlib styles of ``n`` series: ``tab20``'s 20 colours (its darker 10 first) and 20 markers, each
    used once in the first 20 series; beyond, the marker cycle shifts by one every 20 series, so no two of the
    first 400 series share both colour and marker."""
    tab20 = colormaps["tab20"].colors
    colours = [tab20[i] for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    return [{"color": colours[i % 20], "marker": MARKERS[(i + i // 20) % len(MARKERS)],
             "linestyle": LINESTYLES[i % len(LINESTYLES)]} for i in range(n)]


def _order(rows: Sequence[dict]) -> Tuple[List[Key], List[int], Dict[Tuple[str, str, int], dict]]:
    """The table's lines (method, source): sources in order of appearance, methods in :data:`ROW_ORDER`;
    the sizes; the rows by (method, source, size)."""
    sources = list(dict.fromkeys(r.get("source") or COMPUTED for r in rows))
    rank = {m: i for i, m in enumerate(ROW_ORDER)}
    keys = list(dict.fromkeys((r["method"], r.get("source") or COMPUTED) for r in rows))
    keys.sort(key=lambda k: (sources.index(k[1]), rank.get(k[0], len(rank)), k[0]))
    by = {(r["method"], r.get("source") or COMPUTED, r["num_tasks"]): r for r in rows}
    return keys, sorted({r["num_tasks"] for r in rows}), by


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return "–"
    norm = row.get("normalized_accuracy")
    alpha = row.get("alpha")
    return (f"{row['avg_accuracy']:.1f} ({'–' if norm is None else f'{norm:.1f}'})"
            + ("" if alpha is None else f" α={alpha:g}"))


def markdown(rows: Sequence[dict]) -> str:
    """The table (one line per method and source), :data:`NORMALIZED` above it, and the wall time per row
    below it for the rows computed by the command."""
    keys, sizes, by = _order(rows)
    sourced = len({k[1] for k in keys}) > 1
    head = ["method", *(["source"] if sourced else []), *(f"{n} tasks: acc % (norm. %)" for n in sizes)]
    lines = [f"Average test accuracy %; {NORMALIZED}; α: the scale of the merged update.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, source in keys:
        cells = [method, *([source] if sourced else []), *(_cell(by.get((method, source, n))) for n in sizes)]
        lines.append("| " + " | ".join(cells) + " |")
    # the times of rows computed by the command (stored rows of other sources keep theirs in their files)
    timed = [k for k in keys if k[1] == COMPUTED and any(by.get((*k, n), {}).get("seconds") is not None for n in sizes)]
    if timed:
        lines += ["", "Wall time per row, seconds (a `_val_alpha` row includes its validation runs):", "",
                  "| method | " + " | ".join(f"{n} tasks" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for method, source in timed:
            times = [by.get((method, source, n), {}).get("seconds") for n in sizes]
            lines.append(f"| {method} | " + " | ".join("–" if t is None else f"{t:.1f}" for t in times) + " |")
    return "\n".join(lines) + "\n"


def legend(rows: Sequence[dict]) -> List[str]:
    """One line per row read from a run or a file: its source, path, options and what normalized it."""
    lines = []
    for r in rows:
        if r.get("options") is None:  # stored and computed rows: their source names the file
            continue
        details = [f"{r['num_tasks']} tasks"]
        if r.get("pools"):
            details.append(" + ".join(r["pools"]))
        if r["options"]:
            details.append("options " + " ".join(r["options"]))
        details.append(f"normalized by {r['fine_tuned_from']}" if r.get("fine_tuned_from")
                       else "not normalized: no fine-tuned accuracies for its tasks (--fine-tuned)")
        lines.append(f"{r['method']} [{r['source']}]: {r['path']} ({'; '.join(details)})")
    return lines


def _dodge(n: int, width: float) -> np.ndarray:
    """Sideways offsets of ``n`` series, spread evenly over ``width``."""
    return np.zeros(1) if n == 1 else (np.arange(n) / (n - 1) - 0.5) * width


def figure(rows: Sequence[dict], title: str = "") -> Figure:
    """Average accuracy against the number of tasks; with a single number of tasks, accuracy per task (and
    the average; markers only). One series per table line, styled by :func:`series_styles`."""
    keys, sizes, by = _order(rows)
    styles = series_styles(len(keys))
    sourced = len({k[1] for k in keys}) > 1
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    if len(sizes) > 1:
        x_labels = [str(n) for n in sizes]
        x = np.asarray(sizes, dtype=float)
        values = [[by.get((*k, n), {}).get("avg_accuracy", np.nan) for n in sizes] for k in keys]
        ax.set_xlabel("number of tasks")
        ax.set_ylabel("average test accuracy (%)")
    else:
        tasks = list(dict.fromkeys(t for k in keys for t in by[(*k, sizes[0])]["per_task"]))
        x_labels = [*tasks, "average"]
        x = np.arange(len(x_labels), dtype=float)
        values = [[by[(*k, sizes[0])]["per_task"].get(t, np.nan) for t in tasks] + [by[(*k, sizes[0])]["avg_accuracy"]]
                  for k in keys]
        ax.set_xlabel(f"task ({sizes[0]} tasks)")
        ax.set_ylabel("test accuracy (%)")
    # within 0.6 of a task's slot, 0.3 of the smallest gap between sizes (less reads as another size)
    gap = float(np.min(np.diff(x))) if len(x) > 1 else 1.0
    offsets = _dodge(len(keys), (0.6 if len(sizes) == 1 else 0.3) * gap)
    for key, ys, style, dx in zip(keys, values, styles, offsets):
        label = f"{key[0]} [{key[1]}]" if sourced else key[0]
        if len(sizes) == 1:  # tasks are categories: no lines between them
            style = {**style, "linestyle": "none"}
        ax.plot(x + dx, ys, label=label, markerfacecolor="none", markersize=6, lw=1.3, **style)
    ax.set_xticks(x, x_labels, rotation=30 if len(sizes) == 1 else 0, ha="right" if len(sizes) == 1 else "center")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def write_outputs(rows: Sequence[dict], out: Path, name: str, title: str = "") -> List[Path]:
    """``<out>/<name>.json`` (the rows), ``.md`` (:func:`markdown`) and ``.png`` (:func:`figure`), each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    write_atomic(paths[0], lambda p: p.write_text(json.dumps(list(rows), indent=1) + "\n", encoding="utf-8"))
    write_atomic(paths[1], lambda p: p.write_text(markdown(rows), encoding="utf-8"))
    fig = figure(rows, title)
    write_atomic(paths[2], lambda p: fig.savefig(p, dpi=120, format="png"))
    return paths
