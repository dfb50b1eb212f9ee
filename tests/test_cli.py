"""The real ``fusion_bench`` CLI: config composition from anywhere, and an end-to-end offline run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from support import REPO_ROOT, run_fusion_bench
from oracles import assert_state_within, oracle_merge_state

pytestmark = pytest.mark.cli

MODELS = ["clip-vit-base-patch32", "clip-vit-base-patch16", "clip-vit-large-patch14"]
SUITES = ["TA8", "TALL14", "TALL20"]


@pytest.mark.parametrize("where", ["tmp", "repo_root"])
def test_cli_composes_tall20_with_our_method(where, tmp_path):
    cwd = tmp_path if where == "tmp" else REPO_ROOT
    proc = run_fusion_bench(
        [
            "--cfg",
            "job",
            "method=tsv/tsv_merge",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TALL20_model_only",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TALL20",
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["_target_"] == "fusion_bench.programs.FabricModelFusionProgram"
    assert cfg["method"]["_target_"] == "fusion_bench_tsv.TSVMergeAlgorithm"
    assert cfg["method"]["alpha"] == 1.0 and cfg["method"]["exclude_keys"] == ["*text_projection*"]
    assert cfg["modelpool"]["_target_"] == "fusion_bench.modelpool.CLIPVisionModelPool"
    assert len(cfg["modelpool"]["models"]) == 21  # _pretrained_ + 20 tasks
    assert len(cfg["taskpool"]["test_datasets"]) == 20


COMPOSE_ALL = textwrap.dedent(
    """
    import json, sys
    from hydra import compose, initialize_config_dir
    from fusion_bench.utils.hydra_utils import get_default_config_path

    out = {}
    with initialize_config_dir(config_dir=get_default_config_path(), version_base=None):
        for model in %r:
            for suite in %r:
                cfg = compose("fabric_model_fusion", overrides=[
                    "method=tsv/tsv_merge",
                    f"modelpool=CLIPVisionModelPool/{model}_{suite}_model_only",
                    f"taskpool=CLIPVisionModelTaskPool/clip-vit-classification_{suite}",
                ])
                out[f"{model}_{suite}"] = [cfg.method._target_, len(cfg.modelpool.models) - 1, len(cfg.taskpool.test_datasets)]
    json.dump({"config_path": get_default_config_path(), "runs": out}, sys.stdout)
    """
) % (MODELS, SUITES)


@pytest.mark.parametrize("where", ["tmp", "repo_root"])
def test_all_standard_benchmarks_compose_with_our_method(where, tmp_path):
    """Hydra's compose API with the primary config directory the ``fusion_bench`` CLI would pick here."""
    cwd = tmp_path if where == "tmp" else REPO_ROOT
    proc = subprocess.run([sys.executable, "-c", COMPOSE_ALL], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    if where == "repo_root":
        assert Path(result["config_path"]) == REPO_ROOT / "config"  # ours is primary here; FusionBench's is found too
    sizes = {"TA8": 8, "TALL14": 14, "TALL20": 20}
    assert len(result["runs"]) == 9
    for name, (target, num_models, num_datasets) in result["runs"].items():
        suite = name.rsplit("_", 1)[1]
        assert target == "fusion_bench_tsv.TSVMergeAlgorithm"
        assert num_models == num_datasets == sizes[suite], name


def test_end_to_end_offline_run_reports_accuracy_per_task(tiny_pool, tmp_path):
    proc = run_fusion_bench(
        [
            "--config-dir",
            str(tiny_pool["config_dir"]),
            "method=tsv/tsv_merge",
            f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
            f"taskpool=CLIPVisionModelTaskPool/{tiny_pool['name']}",
            "fabric.accelerator=cpu",
            f"method.save_path={tmp_path / 'merged'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    (log_file,) = (tmp_path / "outputs" / "fabric_model_fusion").glob("*/*.log")  # the job's log: records unwrapped
    assert "TSV-M: T=8 tasks" in log_file.read_text() and ": 4 (32 of rank " in log_file.read_text()
    assert "Instantiate by calling" not in log  # FusionBench's boxes are off for our methods' runs (config/tsv/cli.yaml)
    assert "Unused argument" not in log, [line for line in log.splitlines() if "Unused argument" in line]
    reports = list((tmp_path / "outputs" / "fabric_model_fusion").glob("*/program_report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    for task in ["shade_a", "shade_b"]:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
    # the mean of two floats: one rounding, far inside pytest.approx's relative 1e-6
    assert report["average"]["accuracy"] == pytest.approx(
        (report["shade_a"]["accuracy"] + report["shade_b"]["accuracy"]) / 2
    )
    check_saved_merge(tiny_pool, tmp_path / "merged")


def check_saved_merge(tiny_pool, saved) -> None:
    """The CLI's merged weights against the float64 oracle of the same pool (the default svd_method is
    float64 throughout) and against an in-process run of the same algorithm, each within its derived bound."""
    import torch
    from fusion_bench.modelpool import CLIPVisionModelPool
    from transformers import CLIPVisionModel

    from fusion_bench_tsv import TSVMergeAlgorithm

    load = lambda path: CLIPVisionModel.from_pretrained(path).state_dict()  # noqa: E731
    base = load(tiny_pool["pretrained"])
    states = [load(tiny_pool["paths"][t]) for t in tiny_pool["tasks"]]
    cli = load(saved)
    expected, bounds = oracle_merge_state(base, states, torch.float64, gram=True, exclude=["*text_projection*"])
    assert_state_within(cli, expected, bounds, "CLI vs float64 oracle")
    models = {"_pretrained_": str(tiny_pool["pretrained"]), **{t: str(p) for t, p in tiny_pool["paths"].items()}}
    pool = CLIPVisionModelPool(models=models, processor=str(tiny_pool["pretrained"]))
    here = TSVMergeAlgorithm(show_pbar=False).run(pool).state_dict()
    assert_state_within(cli, here, {k: 2 * b for k, b in bounds.items()}, "CLI vs in-process run")


def summary_block(log: str, method: str) -> list[str]:
    """The closing summary: the lines from '<method> summary:' to the end, which must be the run's last lines."""
    lines = log.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"{method} summary:")]
    assert len(starts) == 1, f"{len(starts)} summaries: {log[-3000:]}"
    block = lines[starts[0]:]
    assert all(line.startswith("  ") for line in block[1:]), f"the summary is not the last thing printed: {block}"
    return block


def run_dir(tmp_path: Path) -> Path:
    (found,) = (tmp_path / "outputs" / "fabric_model_fusion").glob("*/program_report.json")
    return found.parent


def test_tsv_merge_cli_ends_in_its_summary(tiny_pool, tmp_path):
    """The summary (α, k, T, average accuracy of the program's report, run directory) is printed last, once; the
    task pool's result is not logged again on the terminal; no line says the merge ran in float32; TensorBoard
    events are written; a model saved by method.save_path is not contradicted by FusionBench's line."""
    proc = run_fusion_bench(["--config-dir", str(tiny_pool["config_dir"]), "method=tsv/tsv_merge",
                             f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
                             f"taskpool=CLIPVisionModelTaskPool/{tiny_pool['name']}", "fabric.accelerator=cpu",
                             "method.save_path='{log_dir}/merged'"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    block = summary_block(proc.stdout, "TSV-M")
    report = json.loads((run_dir(tmp_path) / "program_report.json").read_text())
    by_shape = json.loads((run_dir(tmp_path) / "tsv_merge_ranks.json").read_text())["by_shape"]
    ks = sorted({g["k"] for g in by_shape})  # the k each matrix was merged with, from the rank report
    k = str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"
    assert block[0] == f"TSV-M summary: alpha=1.0, k={k} per task (floor(min(m, n) / T)), T=8, svd_method=gram"
    assert f"  average accuracy: {100 * report['average']['accuracy']:.2f}% over 2 tasks" in block
    assert f"  merged model (method.save_path): {run_dir(tmp_path) / 'merged'}" in block
    assert "Evaluation Result" not in log and "Profiler Report" not in log
    (log_file,) = run_dir(tmp_path).glob("*.log")  # the job's log file: records unwrapped
    records = log_file.read_text()
    assert "(computed in torch.float32)" not in records and "(matrices merged in torch.float64" in records
    assert "its program's line after the run ('No save path specified" in records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run_dir(tmp_path).glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events))
    scalars.Reload()
    value = lambda tag: scalars.Scalars(tag)[-1].value  # noqa: E731
    # TensorBoard stores float32: the report's float64 within half an ulp of float32
    assert value("tsv_m/alpha") == 1.0
    assert value("tsv_m/average_accuracy") == pytest.approx(report["average"]["accuracy"], rel=2**-24)
    assert value("tsv_m/accuracy/shade_a") == pytest.approx(report["shade_a"]["accuracy"], rel=2**-24)


def test_tsv_compress_cli_ends_in_its_summary_and_labels_reports(tiny_pool, tmp_path):
    """TSV-C's run ends in its summary, not in a failed pretty print of a raw dict; the task pool's report of
    every routed evaluation is labelled (routed_eval/<model>-<task>.json), none is left as report_<n>.json."""
    proc = run_fusion_bench(["--config-dir", str(tiny_pool["config_dir"]), "method=tsv/tsv_compress",
                             f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
                             f"taskpool=CLIPVisionModelTaskPool/{tiny_pool['name']}", "fabric.accelerator=cpu"],
                            cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "Failed to pretty print" not in log and "'layers':" not in log
    block = summary_block(proc.stdout, "TSV-C")
    out = run_dir(tmp_path)
    report = json.loads((out / "program_report.json").read_text())
    assert f"  average accuracy: {100 * report['average']['accuracy']:.2f}% over 2 tasks" in block
    normalized = report["average"].get("normalized_accuracy")  # None where a fine-tuned accuracy is 0
    assert any(line.startswith("  normalized accuracy: ") for line in block) == (normalized is not None)
    assert sorted(p.name for p in out.glob("report*.json")) == []
    assert sorted(p.name for p in (out / "routed_eval").iterdir()) == [
        f"{model}-{task}.json" for model in ("finetuned", "tsv_c") for task in ("shade_a", "shade_b")]


def test_cli_error_is_printed_once_and_last(tiny_pool, tmp_path):
    proc = run_fusion_bench(["--config-dir", str(tiny_pool["config_dir"]), "method=tsv/tsv_merge", "method.rank=1000",
                             f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
                             f"taskpool=CLIPVisionModelTaskPool/{tiny_pool['name']}", "fabric.accelerator=cpu"],
                            cwd=tmp_path)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert log.count("option 'rank'=1000 exceeds") == 1 and "summary:" not in log
    tail = proc.stderr.rstrip().splitlines()[-3:]
    assert any("option 'rank'=1000 exceeds" in line for line in tail), tail


def test_empty_data_variable_means_the_default_root(tmp_path):
    """FUSION_BENCH_TSV_DATA= (set, empty) resolves the benchmark's configs like an unset variable."""
    import os

    env = dict(os.environ, FUSION_BENCH_TSV_DATA="", HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    exe = Path(sys.executable).parent / "fusion_bench"
    proc = subprocess.run([str(exe), "--cfg", "job", "--resolve", "method=tsv/tsv_merge",
                           "modelpool=CLIPVisionModelPool/tiny_clip_8"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"_pretrained_: {tmp_path}/.cache/fusion_bench_tsv/tiny_clip/pretrained" in proc.stdout
