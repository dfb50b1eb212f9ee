"""TSV-M's α chosen on validation tasks (options ``alpha_grid``, ``validation_taskpool``): one merge, one
validation pass per α, the best α returned, the curve written, the options checked."""

from __future__ import annotations

import json
from typing import Dict, List

import pytest
import torch
from omegaconf import OmegaConf

from fusion_bench_tsv import TSVMergeAlgorithm
from fusion_bench_tsv.runtime import merge_job

from methods.test_tsv_merge import copy_pool, make_pool_models, pool_states
from oracles import assert_state_within, assert_within, eps, oracle_merge_state
from support import local_clip_pool, run_fusion_bench

GRID = [0.5, 1.0, 2.0]


class ScriptedTaskPool:
    """A validation task pool that returns scripted accuracies, in call order, and records each model it sees."""

    _fabric_instance = None  # set by load_taskpool, as FusionBench's program does

    def __init__(self, accuracies: List[float]):
        self.accuracies, self.seen = list(accuracies), []

    def evaluate(self, model: torch.nn.Module) -> Dict[str, dict]:
        self.seen.append({k: v.clone() for k, v in model.state_dict().items()})
        accuracy = self.accuracies.pop(0)
        return {"task_a": {"accuracy": accuracy}, "task_b": {"accuracy": 1.0 - accuracy}, "average": {"accuracy": accuracy}}


def plain(models: dict, alpha, svd_method: str) -> dict:
    return TSVMergeAlgorithm(alpha=alpha, show_pbar=False, svd_method=svd_method).run(copy_pool(models)).state_dict()


def count_calls(monkeypatch) -> Dict[str, int]:
    """Counts of the truncated SVDs and of the per-parameter merges (M formed) of the merge job."""
    calls = {"svd": 0, "update": 0}
    svd, update = merge_job.truncated_svd, merge_job.ParameterMerge.update

    def counted_svd(*args, **kwargs):
        calls["svd"] += 1
        return svd(*args, **kwargs)

    def counted_update(self, acc):
        calls["update"] += 1
        return update(self, acc)

    monkeypatch.setattr(merge_job, "truncated_svd", counted_svd)
    monkeypatch.setattr(merge_job.ParameterMerge, "update", counted_update)
    return calls


def test_merges_once_and_each_alpha_is_a_plain_run_bitwise(monkeypatch):
    """svd_method=svd computes M in float32, θ₀'s dtype: θ₀ + α·M is the plain run's own arithmetic, bitwise."""
    models = make_pool_models(3)
    calls = count_calls(monkeypatch)
    taskpool = ScriptedTaskPool([0.3, 0.5, 0.5])  # a tie: the smaller alpha (1.0) wins
    algorithm = TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool=taskpool, show_pbar=False, svd_method="svd")
    merged = algorithm.run(copy_pool(models)).state_dict()
    grid_calls = dict(calls)
    plain(models, 1.0, "svd")
    assert grid_calls == {k: v - grid_calls[k] for k, v in calls.items()}, f"grid {grid_calls}, plain run {calls}"
    assert grid_calls["svd"] > 0 and len(taskpool.seen) == len(GRID)
    for alpha, seen in zip(GRID, taskpool.seen):
        expected = plain(models, alpha, "svd")
        assert all(torch.equal(seen[k], expected[k]) for k in expected), f"alpha={alpha} differs from a plain run"
    expected = plain(models, 1.0, "svd")
    assert all(torch.equal(merged[k], expected[k]) for k in expected), "returned model != plain run at best alpha"
    results = algorithm.alpha_grid_results
    assert [p["alpha"] for p in results["curve"]] == GRID
    assert [p["accuracy"] for p in results["curve"]] == [0.3, 0.5, 0.5]
    assert results["best"] == {"alpha": 1.0, "accuracy": 0.5, "per_task": {"task_a": 0.5, "task_b": 0.5}}


