#!/usr/bin/env python
"""Run FusionBench's own test suite before and after each pull request of the series, on git main and on 0.2.33.

    python upstream/check.py --main PATH --sdist fusion_bench-0.2.33.tar.gz [--out upstream/check.md]

``PATH`` is a checkout of FusionBench's git main at ``MAIN_COMMIT`` (``git worktree add`` or a clone); 0.2.33 is
the release's source distribution (``pip download --no-deps --no-binary :all: fusion-bench==0.2.33``; its 4 test
files) in the repository's layout, with ``upstream/base/`` for the files the series touches that it lacks. For
each base, a copy is tested with ``pytest`` as it is and after each pull request, applied in order; a test that
passes before a pull request and fails after it is a regression, reported by name. The table goes to ``--out``.
FusionBench's ``test_run_solar_model`` builds a full-size Mistral-7B in memory and is deselected (the series does
not touch depth upscaling).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_spec = importlib.util.spec_from_file_location("upstream_generate", Path(__file__).with_name("generate.py"))
generate = sys.modules.setdefault("upstream_generate", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(generate)

DESELECT = ["tests/test_depth_upscaling.py::TestDepthUpscalingAlgorithm::test_run_solar_model"]


def outcomes(tree: Path) -> Dict[str, str]:
    """``{test id: passed|failed|error|skipped}`` of FusionBench's suite in ``tree`` (its package first on the path)."""
    report = tree / ".check-junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", f"--junitxml={report}",
           "--continue-on-collection-errors",
           *[f"--deselect={d}" for d in DESELECT]]
    subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed"}.get(child.tag, child.tag)
        result[f"{case.get('classname')}::{case.get('name')}"] = status
    report.unlink()
    return result


def counts(result: Dict[str, str]) -> str:
    order = ("passed", "failed", "error", "skipped")
    return ", ".join(f"{sum(v == k for v in result.values())} {k}" for k in order if k in result.values())


def check_base(name: str, tree: Path, lines: List[str]) -> bool:
    print(f"== {name}: FusionBench's suite without the series", flush=True)
    before = outcomes(tree)
    lines.append(f"| {name} | — | {counts(before)} | |")
    ok = True
    for pr in generate.SERIES:
        patch = generate.UPSTREAM / "series" / f"{pr.name}.patch"
        subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True,
                       env=os.environ | {"GIT_CEILING_DIRECTORIES": str(tree.parent)})
        print(f"== {name}: with {pr.name}", flush=True)
        after = outcomes(tree)
        broken = sorted(t for t, s in before.items() if s == "passed" and after.get(t, "missing") != "passed")
        new = sorted(t for t in after if t not in before)
        new_ok = sum(after[t] == "passed" for t in new)
        lines.append(f"| {name} | {pr.name} | {counts(after)} | {new_ok}/{len(new)} new tests pass; "
                     f"{'no test that passed fails' if not broken else 'NOW FAILING: ' + ', '.join(broken)} |")
        ok = ok and not broken and new_ok == len(new)
        before = after
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", type=Path, required=True, help=f"a checkout of FusionBench at {generate.MAIN_COMMIT[:7]}")
    parser.add_argument("--sdist", type=Path, required=True, help=f"fusion_bench-{generate.FUSION_BENCH_VERSION}.tar.gz")
    parser.add_argument("--out", type=Path, default=generate.UPSTREAM / "check.md")
    args = parser.parse_args(argv)
    lines = ["| base | after | FusionBench's suite (pytest) | |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        main_tree = Path(tmp) / "main"
        shutil.copytree(args.main, main_tree, symlinks=True, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        release = generate.release_tree(args.sdist, Path(tmp))
        shutil.copytree(generate.UPSTREAM / "base", release, dirs_exist_ok=True)
        ok = check_base(f"main {generate.MAIN_COMMIT[:7]}", main_tree, lines)
        ok = check_base(f"{generate.FUSION_BENCH_VERSION} (source distribution)", release, lines) and ok
    text = ("FusionBench's own suite before and after each pull request, applied in order (`python upstream/check.py "
            "--main PATH --sdist FILE`; `test_run_solar_model` deselected: it builds a full-size Mistral-7B).\n\n"
            + "\n".join(lines) + "\n")
    args.out.write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
