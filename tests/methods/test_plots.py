"""The figures' content: what the axes and colour bars say, which values are written."""

from __future__ import annotations

import numpy as np

from fusion_bench_tsv.methods.plots import heatmap, per_layer_bars


def test_pairwise_heatmap_of_14_tasks_keeps_its_cell_labels():
    t = 14
    values = np.arange(t * t, dtype=float).reshape(t, t)
    np.fill_diagonal(values, np.nan)
    fig = heatmap(values, [f"task_{i}" for i in range(t)], colorbar_label="STI, not normalized")
    ax, bar = fig.axes
    assert len(ax.texts) == t * (t - 1)  # every cell but the blank diagonal
    assert bar.get_ylabel() == "STI, not normalized"


def test_per_layer_values_many_orders_smaller_get_their_own_log_axis():
    fig = per_layer_bars(["a", "b"], {"full rank": [200.0, 150.0], "rank k": [30.0, 20.0]},
                         lower={"after TSV-M": [1e-11, 3e-12]}, ylabel="STI / ||Σ||₁", lower_ylabel="after TSV-M (log)")
    top, bottom = fig.axes
    assert top.get_yscale() == "linear" and bottom.get_yscale() == "log"
    low, high = top.get_ylim()
    assert low <= 20.0 and high >= 200.0 and high < 1e3  # full rank and rank k on one readable linear axis