def test_gram_returned_model_within_rounding_of_plain_run_and_oracle():
    """svd_method=gram keeps M in float32 while the plain run adds the float64 M: each rounds θ₀ + α·M once more."""
    models = make_pool_models(4)
    taskpool = ScriptedTaskPool([0.1, 0.2, 0.9])
    merged = TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool=taskpool, show_pbar=False).run(copy_pool(models))
    got, expected = merged.state_dict(), plain(models, 2.0, "gram")
    theta0 = models["_pretrained_"].state_dict()
    for key in expected:
        # M→float32, α·M and the float32 sum each round by ≤ ε₃₂/2 of |αM| or |θ|, the plain run's last rounding by
        # ≤ ε₃₂/2 of |θ|: ≤ ε₃₂(|θ| + |αM|), |αM| ≤ |θ − θ₀| + ε₃₂|θ|; 1 + 4ε₃₂ for second-order terms
        plain_value, update = expected[key].double(), (expected[key].double() - theta0[key].double()).abs()
        bound = eps(torch.float32) * (plain_value.abs() * (1 + eps(torch.float32)) + update) * (1 + 4 * eps(torch.float32))
        assert_within(got[key], expected[key], bound, f"{key}: grid at alpha=2 vs plain run")
    oracle, bounds = oracle_merge_state(*pool_states(models), torch.float64, gram=True, alpha=2.0)
    assert_state_within(got, oracle, bounds, "grid at alpha=2 vs float64 oracle")


def test_per_task_alpha_list_still_scales_the_task_vectors(capsys):
    """A list ``alpha`` scales each Δᵢ before the SVD; the grid scales the merged update: at α=1 the plain run.
    The summary shows both: the chosen α and the task scales."""
    models = make_pool_models(3)
    alphas = [0.5, 1.5, 0.8]
    merged = TSVMergeAlgorithm(alpha=alphas, alpha_grid=[2.0, 1.0], validation_taskpool=ScriptedTaskPool([0.1, 0.2]),
                               show_pbar=False, svd_method="svd").run(copy_pool(models)).state_dict()
    expected = plain(models, alphas, "svd")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert "TSV-M summary: alpha=1.0, task scales=[0.5, 1.5, 0.8], k=" in capsys.readouterr().out


def test_outputs_in_log_dir_and_no_validation_report(tmp_path):
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger

    taskpool = ScriptedTaskPool([0.2, 0.6, 0.4])
    algorithm = TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool=taskpool, show_pbar=False)
    algorithm.fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path), name="run"))
    algorithm.run(copy_pool(make_pool_models(2)))
    out_dir = tmp_path / "run" / "version_0" / "alpha_grid"
    results = json.loads((out_dir / "alpha_grid.json").read_text())
    assert [p["alpha"] for p in results["curve"]] == GRID and results["best"]["alpha"] == 1.0
    assert results["curve"][2]["per_task"] == {"task_a": 0.4, "task_b": 0.6}
    assert (out_dir / "alpha_grid.png").stat().st_size > 1000
    assert (out_dir / ".fusion_bench_tsv_output.json").is_file()
    assert taskpool._fabric_instance._loggers == [], "the validation passes would write report.json into the log dir"
    assert algorithm.fabric._loggers, "the run's own Fabric keeps its logger"


def test_real_clip_taskpool_curve_matches_direct_evaluation(tiny_pool):
    """On FusionBench's CLIPVisionModelTaskPool (the tiny pool's test sets as validation data): each point of
    the curve is that task pool's accuracy of the plain run at that α (svd: the same weights, bitwise)."""
    from fusion_bench import instantiate

    config = OmegaConf.load(tiny_pool["config_dir"] / "taskpool" / "CLIPVisionModelTaskPool" / f"{tiny_pool['name']}.yaml")
    grid = [0.5, 2.0]
    algorithm = TSVMergeAlgorithm(alpha_grid=grid, validation_taskpool=config, show_pbar=False, svd_method="svd")
    merged = algorithm.run(local_clip_pool(tiny_pool))
    direct = instantiate(config, _recursive_=False)
    for point in algorithm.alpha_grid_results["curve"]:
        model = TSVMergeAlgorithm(alpha=point["alpha"], show_pbar=False, svd_method="svd").run(local_clip_pool(tiny_pool))
        report = direct.evaluate(model)
        assert point["accuracy"] == report["average"]["accuracy"], (point, report["average"])
        assert point["per_task"] == {t: report[t]["accuracy"] for t in point["per_task"]}
    best = algorithm.alpha_grid_results["best"]["alpha"]
    assert best == max(grid, key=lambda a: ([p["accuracy"] for p in algorithm.alpha_grid_results["curve"]
                                              if p["alpha"] == a][0], -a))
    expected = TSVMergeAlgorithm(alpha=best, show_pbar=False, svd_method="svd").run(local_clip_pool(tiny_pool))
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in merged.state_dict().items())


@pytest.mark.parametrize("grid", [[], [0.0], [-1.0, 1.0], [1.0, 1.0], [float("nan")], "0.5", 0.5, ["1"]])
def test_bad_grid_is_refused_naming_the_option(grid):
    with pytest.raises(ValueError, match=r"option 'alpha_grid' must be a list of distinct finite positive numbers"):
        TSVMergeAlgorithm(alpha_grid=grid, validation_taskpool=ScriptedTaskPool([]))


