"""Search build settings for an offline suite in the paper's regime, and record every configuration tried.

For each configuration (``BuildSettings`` overrides, see ``fusion-bench-tsv-build --help``) this builds the
first N tasks under ``--root/<name>`` (cached like any build), then merges the fine-tuned towers in-process and
evaluates on the local splits:

- zero-shot and fine-tuned test accuracy (from the build's ``build.json``);
- task arithmetic θ₀ + α Σᵢ τᵢ and TSV-M θ₀ + α M (``TSVMergeAlgorithm``, its defaults), α chosen on the
  validation splits from ``ALPHAS``; accuracy and normalized accuracy (mean over tasks of merged / fine-tuned).

Rows go to ``benchmarks/results/suite_search.{json,md}`` with the build time, so the table says what each knob
(capacity, pretraining, fine-tuning learning rate and steps) buys::

    PYTHONPATH=. python benchmarks/suite_search.py --name w128 --num-tasks 8 --set width=128 heads=4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

ALPHAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
RESULTS = Path(__file__).parent / "results"


def _parse_set(items):
    from fusion_bench_tsv.benchmark.build import BuildSettings

    types = {f.name: type(f.default) for f in dataclasses.fields(BuildSettings)}
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = types[key](value)
    return out


@torch.no_grad()
def evaluate(suite: Path, num_tasks: int, settings) -> dict:
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    from fusion_bench_tsv import TSVMergeAlgorithm
    from fusion_bench_tsv.benchmark.build import _split
    from fusion_bench_tsv.benchmark.finetune import accuracy, zero_shot_head
    from fusion_bench_tsv.benchmark.tasks import ALL_TASKS, task_by_name

    clip = CLIPModel.from_pretrained(suite / "pretrained").eval()
    processor = CLIPProcessor.from_pretrained(suite / "pretrained")
    scale = float(clip.logit_scale.exp())
    report = json.loads((suite / "build.json").read_text())["tasks"]
    tasks = [task_by_name(n) for n in settings.task_names[:num_tasks]]
    data = {t.name: {split: _split(t, settings, split) for split in ("validation", "test")} for t in tasks}
    heads = {t.name: zero_shot_head(clip, processor, t.classnames, t.templates) for t in tasks}
    pretrained = CLIPVisionModel(clip.config.vision_config)
    pretrained.vision_model.load_state_dict(clip.vision_model.state_dict())
    finetuned = {t.name: CLIPVisionModel.from_pretrained(suite / "models" / t.name) for t in tasks}
    base = {k: v.clone() for k, v in pretrained.state_dict().items()}
    ta = {k: sum(m.state_dict()[k] - v for m in finetuned.values()) for k, v in base.items()}
    merged = TSVMergeAlgorithm(show_pbar=False).run({"_pretrained_": pretrained, **finetuned}).state_dict()
    tsv = {k: merged[k] - base[k] for k in base}
    model = CLIPVisionModel(clip.config.vision_config).eval()

    def scores(update, alpha, split):
        model.load_state_dict({k: base[k] + alpha * update[k] for k in base})
        return [accuracy(model.vision_model, clip.visual_projection, heads[t.name], scale, *data[t.name][split])
                for t in tasks]

    # how well pretraining separates the classes: zero-shot with the made-up words the corpus used
    from fusion_bench_tsv.benchmark.tasks import code_word

    probe = [accuracy(clip.vision_model, clip.visual_projection,
                      zero_shot_head(clip, processor, [code_word(ALL_TASKS.index(t), c) for c in range(t.num_classes)],
                                     ("a photo of {}.",)),
                      scale, *data[t.name]["test"]) for t in tasks]
    ft = np.array([report[t.name]["fine_tuned_test"] for t in tasks])
    zs = np.array([report[t.name]["zero_shot_test"] for t in tasks])
    row = {"zero_shot": 100 * zs.mean(), "fine_tuned": 100 * ft.mean(), "zero_shot_norm": 100 * (zs / ft).mean(),
           "code_word_zero_shot": 100 * float(np.mean(probe)),
           "per_task": {t.name: {"zero_shot": 100 * z, "fine_tuned": 100 * f, "code_word": 100 * p}
                        for t, z, f, p in zip(tasks, zs, ft, probe)}}
    for name, update in (("task_arithmetic", ta), ("tsv_merge", tsv)):
        val = {a: float(np.mean(scores(update, a, "validation"))) for a in ALPHAS}
        best = max(ALPHAS, key=lambda a: (val[a], -abs(a - 1)))
        test = np.array(scores(update, best, "test"))
        row[name] = {"alpha": best, "acc": 100 * test.mean(), "norm": 100 * (test / ft).mean(),
                     "val_curve": {str(a): round(100 * v, 2) for a, v in val.items()}}
    return row


def markdown(rows) -> str:
    lines = ["# Suite search: what each build setting buys", "",
             "Made by `benchmarks/suite_search.py` (8 tasks); accuracies are test %, norm. = mean over tasks of "
             "merged / fine-tuned %, α chosen on the validation splits from "
             f"{', '.join(map(str, ALPHAS))}. code words: zero-shot accuracy with heads made from the corpus's words "
             "for the classes (how well pretraining separates them). build: seconds on one core of 2, the other busy "
             "with another configuration.", "",
             "| name | T | settings | build (s) | zero-shot | code words | fine-tuned | TA acc (norm.) α | TSV-M acc (norm.) α |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "defaults"
        ta, tsv = r["task_arithmetic"], r["tsv_merge"]
        probe = f"{r['code_word_zero_shot']:.1f}" if "code_word_zero_shot" in r else "–"
        lines.append(f"| {r['name']} | {r['num_tasks']} | {s} | {r['build_s']:.0f} | {r['zero_shot']:.1f} | {probe} | "
                     f"{r['fine_tuned']:.1f} | {ta['acc']:.1f} ({ta['norm']:.1f}) {ta['alpha']} | "
                     f"{tsv['acc']:.1f} ({tsv['norm']:.1f}) {tsv['alpha']} |")
    lines += [""] + [f"- {r['name']}: {r['note']}." for r in rows if r.get("note")]
    return "\n".join(lines) + "\n"


def main() -> None:
    from fusion_bench_tsv.benchmark.build import SUITES, BuildSettings, build_benchmark

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--num-tasks", type=int, default=8)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tuning processes (default: 1)")
    parser.add_argument("--suite", default=None, help="start from this suite's settings (default: BuildSettings())")
    parser.add_argument("--root", default="/tmp/fbtsv_suite_search")
    parser.add_argument("--pretrained-from", default=None, metavar="NAME",
                        help="start from configuration NAME's pretrained model (same pretraining settings)")
    parser.add_argument("--out", default=str(RESULTS / "suite_search"))
    args = parser.parse_args()
    overrides = _parse_set(args.set)
    settings = dataclasses.replace(SUITES[args.suite][0], **overrides) if args.suite else BuildSettings(**overrides)
    t0 = time.time()
    if args.pretrained_from:
        import shutil

        source, target = (Path(args.root) / n / "tiny_clip" / "pretrained" for n in (args.pretrained_from, args.name))
        if not target.exists():
            shutil.copytree(source, target)
    suite = build_benchmark(args.num_tasks, Path(args.root) / args.name, settings, show_pbar=False, export_openclip=False,
                            jobs=args.jobs)
    build_s = time.time() - t0
    row = {"name": args.name, "num_tasks": args.num_tasks, "overrides": overrides, "build_s": build_s,
           **evaluate(suite, args.num_tasks, settings)}
    path = Path(args.out + ".json")
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if (r["name"], r["num_tasks"]) != (args.name, args.num_tasks)] + [row]
    path.write_text(json.dumps(rows, indent=1))
    Path(args.out + ".md").write_text(markdown(rows))
    print(markdown([row]))


if __name__ == "__main__":
    main()
