"""Time until ``save_path`` is refused (:func:`fusion_bench_tsv.io.outputs.output_dir`): ``/``, the home
directory, a tree of 100,000 empty files, and the same tree holding a marker of ours that lists one file.

The tree is made under ``--where`` (a temporary directory, removed at the end). Each case is timed 5 times;
the first call and the best are printed, with the reason the refusal gives.

    python benchmarks/save_path_refusal.py                 # 100 directories of 1,000 files under /tmp
    python benchmarks/save_path_refusal.py --files 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

from fusion_bench_tsv.io.outputs import MARKER, output_dir, write_output_dir


def make_tree(root: Path, files: int, per_dir: int = 1000) -> None:
    for i in range(files):
        directory = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            directory.mkdir(parents=True)
        (directory / f"f{i % per_dir:04d}").touch()


def plant_marker(tree: Path, scratch: Path) -> None:
    """A marker of a real TSV-M output, moved into ``tree`` with the one file it lists (its path set to ``tree``)."""
    out = scratch / "one_output"
    write_output_dir(out, lambda tmp: (tmp / "config.json").write_text("{}"), "TSV-M")
    marker = json.loads((out / MARKER).read_text())
    shutil.copy(out / "config.json", tree / "config.json")
    (tree / MARKER).write_text(json.dumps({**marker, "path": os.path.realpath(tree)}))


def time_refusal(save_path: str, repeats: int = 5) -> Tuple[List[float], str]:
    times, reason = [], "not refused"
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            output_dir(save_path, None, "merged", "TSV-M")
        except (OSError, ValueError) as e:
            reason = str(e).split(": ", 2)[-1].split("; nothing there")[0]
        times.append(time.perf_counter() - start)
    return times, reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000, help="files in the tree (default 100000)")
    parser.add_argument("--where", default="/tmp", help="where the tree is made (default /tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.where) as scratch:
        tree, marked = Path(scratch) / "tree", Path(scratch) / "tree_marked"
        make_tree(tree, args.files)
        make_tree(marked, args.files)
        plant_marker(marked, Path(scratch))
        print("| save_path | first call (ms) | best of 5 (ms) | refused because |")
        print("|---|---|---|---|")
        for name, path in [("/", "/"), ("home directory (~)", "~"), (f"{args.files:,} files", str(tree)),
                           (f"{args.files:,} files + planted marker", str(marked))]:
            times, reason = time_refusal(path)
            print(f"| {name} | {1e3 * times[0]:.2f} | {1e3 * min(times):.2f} | {reason[:90]} |")


if __name__ == "__main__":
    main()
