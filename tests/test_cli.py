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
    assert "TSV-M: T=8 tasks" in log and "k=4 per task" in log
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
