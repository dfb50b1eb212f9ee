"""The summary a run ends with, and the Hydra callback that prints it last in the CLI."""

from __future__ import annotations

import json

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from fusion_bench_tsv.methods.summary import RunSummary, RunSummaryCallback


def _summary(log_dir) -> RunSummary:
    return RunSummary("TSV-M", {"alpha": 1.0, "T": 2}, 1.25, str(log_dir), {"kept ranks per layer": "/x/r.json"})


def test_summary_lines_with_the_programs_report(tmp_path):
    report = {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25},
              "average": {"accuracy": 0.375, "normalized_accuracy": 0.75}}
    assert _summary(tmp_path).lines(report) == [
        "TSV-M summary: alpha=1.0, T=2",
        "  average accuracy: 37.50% over 2 tasks",
        "  normalized accuracy: 75.00% (mean over tasks of acc / fine-tuned acc)",
        "  time: 1.2 s (TSV-M's run)",
        f"  run directory: {tmp_path}",
        "  kept ranks per layer: /x/r.json",
    ]


def test_callback_prints_the_summary_at_the_end_of_a_job_and_nothing_after_a_failure(tmp_path, capsys):
    (tmp_path / "program_report.json").write_text(json.dumps({"a": {"accuracy": 0.5}, "average": {"accuracy": 0.5}}))
    config = OmegaConf.create({"report_save_path": "{log_dir}/program_report.json"})
    for status, printed in ((JobStatus.COMPLETED, True), (JobStatus.FAILED, False)):
        callback = RunSummaryCallback()
        callback.on_job_start(config)
        _summary(tmp_path).finish()  # inside a CLI job: deferred, not printed yet
        assert capsys.readouterr().out == ""
        callback.on_job_end(config, JobReturn(status=status))
        out = capsys.readouterr().out
        assert ("  average accuracy: 50.00% over 1 task" in out) == printed and ("summary:" in out) == printed
    _summary(tmp_path).finish()  # outside a job (Python): printed at once, without accuracy
    assert capsys.readouterr().out.startswith("TSV-M summary: alpha=1.0, T=2\n  time: 1.2 s")


def test_callback_ignores_an_earlier_runs_report_at_a_fixed_path(tmp_path, capsys):
    """report_save_path fixed (no {log_dir}) and a run that writes no report (taskpool=dummy): the file an earlier
    run left there is not this run's accuracy; a report written during the job is."""
    fixed = tmp_path / "report.json"
    fixed.write_text(json.dumps({"a": {"accuracy": 0.5}, "average": {"accuracy": 0.5}}))
    config = OmegaConf.create({"report_save_path": str(fixed)})
    callback = RunSummaryCallback()
    callback.on_job_start(config)
    _summary(tmp_path).finish()
    callback.on_job_end(config, JobReturn(status=JobStatus.COMPLETED))
    out = capsys.readouterr().out
    assert "TSV-M summary:" in out and "average accuracy" not in out
    callback.on_job_start(config)
    _summary(tmp_path).finish()
    fixed.write_text(json.dumps({"a": {"accuracy": 0.25}, "average": {"accuracy": 0.25}}))  # this job's program
    callback.on_job_end(config, JobReturn(status=JobStatus.COMPLETED))
    assert "  average accuracy: 25.00% over 1 task" in capsys.readouterr().out