@pytest.mark.parametrize("spec", [{"batch_size": 2}, 3, "", " CLIPVisionModelTaskPool/tiny_clip_8_val"])
def test_bad_validation_taskpool_is_refused_naming_the_option(spec):
    with pytest.raises(ValueError, match=r"option 'validation_taskpool' must be a task pool config"):
        TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool=spec)


def test_grid_without_validation_taskpool_or_unknown_name_is_refused_before_merging(monkeypatch):
    def no_merge(*args, **kwargs):
        raise AssertionError("the merge started before the options were checked")

    monkeypatch.setattr(merge_job, "tsv_merge_factors", no_merge)
    pool = copy_pool(make_pool_models(2))
    with pytest.raises(ValueError, match=r"option 'alpha_grid' needs option 'validation_taskpool'"):
        TSVMergeAlgorithm(alpha_grid=GRID, show_pbar=False).run(pool)
    with pytest.raises(ValueError, match=r"'validation_taskpool'='CLIPVisionModelTaskPool/tiny_clip_8_vl' is not a "
                                         r"task pool config .*CLIPVisionModelTaskPool/tiny_clip_8_val"):
        TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool="CLIPVisionModelTaskPool/tiny_clip_8_vl",
                          show_pbar=False).run(pool)


@pytest.mark.parametrize("suite", ["TA8", "TALL14", "TALL20"])
def test_hub_validation_pools_compose_like_their_test_pools(suite):
    """FusionBench's hub CLIP pools: the val pool has the test pool's tasks, in order, each a val split carved
    from FusionBench's own train config of the task (composed only: nothing is downloaded)."""
    from hydra_plugins.fusion_bench_tsv_searchpath import fusion_bench_config_dir

    from fusion_bench_tsv.methods.alpha_grid import _compose_taskpool

    val = _compose_taskpool(f"CLIPVisionModelTaskPool/clip-vit-classification_{suite}_val")
    test = _compose_taskpool(f"CLIPVisionModelTaskPool/clip-vit-classification_{suite}")
    assert list(val.test_datasets) == list(test.test_datasets)
    train_dir = fusion_bench_config_dir() / "dataset" / "image_classification" / "train"
    for task, dataset in val.test_datasets.items():
        assert dataset._target_ == "fusion_bench.utils.data.train_validation_split" and dataset.return_split == "val"
        assert dataset.dataset == OmegaConf.load(train_dir / f"{task}.yaml")[task], task
    assert val.clip_model == test.clip_model


def test_cli_alpha_grid_with_a_taskpool_name(tiny_pool, tmp_path):
    """The CLI: the validation pool named as taskpool= takes it (composed in the running CLI's search path,
    --config-dir included); the curve is written and the test report is the only report."""
    name = tiny_pool["name"]
    proc = run_fusion_bench(
        [
            "--config-dir", str(tiny_pool["config_dir"]),
            "method=tsv/tsv_merge", f"modelpool=CLIPVisionModelPool/{name}", f"taskpool=CLIPVisionModelTaskPool/{name}",
            "method.alpha_grid=[0.5,1.0]", f"method.validation_taskpool=CLIPVisionModelTaskPool/{name}",
            "method.show_pbar=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = list(tmp_path.glob("outputs/**/alpha_grid/alpha_grid.json"))
    assert len(found) == 1, list(tmp_path.glob("outputs/**/*"))
    results = json.loads(found[0].read_text())
    assert [p["alpha"] for p in results["curve"]] == [0.5, 1.0]
    assert (found[0].parent / "alpha_grid.png").stat().st_size > 1000
    log_dir = found[0].parent.parent
    reports = sorted(p.name for p in log_dir.glob("report*.json"))
    assert len(reports) <= 1, f"validation passes wrote reports into the log dir: {reports}"
    assert f"best alpha={results['best']['alpha']:g}" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ non-finite scores, ties, layout
NAN = float("nan")


@pytest.mark.parametrize("scores, best", [
    ([NAN, 0.2, 0.9, 0.5], 1.5),  # a NaN first is never the best (the case)
    ([0.2, NAN, 0.9, 0.5], 1.5),  # nor in the middle
    ([0.2, 0.5, 0.9, NAN], 1.5),  # nor last
    ([float("inf"), 0.2, 0.9, 0.9], 1.5),  # an infinite score is not a finite one; tie 0.9/0.9: the smaller alpha
    ([0.4, 0.4, 0.1, 0.4], 0.5),  # ties: the smaller alpha, wherever it is
])
def test_non_finite_scores_are_ignored_wherever_they_are(scores, best, caplog):
    grid = [0.5, 1.0, 1.5, 2.0] if scores[0] != 0.4 else [1.0, 0.5, 1.5, 2.0]
    models = make_pool_models(2)
    algorithm = TSVMergeAlgorithm(alpha_grid=grid, validation_taskpool=ScriptedTaskPool(scores), show_pbar=False,
                                  svd_method="svd")
    merged = algorithm.run(copy_pool(models)).state_dict()
    assert algorithm.alpha_grid_results["best"]["alpha"] == best
    expected = plain(models, best, "svd")
    assert all(torch.equal(merged[k], expected[k]) for k in expected), "returned model != plain run at best alpha"
    if any(s != s or abs(s) == float("inf") for s in scores):
        assert "ignored" in caplog.text


def test_non_finite_scores_are_null_in_alpha_grid_json(tmp_path):
    """JSON has no NaN: a NaN score is written as null, and the file parses as strict JSON."""
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger

    algorithm = TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool=ScriptedTaskPool([NAN, 0.6, 0.4]), show_pbar=False)
    algorithm.fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path), name="run"))
    algorithm.run(copy_pool(make_pool_models(2)))

    def refuse(constant):
        raise ValueError(f"alpha_grid.json holds {constant}, which is not JSON")

    text = (tmp_path / "run" / "version_0" / "alpha_grid" / "alpha_grid.json").read_text()
    results = json.loads(text, parse_constant=refuse)
    assert results["curve"][0]["accuracy"] is None and results["best"]["alpha"] == GRID[1]


