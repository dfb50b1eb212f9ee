"""``fusion-bench-tsv-compare``: table and plot FusionBench runs, and run the baselines a comparison lacks.

    fusion-bench-tsv-compare outputs/fabric_model_fusion/*                 # runs you already have
    fusion-bench-tsv-compare RUN --results benchmarks/results/tiny_clip.json --fine-tuned BUILD/build.json
    fusion-bench-tsv-compare --suite tiny_clip --sizes 8 14 20            # zero-shot, fine-tuned, the baselines, ours

Writes ``<out>/<name>.json`` (the rows), ``.md`` (the table) and ``.png`` (the figure); ``--out`` defaults to
``./outputs/compare/<time>``. Rows run here print one line each with their time; their own output goes to
``<log dir>/<pool>_<row>.log``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from .baselines import ALPHAS, BASELINES, Pools, run_baselines
from .report import ROW_ORDER, legend, markdown, write_outputs
from .rows import REPORT_FILE, find_reports, make_row, normalize, read_build, read_fine_tuned, read_results, read_run

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    text = __doc__.replace("``", "")
    p = argparse.ArgumentParser(prog="fusion-bench-tsv-compare", description=text.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(text.split("\n\n")[1:]))
    p.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                   help="FusionBench run directories, their program_report.json, or directories holding runs "
                        "(default: none)")
    p.add_argument("--results", nargs="+", type=Path, default=[], metavar="JSON",
                   help="stored comparisons (the .json this command writes) to show beside the runs; with --suite, "
                        "their rows are kept and not run again (default: none)")
    p.add_argument("--fine-tuned", type=Path, default=None, metavar="PATH",
                   help="fine-tuned accuracies that normalize the runs: a build.json of fusion-bench-tsv-build (its "
                        "zero-shot and fine-tuned rows are shown too), a stored comparison, or a TSV-C run (default: "
                        "a TSV-C run's own, else the fine_tuned rows of --results or of --suite)")
    p.add_argument("--suite", default=None, metavar="NAME",
                   help="run the baselines on this suite's pools, MODELPOOL and TASKPOOL with {suite} and {n} filled "
                        "in (e.g. tiny_clip, small_clip; default: run nothing)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                   help="the numbers of tasks {n} of --suite (default: 8); without --suite, show only these sizes "
                        "(default: the runs' sizes, else all)")
    p.add_argument("--modelpool", default="CLIPVisionModelPool/{suite}_{n}", metavar="CONFIG",
                   help="the modelpool config of the runs (default: CLIPVisionModelPool/{suite}_{n}); giving it "
                        "without --suite runs the baselines on that pool")
    p.add_argument("--taskpool", default="CLIPVisionModelTaskPool/{suite}_{n}", metavar="CONFIG",
                   help="the test taskpool config (default: CLIPVisionModelTaskPool/{suite}_{n})")
    p.add_argument("--validation-taskpool", default=None, metavar="CONFIG",
                   help="the validation taskpool config that chooses α, or 'none' (default: TASKPOOL + '_val' when "
                        "that config exists)")
    p.add_argument("--config-dir", type=Path, default=None, metavar="DIR",
                   help="a config directory holding the pools' configs, as fusion_bench's --config-dir (default: "
                        "./config if present, else FusionBench's and this package's configs)")
    p.add_argument("--methods", nargs="+", default=list(BASELINES), choices=BASELINES, metavar="ROW",
                   help=f"rows to run, of {', '.join(BASELINES)} (default: all)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), metavar="A",
                   help=f"the α grid of the _val_alpha rows and TSV-M's alpha grid (default: {' '.join(map(str, ALPHAS))})")
    p.add_argument("--no-val-alpha", action="store_true", help="no _val_alpha rows (default: one per scaled method)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where to write NAME.json/.md/.png (default: ./outputs/compare/<time>)")
    p.add_argument("--name", default="comparison", help="file name of the outputs (default: comparison)")
    p.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                   help="where each row run here writes its log (default: OUT/logs)")
    p.add_argument("--title", default=None, help="the figure's title (default: the suite, or 'FusionBench runs')")
    return p


def _pools(args) -> List[Pools]:
    """The pools of the baselines: the templates filled in per size."""
    from .baselines import compose

    templated = "{n}" in args.modelpool or "{n}" in args.taskpool
    config_dir = str(args.config_dir) if args.config_dir is not None else None
    pools = []
    # the largest first: the smaller suites of the same tasks reuse its zero-shot and fine-tuned accuracies
    for n in (sorted(args.sizes or [8], reverse=True) if templated else [None]):
        fill = {"suite": args.suite, "n": n}
        if args.suite is None and "{suite}" in args.modelpool + args.taskpool:
            raise ValueError("--modelpool / --taskpool name {suite}: give --suite, or name the configs in full")
        model, task = args.modelpool.format(**fill), args.taskpool.format(**fill)
        validation = args.validation_taskpool
        if validation is None:
            candidate = Pools(model, task, f"{task}_val", config_dir)
            try:
                compose("dummy", candidate, split="validation")
                validation = candidate.validation
            except ValueError:
                validation = None
        elif validation.lower() == "none":
            validation = None
        else:
            validation = validation.format(**fill)
        pools.append(Pools(model, task, validation, config_dir))
    return pools


def _unique_sources(rows: List[dict]) -> List[dict]:
    """Rows whose (method, source, size) repeats get the source suffixed ' (2)', ' (3)' …"""
    seen = {}
    out = []
    for r in rows:
        key = (r["method"], r.get("source"), r["num_tasks"])
        seen[key] = seen.get(key, 0) + 1
        out.append(r if seen[key] == 1 else {**r, "source": f"{r.get('source')} ({seen[key]})"})
    return out


def compare(args, say: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    """The command, with parsed arguments; its exit status."""
    baselines = args.suite is not None or "{suite}" not in args.modelpool
    if not (args.runs or args.results or baselines):
        raise ValueError("nothing to compare: give run directories, --results JSON or --suite NAME")
    out = args.out or Path.cwd() / "outputs" / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    stored = [r for path in args.results for r in read_results(path)]
    explicit = read_fine_tuned(args.fine_tuned) if args.fine_tuned is not None else None
    runs, skipped = _read_runs(args.runs, explicit, str(args.fine_tuned) if explicit else None)
    rows: List[dict] = []
    failures: List[str] = []
    if baselines:
        known = [{k: v for k, v in r.items() if k not in ("source", "path")} for r in stored]
        new, failures = run_baselines(_pools(args), args.methods, alphas=args.alphas, val_alpha=not args.no_val_alpha,
                                      log_dir=args.log_dir or out / "logs", known=known, say=say)
        order = {m: i for i, m in enumerate(ROW_ORDER)}
        rows = sorted(known + new, key=lambda r: (r["num_tasks"], order.get(r["method"], len(order))))
    else:
        rows = stored
    build_rows, notes = _build_rows(args.fine_tuned, runs, stored) if args.fine_tuned is not None else ([], [])
    fine_rows = [r for r in rows if r["method"] == "fine_tuned"]
    runs = [_normalize_by_rows(r, fine_rows) if r["normalized_accuracy"] is None else r for r in runs]
    shown = rows + build_rows + runs
    sizes = args.sizes if (args.sizes and not baselines) else (sorted({r["num_tasks"] for r in runs}) or None)
    if sizes and not baselines:
        shown = [r for r in shown if r["num_tasks"] in sizes]
    shown = _unique_sources(shown)
    if not shown:
        raise ValueError(f"no rows to show (sizes {sizes})")
    title = args.title or (f"{args.suite} benchmark (FusionBench pools)" if args.suite else "FusionBench runs")
    paths = write_outputs(shown, out, args.name, title)
    say("")
    say(markdown(shown).rstrip())
    lines = legend(shown)
    if lines:
        say("")
        say("runs:")
        for line in lines:
            say(f"  {line}")
    for line in notes + skipped:
        say(line)
    say("")
    say(f"written: {', '.join(str(p) for p in paths)}")
    if failures:
        say(f"{len(failures)} rows failed (their logs say why):")
        for line in failures:
            say(f"  {line}")
        return 1
    return 0


def _read_runs(paths: Sequence[Path], fine_tuned: Optional[dict], source: Optional[str]) -> Tuple[List[dict], List[str]]:
    """The rows of the runs ``paths`` name, and a note for each report skipped in a directory holding runs
    (one without per-task accuracies, e.g. of a run with ``taskpool=dummy``); a run named itself must be readable."""
    runs, skipped = [], []
    for path in paths:
        named = path.is_file() or (path / REPORT_FILE).is_file()
        for report in find_reports(path):
            try:
                runs.append(read_run(report, fine_tuned, source))
            except ValueError as error:
                if named:
                    raise
                skipped.append(f"skipped {error}")
    return runs, skipped


def _build_rows(path: Path, runs: Sequence[dict], stored: Sequence[dict]) -> Tuple[List[dict], List[str]]:
    """With a ``build.json`` as ``--fine-tuned``: its zero-shot and fine-tuned rows for the tasks of the runs,
    and a note where its fine-tuned accuracies differ from a stored table's; nothing for other sources."""
    try:
        zero, fine = read_build(path)
    except ValueError:
        return [], []
    rows = []
    for tasks in dict.fromkeys(tuple(r["per_task"]) for r in runs):
        if all(t in fine and t in zero for t in tasks):
            for method, acc in (("zero_shot", zero), ("fine_tuned", fine)):
                row = make_row(method, {t: acc[t] for t in tasks}, {t: fine[t] for t in tasks})
                rows.append({**row, "source": path.name, "path": str(path.resolve())})
    sizes = {r["num_tasks"] for r in runs}
    return rows, _other_build(fine, path.name, [r for r in stored if r["method"] == "fine_tuned" and r["num_tasks"] in sizes])


