"""fusion-bench-tsv-compare: rows read from FusionBench run directories, the normalized accuracy, the table,
the figure's styles, the per-row logs and progress of the baselines."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion_bench_tsv.compare import baselines, cli, report, rows

# accuracies as fractions; fine-tuned ones far apart so that the mean of ratios differs from the ratio of means
FINE = {"a": 0.9, "b": 0.3, "c": 0.6}
ZERO = {"a": 0.3, "b": 0.1, "c": 0.2}


def fake_run(root: Path, name: str, choice: str, method: dict, overrides: list, accuracy: dict,
             alpha_grid_best: float | None = None) -> Path:
    """A run directory as ``fusion_bench`` writes it (path.log_dir = hydra.run.dir, output_subdir ""):
    program_report.json, config.yaml, hydra.yaml, overrides.yaml; TSV-M's alpha grid under alpha_grid/."""
    run = root / name
    run.mkdir(parents=True)
    report = {"model_info": {"trainable_params": 10, "all_params": 10, "trainable_percentage": 1.0},
              **{t: {"accuracy": a, "loss": 1.0} for t, a in accuracy.items()},
              "average": {"accuracy": sum(accuracy.values()) / len(accuracy), "loss": 1.0}}
    (run / "program_report.json").write_text(json.dumps(report))
    config = {"method": method, "modelpool": {"_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
                                              "models": {"_pretrained_": "p", **{t: t for t in accuracy}}},
              "path": {"log_dir": "${.output_dir}/${hydra:job.config_name}/${now:%Y-%m-%d_%H-%M-%S}"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"method": choice, "modelpool": "CLIPVisionModelPool/fake_3", "taskpool": "CLIPVisionModelTaskPool/fake_3"}
    (run / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (run / "overrides.yaml").write_text(yaml.safe_dump([f"method={choice}", *overrides]))
    if alpha_grid_best is not None:
        (run / "alpha_grid").mkdir()
        (run / "alpha_grid" / "alpha_grid.json").write_text(json.dumps({"best": {"alpha": alpha_grid_best}}))
    return run


@pytest.fixture
def three_runs(tmp_path):
    runs = tmp_path / "outputs" / "fabric_model_fusion"
    tsvm = fake_run(runs, "r1", "tsv/tsv_merge", {"_target_": "x.TSVMergeAlgorithm", "alpha": 0.7},
                    ["method.alpha=0.7"], {"a": 0.27, "b": 0.27, "c": 0.36})
    ta = fake_run(runs, "r2", "task_arithmetic", {"_target_": "x.TaskArithmeticAlgorithm", "scaling_factor": 0.3},
                  [], {"a": 0.45, "b": 0.15, "c": 0.6})
    grid = fake_run(runs, "r3", "tsv/tsv_merge", {"_target_": "x.TSVMergeAlgorithm", "alpha": 1.0,
                                                  "alpha_grid": [0.5, 1.0]},
                    ["method.alpha_grid=[0.5,1.0]"], {"a": 0.9, "b": 0.0, "c": 0.42}, alpha_grid_best=0.5)
    build = tmp_path / "build.json"
    build.write_text(json.dumps({"tasks": {t: {"zero_shot_test": ZERO[t], "fine_tuned_test": FINE[t]} for t in FINE}}))
    return {"runs": runs, "dirs": [tsvm, ta, grid], "build": build, "tmp": tmp_path}


def _oracle(accuracy: dict) -> tuple[float, float]:
    """Average and normalized accuracy (%), in float64 from their definitions."""
    acc = np.array([accuracy[t] for t in FINE], dtype=np.float64)
    fine = np.array([FINE[t] for t in FINE], dtype=np.float64)
    return 100 * acc.mean(), 100 * (acc / fine).mean()


def test_tables_run_directories_with_the_normalized_definition(three_runs, capsys):
    out = three_runs["tmp"] / "table"
    with pytest.raises(SystemExit) as done:
        cli.main([str(three_runs["runs"]), "--fine-tuned", str(three_runs["build"]), "--out", str(out)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert rows.NORMALIZED in printed and rows.NORMALIZED in (out / "comparison.md").read_text()
    assert rows.NORMALIZED == ("normalized accuracy = mean over tasks of (the task's accuracy / the fine-tuned "
                               "model's accuracy on that task), in %")
    table = {(r["method"], r["source"]): r for r in json.loads((out / "comparison.json").read_text())}
    assert set(table) == {("tsv_merge", "r1"), ("task_arithmetic", "r2"), ("tsv_merge_alpha_grid", "r3"),
                          ("zero_shot", "build.json"), ("fine_tuned", "build.json")}
    expected = {("tsv_merge", "r1"): ({"a": 0.27, "b": 0.27, "c": 0.36}, 0.7),
                ("task_arithmetic", "r2"): ({"a": 0.45, "b": 0.15, "c": 0.6}, 0.3),
                ("tsv_merge_alpha_grid", "r3"): ({"a": 0.9, "b": 0.0, "c": 0.42}, 0.5),
                ("zero_shot", "build.json"): (ZERO, None), ("fine_tuned", "build.json"): (FINE, None)}
    for key, (accuracy, alpha) in expected.items():
        avg, norm = _oracle(accuracy)
        # three-term means of fractions: the float32-free path is exact to a few float64 ulps (~1e-14 relative)
        assert (table[key]["avg_accuracy"], table[key]["normalized_accuracy"]) == pytest.approx((avg, norm), rel=1e-12)
        assert table[key]["alpha"] == alpha and table[key]["num_tasks"] == 3
    # the definition matters here: the ratio of averages is 30.0 / 60.0 = 50.0 %, the mean of ratios 60.0 %
    r1 = table[("tsv_merge", "r1")]
    assert r1["normalized_accuracy"] == pytest.approx(60.0, rel=1e-12)
    assert r1["avg_accuracy"] / table[("fine_tuned", "build.json")]["avg_accuracy"] == pytest.approx(0.5, rel=1e-12)
    assert r1["options"] == ["alpha=0.7"] and r1["pools"] == ["CLIPVisionModelPool/fake_3", "CLIPVisionModelTaskPool/fake_3"]
    # the terminal shows the table's cells and where each run is
    assert "| tsv_merge | r1 | 30.0 (60.0) α=0.7 |" in printed
    assert str(three_runs["dirs"][1] / "program_report.json") in printed
    assert (out / "comparison.png").stat().st_size > 0


def test_runs_without_fine_tuned_figures_are_not_normalized(three_runs, tmp_path):
    """A run is normalized only where every task has a fine-tuned accuracy; it says so."""
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"tasks": {"a": {"zero_shot_test": 0.2, "fine_tuned_test": 0.8}}}))
    row = rows.read_run(three_runs["dirs"][0] / "program_report.json", rows.read_fine_tuned(partial), "partial")
    assert row["normalized_accuracy"] is None and row["fine_tuned_from"] is None
    assert "not normalized" in report.legend([row])[0]
    row = rows.read_run(three_runs["dirs"][0] / "program_report.json")
    assert row["normalized_accuracy"] is None and row["avg_accuracy"] == pytest.approx(30.0, rel=1e-12)


def test_stored_fine_tuned_rows_normalize_runs_of_their_tasks(three_runs, capsys):
    """With a stored comparison (--results) and no --fine-tuned, its fine_tuned row of the same tasks normalizes
    the runs; the stored rows of other sizes are not shown."""
    stored = three_runs["tmp"] / "stored.json"
    other = {"x": 50.0, "y": 70.0}
    stored.write_text(json.dumps([
        rows.make_row("fine_tuned", FINE, FINE), rows.make_row("zero_shot", ZERO, FINE),
        {"method": "fine_tuned", "num_tasks": 2, "avg_accuracy": 60.0, "normalized_accuracy": 100.0, "alpha": None,
         "per_task": other}]))
    out = three_runs["tmp"] / "t2"
    with pytest.raises(SystemExit):
        cli.main([str(three_runs["dirs"][1]), "--results", str(stored), "--out", str(out)])
    table = json.loads((out / "comparison.json").read_text())
    assert {r["num_tasks"] for r in table} == {3}
    run = next(r for r in table if r["source"] == "r2")
    assert run["normalized_accuracy"] == pytest.approx(_oracle({"a": 0.45, "b": 0.15, "c": 0.6})[1], rel=1e-12)
    assert "the fine_tuned row of stored.json" in run["fine_tuned_from"]


@pytest.mark.parametrize("shape", ["program_report", "full_report"])
def test_tsv_c_report_normalizes_itself(tmp_path, shape):
    """TSV-C's routed reports hold each fine-tuned model's accuracy on its own task: the program_report.json its
    run writes (what TSV-C returns to the program, :func:`routed_eval.program_report`) and the full report."""
    from fusion_bench_tsv.methods.routed_eval import program_report

    run = fake_run(tmp_path, "c", "tsv/tsv_compress", {"_target_": "x.TSVCompressAlgorithm"}, [], {"a": 0.5})
    routed = {"method": "TSV-C", "routing": "oracle", "not_evaluated": [],
              "tasks": {t: {"accuracy": FINE[t] - 0.1, "loss": 1.0, "finetuned_accuracy": FINE[t]} for t in FINE},
              "average": {"accuracy": 0.5, "loss": 1.0, "finetuned_accuracy": 0.5}}
    written = program_report(routed, str(tmp_path / "full.json")) if shape == "program_report" else routed
    (run / "program_report.json").write_text(json.dumps(written))
    row = rows.read_run(run / "program_report.json")
    assert row["method"] == "tsv_compress" and row["alpha"] is None
    assert row["per_task"] == pytest.approx({t: 100 * (FINE[t] - 0.1) for t in FINE}, rel=1e-12)
    assert row["normalized_accuracy"] == pytest.approx(_oracle({t: FINE[t] - 0.1 for t in FINE})[1], rel=1e-12)
    assert rows.read_fine_tuned(run) == FINE


def test_dummy_on_a_pool_with_a_pretrained_model_is_zero_shot(tmp_path):
    run = fake_run(tmp_path, "z", "dummy", {"_target_": "fusion_bench.method.DummyAlgorithm"}, [], ZERO)
    assert rows.read_run(run / "program_report.json")["method"] == "zero_shot"


def test_series_styles_are_distinct():
    styles = report.series_styles(20)
    assert len({s["color"] for s in styles}) == 20 and len({s["marker"] for s in styles}) == 20
    many = report.series_styles(400)
    assert len({(s["color"], s["marker"]) for s in many}) == 400


@pytest.mark.parametrize("sizes", [[3], [3, 5]], ids=["per task", "per size"])
def test_identical_curves_stay_visible(sizes):
    """Series with identical values get distinct colours and markers and do not sit on one another."""
    same = [rows.make_row(f"m{i}", dict(zip("abcde", [0.2, 0.4, 0.6, 0.8, 0.5][:n])))
            for i in range(17) for n in sizes]
    fig = report.figure(same)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 17
    assert len({(tuple(line.get_color()), line.get_marker()) for line in lines}) == 17
    assert len({line.get_marker() for line in lines}) == 17
    xs = [tuple(line.get_xdata()) for line in lines]
    assert len(set(xs)) == 17  # shifted sideways: no two series at the same x


def test_output_to_sends_everything_of_a_row_to_its_log(tmp_path, capfd):
    log_file = tmp_path / "logs" / "row.log"
    with baselines.output_to(log_file):
        print("from print")
        sys.stderr.write("from stderr\n")
        os.write(1, b"from fd 1\n")
        logging.getLogger("fusion_bench.some.module").info("an info record")
    print("after")
    out, err = capfd.readouterr()
    text = log_file.read_text()
    for line in ("from print", "from stderr", "from fd 1", "an info record"):
        assert line in text and line not in out + err
    assert "after" in out


def test_baselines_print_one_line_per_row_and_skip_known_rows(tmp_path, monkeypatch):
    """One progress line per row with its time; a failed row is reported and the others still run; rows the
    given results hold are not run again; the row's own output goes to its log only."""
    pools = [baselines.Pools("CLIPVisionModelPool/tiny_clip_8", "CLIPVisionModelTaskPool/tiny_clip_8",
                             "CLIPVisionModelTaskPool/tiny_clip_8_val")]
    tasks = {f"t{i}": 0.5 for i in range(8)}

    def row(self, pools, name):
        print(f"verbose output of {name}")
        if name == "simple_average":
            raise RuntimeError("simple_average broke")
        return rows.make_row(name, tasks, self.fine_tuned.get(pools.label))

    monkeypatch.setattr(baselines._Runner, "row", row)
    other_suite = ["CLIPVisionModelPool/small_clip_8", "CLIPVisionModelTaskPool/small_clip_8"]
    known = [rows.make_row("fine_tuned", tasks, tasks), rows.make_row("task_arithmetic", tasks, pools=other_suite)]
    said = []
    new, failures = baselines.run_baselines(pools, ["zero_shot", "fine_tuned", "simple_average", "task_arithmetic"],
                                            log_dir=tmp_path, known=known, say=said.append)
    assert [r["method"] for r in new] == ["zero_shot", "task_arithmetic", "task_arithmetic_val_alpha"]
    assert all(r["normalized_accuracy"] == pytest.approx(100.0) for r in new)  # by the known fine_tuned row
    progress = said[1:]
    assert len(progress) == 4 and all(line.rstrip().endswith(" s") or "FAILED" in line for line in progress)
    assert "FAILED" in progress[1] and "simple_average broke" in progress[1] and failures
    assert "verbose output" not in "".join(said)
    assert "verbose output of zero_shot" in (tmp_path / "tiny_clip_8_zero_shot.log").read_text()
    assert "simple_average broke" in (tmp_path / "tiny_clip_8_simple_average.log").read_text()


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    for argv, culprit in ([[str(tmp_path / "missing")], "missing: no such file or directory"],
                          [[str(tmp_path)], "holds no program_report.json"],
                          [[], "nothing to compare"],
                          [["--suite", "no_such_suite", "--out", str(tmp_path / "o")], "no_such_suite_8"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 2
        assert culprit in capsys.readouterr().err


def test_default_output_is_outside_the_repository(three_runs, monkeypatch, capsys):
    monkeypatch.chdir(three_runs["tmp"])
    with pytest.raises(SystemExit):
        cli.main([str(three_runs["dirs"][0])])
    written = list((three_runs["tmp"] / "outputs" / "compare").glob("*/comparison.json"))
    assert len(written) == 1


def test_another_build_is_pointed_out(three_runs, capsys):
    """A build.json whose fine-tuned accuracies differ from the stored table's gets a note saying so."""
    stored = three_runs["tmp"] / "stored.json"
    stored.write_text(json.dumps([rows.make_row("fine_tuned", {**FINE, "b": 0.31}, FINE)]))
    with pytest.raises(SystemExit):
        cli.main([str(three_runs["dirs"][0]), "--results", str(stored), "--fine-tuned", str(three_runs["build"]),
                  "--out", str(three_runs["tmp"] / "o")])
    assert "note: build.json's fine-tuned accuracies differ from those of stored.json (3 tasks) by up to 1.0 points" \
        in capsys.readouterr().out
    # the same build, its accuracies stored in float32 as FusionBench's reports hold them: no note
    stored.write_text(json.dumps([rows.make_row("fine_tuned", {t: float(np.float32(a)) for t, a in FINE.items()})]))
    with pytest.raises(SystemExit):
        cli.main([str(three_runs["dirs"][0]), "--results", str(stored), "--fine-tuned", str(three_runs["build"]),
                  "--out", str(three_runs["tmp"] / "o")])
    assert "note:" not in capsys.readouterr().out


def test_every_option_says_its_default():
    import argparse

    for action in cli.parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and "default" in action.help, action.option_strings


def test_the_command_is_a_console_script_of_the_package():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["fusion-bench-tsv-compare"].partition(":")
    assert getattr(importlib.import_module(module), function) is cli.main


@pytest.mark.cli
def test_baselines_on_a_local_pool_match_the_fusion_bench_cli(tiny_pool, tmp_path, capfd):
    """The baselines mode end to end on the tiny local pool (2 evaluated tasks, no validation pool): each row
    as FusionBench's CLI computes it, the normalized accuracy by the fine_tuned row, one progress line per row
    and FusionBench's output only in the logs; then the CLI's run directory tabled beside the stored rows."""
    from support import run_fusion_bench

    pools = ["--config-dir", str(tiny_pool["config_dir"]), "--modelpool", f"CLIPVisionModelPool/{tiny_pool['name']}",
             "--taskpool", f"CLIPVisionModelTaskPool/{tiny_pool['name']}"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        cli.main([*pools, "--methods", "zero_shot", "fine_tuned", "simple_average", "tsv_merge", "tsv_merge_alpha_grid",
                  "--out", str(out)])
    assert done.value.code == 0
    terminal = capfd.readouterr().out
    table = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert set(table) == {"zero_shot", "fine_tuned", "simple_average", "tsv_merge"}  # no validation pool: no grid
    assert "no validation task pool" in terminal
    progress = [line for line in terminal.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and all(line.endswith(" s") for line in progress), progress
    assert "model_info" not in terminal and "model_info" in (out / "logs" / f"{tiny_pool['name']}_tsv_merge.log").read_text()
    fine = {t: a / 100 for t, a in table["fine_tuned"]["per_task"].items()}
    for row in table.values():
        assert row["num_tasks"] == 2 and row["seconds"] >= 0
        # the synthetic towers may score 0 on a task: then the ratio, and so the normalized accuracy, is undefined
        assert row["normalized_accuracy"] == _mean_ratio(row["per_task"], fine)

    run_dir = tmp_path / "cli_run"
    proc = run_fusion_bench(["--config-dir", str(tiny_pool["config_dir"]), "method=simple_average",
                             f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
                             f"taskpool=CLIPVisionModelTaskPool/{tiny_pool['name']}", f"path.log_dir={run_dir}"],
                            cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(SystemExit):
        cli.main([str(run_dir), "--results", str(out / "comparison.json"), "--out", str(tmp_path / "table")])
    shown = json.loads((tmp_path / "table" / "comparison.json").read_text())
    run = next(r for r in shown if r["source"] == "cli_run")
    # the same merge and evaluation, in-process and through the CLI: the same accuracies
    assert run["method"] == "simple_average" and run["per_task"] == table["simple_average"]["per_task"]
    assert run["normalized_accuracy"] == _mean_ratio(run["per_task"], fine)


def _mean_ratio(per_task_percent: dict, fine: dict):
    """:data:`rows.NORMALIZED` in float64 (100 · mean of accuracy / fine-tuned accuracy), as a pytest.approx to
    1e-12 relative (a mean of a few ratios: a few float64 ulps); None where a fine-tuned accuracy is 0."""
    if min(fine[t] for t in per_task_percent) == 0:
        return None
    return pytest.approx(float(100 * np.mean([a / 100 / fine[t] for t, a in per_task_percent.items()])), rel=1e-12)


def test_val_alpha_ignores_a_nan_validation_score(tmp_path, monkeypatch):
    """A NaN validation accuracy (here at the first α) is skipped, not kept by max(); all NaN fails the row."""
    pools = baselines.Pools("m", "t", "t_val")
    validation = {0.1: float("nan"), 0.5: 0.2, 1.0: 0.4}

    def compose(method, pools, overrides=(), split="test", log_dir=None):
        alpha = float(next(o for o in overrides if o.startswith("method.scaling_factor=")).split("=")[1])
        return {"alpha": alpha, "split": split}

    def run_program(cfg, edit=None):
        score = validation[cfg["alpha"]] if cfg["split"] == "validation" else 0.3
        return {"a": score, "b": score}, None

    monkeypatch.setattr(baselines, "compose", compose)
    monkeypatch.setattr(baselines, "run_program", run_program)
    runner = baselines._Runner(list(validation), tmp_path, {})
    assert runner.row(pools, "task_arithmetic_val_alpha")["alpha"] == 1.0
    validation.update({0.5: float("nan"), 1.0: float("nan")})
    with pytest.raises(RuntimeError, match=r"task_arithmetic_val_alpha: the validation task pool t_val gave no finite"):
        runner.row(pools, "task_arithmetic_val_alpha")


def test_a_run_without_accuracies_in_a_directory_of_runs_is_skipped_with_a_note(three_runs, capsys):
    """A run with taskpool=dummy saves a program_report.json without accuracies: in a directory holding runs it is
    skipped and said so; named itself it is an error naming it."""
    dummy = three_runs["runs"] / "r4"
    dummy.mkdir()
    (dummy / "program_report.json").write_text(json.dumps({"model_info": {"all_params": 10}}))
    with pytest.raises(SystemExit) as done:
        cli.main([str(three_runs["runs"]), "--out", str(three_runs["tmp"] / "o1")])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert f"skipped {dummy / 'program_report.json'}: no per-task accuracies" in printed
    assert {r["source"] for r in json.loads((three_runs["tmp"] / "o1" / "comparison.json").read_text())} == {"r1", "r2", "r3"}
    with pytest.raises(SystemExit) as done:
        cli.main([str(dummy), "--out", str(three_runs["tmp"] / "o2")])
    assert done.value.code == 2 and "r4/program_report.json: no per-task accuracies" in capsys.readouterr().err