def test_all_nan_grid_is_an_error_naming_the_validation_pool():
    algorithm = TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool=ScriptedTaskPool([NAN] * 3), show_pbar=False)
    with pytest.raises(ValueError, match=r"validation task pool ScriptedTaskPool gave no finite average accuracy"):
        algorithm.run(copy_pool(make_pool_models(2)))


class HalvingTaskPool(ScriptedTaskPool):
    """A validation pool that casts the model to float16 (and back to nothing) before evaluating, as some do."""

    def evaluate(self, model: torch.nn.Module) -> Dict[str, dict]:
        model.half()
        return super().evaluate(model)


def test_returned_model_keeps_its_dtype_and_values_after_a_pool_that_halves_it():
    """The model is float32 before validation: the returned model is float32 and bitwise the plain run's, even for
    parameters outside the merge's updates (a pool's .half() rounds every floating tensor)."""
    models = make_pool_models(2)
    taskpool = HalvingTaskPool([0.1, 0.7, 0.3])
    merged = TSVMergeAlgorithm(alpha_grid=GRID, validation_taskpool=taskpool, show_pbar=False,
                               svd_method="svd").run(copy_pool(models))
    assert all(v.dtype == torch.float32 for v in merged.state_dict().values() if v.is_floating_point())
    assert {v.dtype for s in taskpool.seen for v in s.values() if v.is_floating_point()} == {torch.float16}
    expected = plain(models, 1.0, "svd")
    assert all(torch.equal(merged.state_dict()[k], expected[k]) for k in expected)


def test_missing_validation_pool_suggests_the_val_pool_of_the_cli_taskpool(monkeypatch):
    """On the offline benchmark the hint names its own _val pool, not a hub one."""
    from hydra.core.hydra_config import HydraConfig

    from fusion_bench_tsv.methods import alpha_grid

    choices = {"taskpool": "CLIPVisionModelTaskPool/tiny_clip_8", "modelpool": "CLIPVisionModelPool/tiny_clip_8"}
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: OmegaConf.create({"runtime": {"choices": choices}})))
    monkeypatch.setattr(alpha_grid, "_available_val_configs",
                        lambda: ["CLIPVisionModelTaskPool/tiny_clip_8_val", "CLIPVisionModelTaskPool/small_clip_8_val"])
    assert alpha_grid._suggested_val_pool() == "CLIPVisionModelTaskPool/tiny_clip_8_val"
    choices.update(taskpool="dummy", modelpool="CLIPVisionModelPool/small_clip_8_model_only")
    assert alpha_grid._suggested_val_pool() == "CLIPVisionModelTaskPool/small_clip_8_val"
    with pytest.raises(ValueError, match=r"e\.g\. method\.validation_taskpool=CLIPVisionModelTaskPool/small_clip_8_val"):
        TSVMergeAlgorithm(alpha_grid=GRID, show_pbar=False).run(copy_pool(make_pool_models(2)))