def _other_build(fine: dict, name: str, stored_fine: Sequence[dict]) -> List[str]:
    """A note for each stored ``fine_tuned`` row whose accuracies differ from those of the build (``fine``) by
    more than the 1e-3 points that float32 accuracies and the build's rounded ones may differ by (~1e-5)."""
    notes = []
    for row in stored_fine:
        shared = [t for t in row["per_task"] if t in fine]
        worst = max((abs(100 * fine[t] - row["per_task"][t]) for t in shared), default=0.0)
        if worst > 1e-3:
            notes.append(f"note: {name}'s fine-tuned accuracies differ from those of {row['source']} ({row['num_tasks']} "
                         f"tasks) by up to {worst:.1f} points: another build of the benchmark (library versions, CPU "
                         "kernels); the rows of each source are normalized by its own fine-tuned accuracies")
    return notes


def _normalize_by_rows(row: dict, fine_rows: Sequence[dict]) -> dict:
    """A run normalized by a ``fine_tuned`` row (stored or computed) that covers its tasks."""
    for fine in fine_rows:
        if set(row["per_task"]) <= set(fine["per_task"]):
            where = fine.get("source") or "the fine_tuned row computed here"
            return normalize(row, {t: a / 100 for t, a in fine["per_task"].items()}, f"the fine_tuned row of {where}")
    return row


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    try:
        status = compare(args)
    except ValueError as error:
        print(f"fusion-bench-tsv-compare: error: {error}", file=sys.stderr)
        status = 2
    sys.exit(status)
