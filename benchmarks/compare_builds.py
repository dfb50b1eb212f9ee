"""How much two builds of the tiny-CLIP benchmark differ: weights, zero-shot / fine-tuned accuracies, merged accuracy.

Each build is a suite directory written by ``fusion-bench-tsv-build`` (``<root>/tiny_clip``, with ``build.json``
and ``pretrained/``, ``models/<task>/``). For every model the largest absolute weight difference (0 and
"bit-identical" when every tensor is equal); for the accuracies of ``build.json`` the per-task differences in
percentage points (max and mean of the absolute values). ``--reports A B``: the same for two
``program_report.json`` of a ``fusion_bench`` run on each build (e.g. TSV-M), with their averages.

    python benchmarks/compare_builds.py /tmp/repro/pinned/tiny_clip /tmp/repro/torch2.4/tiny_clip \\
        --reports /tmp/repro/pinned_tsvm/program_report.json /tmp/repro/torch2.4_tsvm/program_report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def weight_differences(a: Path, b: Path) -> Dict[str, float]:
    """``model -> max |w_a - w_b|`` over all tensors, for ``pretrained`` and every task model the two builds share."""
    from safetensors.torch import load_file

    names = ["pretrained"] + sorted(
        f"models/{p.parent.name}" for p in (a / "models").glob("*/model.safetensors")
        if (b / "models" / p.parent.name / "model.safetensors").is_file())
    out = {}
    for name in names:
        wa, wb = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
        if wa.keys() != wb.keys():
            raise SystemExit(f"{a / name} and {b / name} hold different tensors: not builds of the same settings")
        out[name] = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    return out


def point_differences(a: Dict[str, float], b: Dict[str, float]) -> List[tuple]:
    """``(task, a %, b %)`` for the tasks both have, accuracies given as fractions."""
    return [(t, 100 * a[t], 100 * b[t]) for t in a if t in b]


def summary(rows: Sequence[tuple]) -> str:
    d = [abs(x - y) for _, x, y in rows]
    moved = ", ".join(f"{t} {x:.1f} → {y:.1f}" for t, x, y in rows if x != y) or "none"
    return f"max {max(d):.2f}, mean {sum(d) / len(d):.2f} points over {len(d)} tasks; changed: {moved}"


def report_accuracies(path: Path) -> Dict[str, float]:
    rep = json.loads(path.read_text())
    return {k: v["accuracy"] for k, v in rep.items() if isinstance(v, dict) and "accuracy" in v}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="a suite directory (<root>/tiny_clip)")
    p.add_argument("b", type=Path, help="another suite directory")
    p.add_argument("--reports", type=Path, nargs=2, metavar=("REPORT_A", "REPORT_B"),
                   help="program_report.json of a fusion_bench run on each build")
    args = p.parse_args(argv)
    weights = weight_differences(args.a, args.b)
    for name, diff in weights.items():
        print(f"{name}: " + ("bit-identical" if diff == 0 else f"max |Δw| = {diff:.3g}"))
    ta = json.loads((args.a / "build.json").read_text())["tasks"]
    tb = json.loads((args.b / "build.json").read_text())["tasks"]
    for key in ("zero_shot_test", "fine_tuned_test"):
        rows = point_differences({t: v[key] for t, v in ta.items()}, {t: v[key] for t, v in tb.items()})
        print(f"{key}: {summary(rows)}")
    if args.reports:
        ra, rb = (report_accuracies(r) for r in args.reports)
        print(f"run: {summary(point_differences({t: v for t, v in ra.items() if t != 'average'}, rb))}; "
              f"average {100 * ra['average']:.2f} → {100 * rb['average']:.2f}")


if __name__ == "__main__":
    main()
