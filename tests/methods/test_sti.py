"""methods/sti.py: the streaming STI analysis against the functional core, its passes under a memory budget,
its errors, and the CLI on the tiny local CLIP pool."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from fusion_bench_tsv.functional import pairwise_singular_task_interference

from support import run_fusion_bench
from oracles import decorrelated_sti_bound, sti_bound, assert_within, eps, oracle_sti, roundoff_bound


def make_pool(T=3, seed=0):
    torch.manual_seed(seed)
    pre = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    pool = {"_pretrained_": pre}
    for i in range(T):
        m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
        m.load_state_dict(pre.state_dict())
        for p in m.parameters():
            p.data += 0.1 * torch.randn_like(p)
        pool[f"task_{i}"] = m
    return pool


TOTALS = {"sti_full_sum": ("sti_full", "sum"), "sti_sum": ("sti", "sum"), "sti_decorrelated_sum": ("sti_decorrelated", "sum"),
          "sti_full_normalized_mean": ("sti_full_normalized", "mean"), "sti_normalized_mean": ("sti_normalized", "mean"),
          "sti_decorrelated_normalized_mean": ("sti_decorrelated_normalized", "mean"), "cosine_mean": ("cosine_mean", "mean")}


def check_totals(results: dict) -> None:
    """Every total recomputed from the per-layer rows (math.fsum, exact to one rounding); float64 sums of L
    terms err by at most L·ε₆₄·Σ|v|."""
    rows = results["layers"]
    for total, (column, how) in TOTALS.items():
        values = [r[column] for r in rows if r[column] is not None]
        if not values:
            assert total not in results["totals"], total
            continue
        expected = math.fsum(values) / (len(values) if how == "mean" else 1)
        bound = len(values) * eps(torch.float64) * math.fsum(abs(v) for v in values)
        assert_within(results["totals"][total], expected, bound, f"total {total} = {how} of {column}")


def layer_deltas(pool: dict, key: str, num_tasks: int) -> list:
    """The task updates of one layer, subtracted in float32 as the analysis does, as float64."""
    base = pool["_pretrained_"].state_dict()[key]
    return [(pool[f"task_{i}"].state_dict()[key] - base).double() for i in range(num_tasks)]


@pytest.mark.parametrize("max_memory_gb", [4.0, 1e-9], ids=["one-block", "one-row-blocks"])
def test_analysis_matches_functional(tmp_path, max_memory_gb):
    from fusion_bench_tsv import STIAnalysis

    pool = make_pool()
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in pool.items()}
    algo = STIAnalysis(save_path=str(tmp_path), show_pbar=False, device="cpu", max_memory_gb=max_memory_gb)
    assert algo.run(pool) is None
    results = algo.results
    assert results["tasks"] == ["task_0", "task_1", "task_2"]
    layers = ["0.weight", "2.weight"]
    assert [r["layer"] for r in results["layers"]] == layers
    pair_sum = torch.zeros(3, 3, dtype=torch.float64)
    pair_norm = torch.zeros(3, 3, dtype=torch.float64)
    pair_bound = pair_norm_bound = 0.0
    for row, key in zip(results["layers"], layers):
        deltas = layer_deltas(pool, key, 3)
        (m, n), r = deltas[0].shape, min(deltas[0].shape)
        assert row["k"] == r // 3
        # the analysis runs in float32 (the models' dtype); a normalized value's denominator adds ε-level error
        for column, k in (("sti_full", r), ("sti", r // 3)):
            value, l1 = oracle_sti(deltas, k)
            bound = sti_bound(deltas, k, torch.float32)
            assert_within(row[column], value, bound, f"{key} {column}")
            assert_within(row[f"{column}_normalized"], value / l1, 2 * bound / l1, f"{key} {column}_normalized")
        assert_within(row["sti_decorrelated_normalized"], 0.0, decorrelated_sti_bound(m, n, 3 * (r // 3), torch.float32),
                      f"{key} decorrelated")
        flat = torch.stack([d.flatten() for d in deltas])
        cos = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
        assert_within(row["cosine_mean"], cos[[0, 0, 1], [1, 2, 2]].mean(), roundoff_bound(torch.float32, m * n, 1.0),
                      f"{key} cosine")
        pair_sum += pairwise_singular_task_interference(deltas, r // 3)
        pair_norm += pairwise_singular_task_interference(deltas, r // 3, normalized=True)
        pair_bound += sti_bound(deltas, r // 3, torch.float32)  # the 3-task bound covers each pair's
        pair_norm_bound += 2 * sti_bound(deltas, r // 3, torch.float32) / oracle_sti(deltas, r // 3)[1]
    assert_within(torch.tensor(results["pairwise"]["sti_sum"]), pair_sum, pair_bound, "pairwise sum")
    assert_within(torch.tensor(results["pairwise"]["sti_normalized_mean"]), pair_norm / 2, pair_norm_bound / 2,
                  "pairwise normalized mean")
    check_totals(results)

    for name, model in pool.items():  # inputs never modified
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items())
    on_disk = json.loads((tmp_path / "sti.json").read_text())
    assert on_disk["totals"] == results["totals"]  # JSON writes floats with repr: exact
    with open(tmp_path / "sti.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == layers
    assert float(rows[1]["sti"]) == results["layers"][1]["sti"]  # csv writes floats with repr: exact
    for png in ("sti_per_layer.png", "sti_pairwise.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_rank_k_only_in_several_passes_gives_the_same_numbers(tmp_path):
    from fusion_bench_tsv import STIAnalysis

    pool = make_pool(T=4, seed=1)
    full = STIAnalysis(show_pbar=False, device="cpu")
    full.run(pool)
    small = STIAnalysis(full_rank=False, max_memory_gb=1e-9, show_pbar=False, device="cpu", rank=2)
    small.run(pool)
    ref = STIAnalysis(show_pbar=False, device="cpu", rank=2)
    ref.run(pool)
    for a, b in zip(small.results["layers"], ref.results["layers"]):
        assert a["sti_full"] is None and a["k"] == 2
        deltas = layer_deltas(pool, a["layer"], 4)
        (m, n), (value, l1) = deltas[0].shape, oracle_sti(deltas, 2)
        bound = 2 * sti_bound(deltas, 2, torch.float32)  # two float32 evaluations of the same value
        assert_within(a["sti"], b["sti"], bound, "sti")
        assert_within(a["sti_normalized"], b["sti_normalized"], 2 * bound / l1, "sti_normalized")
        assert_within(a["sti_decorrelated_normalized"], b["sti_decorrelated_normalized"],
                      2 * decorrelated_sti_bound(m, n, 8, torch.float32), "sti_decorrelated_normalized")
    check_totals(small.results)
    assert full.results["layers"][0]["k"] == 12 // 4


def test_analysis_bad_input():
    from fusion_bench_tsv import STIAnalysis

    pool = make_pool(T=2)
    with pytest.raises(ValueError, match="at least 2 fine-tuned models"):
        STIAnalysis(show_pbar=False).run({"_pretrained_": pool["_pretrained_"], "task_0": pool["task_0"]})
    with pytest.raises(ValueError, match=r"'rank'=9 exceeds the rank of parameter '2.weight'"):
        STIAnalysis(rank=9, show_pbar=False, device="cpu").run(pool)
    with pytest.raises(ValueError, match="max_memory_gb"):
        STIAnalysis(max_memory_gb=0)


@pytest.mark.cli
def test_cli_on_tiny_clip_pool(tiny_pool, tmp_path):
    proc = run_fusion_bench(
        [
            "--config-dir",
            str(tiny_pool["config_dir"]),
            "method=tsv/sti_analysis",
            f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
            "method.show_pbar=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = list(tmp_path.glob("outputs/**/sti.json"))
    assert len(found) == 1, list(tmp_path.glob("outputs/**/*"))
    out_dir = found[0].parent
    results = json.loads(found[0].read_text())
    assert results["tasks"] == tiny_pool["tasks"]
    check_totals(results)
    # the tiny CLIP's layers (k = floor(r/8), T·k <= r): decorrelation leaves round-off only
    largest = max(int(d) for row in results["layers"] for d in row["shape"].split("x"))
    bound = decorrelated_sti_bound(largest, largest, largest, torch.float32)
    assert results["totals"]["sti_normalized_mean"] > 1e3 * bound
    assert_within(results["totals"]["sti_decorrelated_normalized_mean"], 0.0, bound, "decorrelated mean")
    with open(out_dir / "sti.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results["layers"]) > 0
    for png in ("sti_per_layer.png", "sti_pairwise.png"):
        assert (out_dir / png).stat().st_size > 1000
    assert out_dir.name == "sti", "the default save_path is <log_dir>/sti"
    assert list(out_dir.parent.glob("**/events.out.tfevents*")), "no TensorBoard scalars"
