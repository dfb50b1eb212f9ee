#!/usr/bin/env python
"""Write the FusionBench pull requests (``upstream/series/``) from this repository.

Each pull request of :data:`SERIES` is a patch against FusionBench's git main (:data:`MAIN_COMMIT`) with the pull
requests before it applied, written from three sources:

- ``upstream/src/<name>/``: its new or wholly replaced files in FusionBench's repository layout, and ``PR.md``, its
  description (``{files}``, ``{total}``, ``{main_commit}``, ``{main_commit_short}`` and ``{version}`` are filled in);
- ``modules``: modules of this package copied byte for byte, so that the plugin runs the code the pull request
  carries; each may import only the standard library, FusionBench's dependencies and modules FusionBench has at
  that point, and must be black- and isort-clean as FusionBench's code is;
- ``upstream/src/<name>/edits.py``: passages of FusionBench's files replaced (each found exactly once).

The FusionBench files a pull request touches are read from the installed ``fusion_bench`` (``fusion_bench/`` and
``config/``) or, for the rest of its repository (``docs/``, ``mkdocs.yml``, ``tests/``), from ``upstream/base/``;
either way they must be main's text (:data:`MAIN_BLOBS`, git blob ids).

    python upstream/generate.py           # writes upstream/series/<name>.patch and <name>.md
    python upstream/generate.py --check   # exit 1 (listing the files) when they are out of date
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import importlib.metadata
import re
import runpy
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = REPO_ROOT / "upstream"

#: the release the series also applies to (no file the series touches differs between it and MAIN_COMMIT)
FUSION_BENCH_VERSION = "0.2.33"
#: FusionBench's git main (github.com/tanganke/fusion_bench) that the series is made against
MAIN_COMMIT = "54c9e8c9d9621620c720452cd8533332a32d3689"
#: Every FusionBench file the series touches: its git blob id at MAIN_COMMIT (``git ls-tree``), ``None`` for a
#: file main does not have.
MAIN_BLOBS: Dict[str, Optional[str]] = {
    "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py": "f45ff82c7af9a51a0fa1c025f9f95845a4371edc",
    "fusion_bench/method/task_singular_vector/utils/task_singular_interference.py":
        "4dae241d79f24f6a2bd6f3a50b3e33014717c73e",
    "tests/test_task_singular_vector.py": None,
    "fusion_bench/method/__init__.py": "aeb91e27a7893837b21cf51c3660b76568598be0",
    "fusion_bench/method/task_singular_vector/__init__.py": "69686a05a004a3766d2238147ea03dd1daa1b6f2",
    "fusion_bench/method/task_singular_vector/TSVC.py": "d8a69ea3c706aa930e44c299dd1a66f5cd11e9b8",
    "fusion_bench/method/task_singular_vector/TSVM.py": "381ab8b3840b060fafb1643465bee397dad9a20d",
    "fusion_bench/method/task_singular_vector/utils/__init__.py": "870c1ec0a0de73f15193f2f8138e882f4becc2e6",
    "fusion_bench/method/task_singular_vector/utils/TSVC_utils.py": "1eb0e89b43b06348fee5dd705d3dde73d66fa428",
    "config/method/task_singular_vector/TaskSingularVectorMerging.yaml": "7c32958e47388bb4f250cfd82e732c79d524bb10",
    "mkdocs.yml": "0eefd891c61482a2f7616984dbe67ad048c18dfa",
    "docs/algorithms/task_singular_vector.md": "43a4707daad6863924c4213309674c8adafffda5",
    "docs/api/fusion_bench.method/merging.md": "1ddccc1a8de7f1591f49cdb71617504ffd8dbc4f",
    "docs/api/fusion_bench.method/compression.md": "bfedc1d3ab10ba39fa4f4f7ab0121181cc519ddb",
    "fusion_bench/method/task_singular_vector/utils/tsv_compression.py": None,
    "config/method/task_singular_vector/TaskSingularVectorCompression.yaml": None,
    "tests/test_tsv_compression.py": None,
    "docs/api/fusion_bench.method/utility.md": "4303aa699dff3f16930d4bb01455c83b93ae3fb8",
    "config/method/task_singular_vector/SingularTaskInterference.yaml": None,
    "fusion_bench/method/task_singular_vector/STI.py": None,
    "fusion_bench/method/task_singular_vector/utils/interference.py": None,
    "tests/test_singular_task_interference.py": None,
}
#: top-level imports a contributed module may have besides the standard library and FusionBench: FusionBench's
#: own requirements that the methods use
ALLOWED_IMPORTS = {"torch", "numpy", "scipy", "safetensors", "lightning", "omegaconf", "hydra", "transformers", "tqdm"}
#: words that refer to this plugin, which FusionBench does not have
FORBIDDEN = [r"fusion_bench_tsv", r"fusion-bench-tsv", r"\btiny_clip", r"\bsmall_clip", r"\bbenchmarks/",
             r"hydra_plugins", r"\bplugin\b"]


@dataclass(frozen=True)
class PullRequest:
    """One pull request: ``upstream/src/<name>/`` (its files, ``PR.md`` and ``edits.py``), ``modules`` (``(path in
    this repository, path in FusionBench)``, copied as they are) and ``edits`` (``(FusionBench path, old, new)``)."""

    name: str
    edits: Tuple[Tuple[str, str, str], ...] = ()
    modules: Tuple[Tuple[str, str], ...] = ()


def edits_of(name: str) -> Tuple[Tuple[str, str, str], ...]:
    """``EDITS`` of ``upstream/src/<name>/edits.py`` (the passages the pull request replaces), or none."""
    file = UPSTREAM / "src" / name / "edits.py"
    return tuple(tuple(e) for e in runpy.run_path(str(file))["EDITS"]) if file.is_file() else ()


def pull_request(name: str, modules: Tuple[Tuple[str, str], ...] = ()) -> PullRequest:
    return PullRequest(name, edits=edits_of(name), modules=modules)


SERIES: List[PullRequest] = [
    pull_request("0001-tsv-fixes"),
    pull_request(
        "0002-tsv-compression",
        modules=(("fusion_bench_tsv/functional/tsv_compression.py",
                  "fusion_bench/method/task_singular_vector/utils/tsv_compression.py"),),
    ),
    pull_request(
        "0003-sti",
        modules=(("fusion_bench_tsv/functional/interference.py",
                  "fusion_bench/method/task_singular_vector/utils/interference.py"),),
    ),
    pull_request("0004-tsvm-low-memory"),
]


class GenerationError(RuntimeError):
    """The package, SERIES or FusionBench's files do not fit together; the message says what to change."""


# ----------------------------------------------------------------------------------------- FusionBench's files
def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def installed_fusion_bench() -> Path:
    """The directory of the installed ``fusion_bench`` package, from its distribution's metadata (an imported
    ``fusion_bench`` may be a lazy module without ``__spec__``, so ``importlib.util.find_spec`` is not used)."""
    try:
        init = Path(importlib.metadata.distribution("fusion-bench").locate_file("fusion_bench/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        init = None
    if init is None or not init.is_file():
        raise GenerationError(f"fusion_bench is not installed: pip install fusion-bench=={FUSION_BENCH_VERSION}")
    return init.parent


def base_path(path: str) -> Path:
    """Where FusionBench's ``path`` is read from: the installed package, or ``upstream/base/``."""
    if path.startswith(("fusion_bench/", "config/")):
        return installed_fusion_bench().parent / re.sub(r"^config/", "fusion_bench_config/", path)
    return UPSTREAM / "base" / path


def main_file(path: str) -> Optional[str]:
    """FusionBench's ``path`` at MAIN_COMMIT (``None``: main has no such file)."""
    if path not in MAIN_BLOBS:
        raise GenerationError(f"the series touches {path}: record its blob id at {MAIN_COMMIT[:7]} in MAIN_BLOBS "
                              f"(`git ls-tree {MAIN_COMMIT[:7]} {path}`; None for a new file)")
    blob = MAIN_BLOBS[path]
    if blob is None:
        return None
    file = base_path(path)
    if not file.is_file():
        raise GenerationError(f"{file} (FusionBench's {path}) is missing: install fusion-bench=={FUSION_BENCH_VERSION}"
                              f" or copy main's file there (`git show {MAIN_COMMIT[:7]}:{path}`)")
    data = file.read_bytes()
    if git_blob_id(data) != blob:
        raise GenerationError(f"{file} is not FusionBench's {path} at {MAIN_COMMIT[:7]} (blob {blob})")
    return data.decode()


def release_tree(archive: Path, into: Path) -> Path:
    """fusion-bench's source distribution ``archive`` unpacked under ``into`` in its repository's layout, where
    ``config/`` is the directory and ``fusion_bench_config`` a link to it (the release ships the directory)."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    tree = into / f"fusion_bench-{FUSION_BENCH_VERSION}"
    (tree / "fusion_bench_config").rename(tree / "config")
    (tree / "fusion_bench_config").symlink_to("config")
    return tree


# ----------------------------------------------------------------------------------------- contributed modules
def _module_of(path: str) -> str:
    parts = path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def check_module(source: str, destination: str, text: str, available: Sequence[str]) -> None:
    """Refuse a module that cannot be copied into FusionBench as it is: an import of something FusionBench does
    not have at that point (``available``: FusionBench paths the series has written so far) or a word that refers
    to this plugin (black and isort are checked on every file of a pull request)."""
    where = f"{source} (copied to {destination})"
    package = _module_of(destination).rsplit(".", 1)[0] if not destination.endswith("__init__.py") else _module_of(destination)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            path = target.replace(".", "/")
            candidates = [f"{path}.py", f"{path}/__init__.py"]
            if node.module is None:
                candidates = [f"{path}/{a.name}.py" for a in node.names]
            if not any(c in available or (installed_fusion_bench().parent / c).is_file() for c in candidates):
                raise GenerationError(f"{where}:{node.lineno}: imports {target}, which FusionBench does not have at "
                                      "this point of the series: copy it in this or an earlier pull request")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ALLOWED_IMPORTS | {"fusion_bench", "__future__"}:
                    raise GenerationError(f"{where}:{node.lineno}: imports {name!r}, which FusionBench does not "
                                          f"depend on (allowed: the standard library, {sorted(ALLOWED_IMPORTS)})")
    for pattern in FORBIDDEN:
        match = re.search(pattern, text)
        if match:
            line = text.count("\n", 0, match.start()) + 1
            raise GenerationError(f"{where}:{line}: {match[0]!r} refers to this plugin, not to FusionBench")


def formatting_problems(path: str, text: str) -> List[str]:
    """What black (line length 88) and isort (profile black), FusionBench's settings, would change in ``text``."""
    return list(_formatting_problems(text))


@lru_cache(maxsize=None)  # measured: black + isort 0.29 s a file; the series built in 5.3 s, again in 0.02 s
def _formatting_problems(text: str) -> Tuple[str, ...]:
    problems = []
    for tool, cmd in (("black", ["-m", "black", "--line-length", "88", "--quiet", "--check", "-"]),
                      ("isort", ["-m", "isort", "--profile", "black", "--project", "fusion_bench", "--check-only", "--quiet", "-"])):
        # run in upstream/base so that no configuration of this repository applies
        proc = subprocess.run([sys.executable, *cmd], input=text, capture_output=True, text=True, cwd=UPSTREAM / "base")
        if f"No module named {tool}" in proc.stderr:
            raise GenerationError(f"{tool} is not installed: pip install '.[test]'")
        if proc.returncode:
            problems.append(f"{tool} would reformat it: run `{tool} {'--profile black ' if tool == 'isort' else ''}"
                            f"<file>`{(': ' + proc.stderr.strip()[:300]) if proc.stderr.strip() else ''}")
    return tuple(problems)


# ----------------------------------------------------------------------------------------- the series
def unified_diff(path: str, old: Optional[str], new: str) -> str:
    """A ``git apply``-able diff of one file (``old`` None: a new file)."""
    old_lines = [] if old is None else old.splitlines(keepends=True)
    body = "".join(difflib.unified_diff(old_lines, new.splitlines(keepends=True),
                                        "/dev/null" if old is None else f"a/{path}", f"b/{path}"))
    if not body:
        return ""
    header = f"diff --git a/{path} b/{path}\n" + ("new file mode 100644\n" if old is None else "")
    return header + body


def diffstat(patch: str) -> Tuple[Dict[str, Tuple[int, int]], int, int]:
    """``({path: (added, removed)}, added, removed)`` of a patch made by :func:`unified_diff`."""
    stats: Dict[str, Tuple[int, int]] = {}
    for block in patch.split("diff --git a/")[1:]:
        path = block.split(" ", 1)[0]
        body = [line for line in block.splitlines()[1:] if not line.startswith(("--- ", "+++ "))]
        stats[path] = (sum(line.startswith("+") for line in body), sum(line.startswith("-") for line in body))
    return stats, sum(a for a, _ in stats.values()), sum(r for _, r in stats.values())


def pull_request_files(pr: PullRequest, current: Dict[str, Optional[str]]) -> Dict[str, str]:
    """``{FusionBench path: new text}`` of every file ``pr`` adds or changes (``current``: the series so far)."""
    src = UPSTREAM / "src" / pr.name
    new: Dict[str, str] = {}
    for file in sorted(src.rglob("*")):
        if file.is_file() and file.name not in ("PR.md", "edits.py") and "__pycache__" not in file.parts:
            new[file.relative_to(src).as_posix()] = file.read_text()
    available = [p for p, t in current.items() if t is not None] + list(new) + [d for _, d in pr.modules]
    for source, destination in pr.modules:
        if destination in new:
            raise GenerationError(f"{pr.name}: {destination} comes both from upstream/src and from {source}")
        text = (REPO_ROOT / source).read_text()
        check_module(source, destination, text, available)
        new[destination] = text
    for path, old, replacement in pr.edits:
        text = new[path] if path in new else (current[path] if path in current else main_file(path))
        if text is None or text.count(old) != 1:
            raise GenerationError(f"{pr.name}: the passage to replace in {path} is not there exactly once: "
                                  "update SERIES in upstream/generate.py")
        new[path] = text.replace(old, replacement)
    for path, text in new.items():
        before = current.get(path) if path in current else main_file(path) if path in MAIN_BLOBS else None
        if before is not None and path.endswith(".py") and formatting_problems(path, before):
            continue  # FusionBench's own file is not black/isort-clean at main (method/__init__.py): not this PR's
        for problem in formatting_problems(path, text) if path.endswith(".py") else ():
            raise GenerationError(f"{pr.name}: {path}: {problem}")
    return new


def build_series() -> Dict[str, str]:
    """``{path under upstream/: text}``: ``series/<name>.patch`` and ``series/<name>.md`` per pull request."""
    current: Dict[str, Optional[str]] = {}
    out: Dict[str, str] = {}
    for pr in SERIES:
        description = UPSTREAM / "src" / pr.name / "PR.md"
        if not description.is_file():
            raise GenerationError(f"upstream/src/{pr.name}/PR.md (the pull request's description) is missing")
        new = pull_request_files(pr, current)
        base = {path: current[path] if path in current else main_file(path) for path in new}
        patch = "".join(unified_diff(path, base[path], new[path]) for path in sorted(new))
        per_file, added, removed = diffstat(patch)
        out[f"series/{pr.name}.patch"] = patch
        out[f"series/{pr.name}.md"] = description.read_text().format(
            main_commit=MAIN_COMMIT,
            main_commit_short=MAIN_COMMIT[:7],
            version=FUSION_BENCH_VERSION,
            files="\n".join(f"- `{p}` (+{a} −{r}{', new' if base[p] is None else ''})" for p, (a, r) in per_file.items()),
            total=f"{len(per_file)} files, +{added} −{removed} lines",
        )
        current.update(new)
    return out


def stale_files(outputs: Dict[str, str], out_dir: Path) -> List[str]:
    """The outputs that differ from what ``out_dir`` holds, and files under ``out_dir/series`` no longer written."""
    stale = [p for p in sorted(outputs) if not (out_dir / p).is_file() or (out_dir / p).read_text() != outputs[p]]
    extra = [p.relative_to(out_dir).as_posix() for p in (out_dir / "series").glob("*")]
    return stale + [f"{p} (no longer in SERIES)" for p in sorted(extra) if p not in outputs]


def write(outputs: Dict[str, str], out_dir: Path) -> None:
    """Write the series, each file atomically (a temporary beside it, then one rename)."""
    (out_dir / "series").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "series").glob("*"):
        if old.relative_to(out_dir).as_posix() not in outputs:
            old.unlink()
    for name, text in outputs.items():
        target = out_dir / name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.replace(target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=UPSTREAM, help="output directory (default: upstream/)")
    parser.add_argument("--check", action="store_true", help="only report files that are out of date (exit 1)")
    args = parser.parse_args(argv)
    try:
        outputs = build_series()
    except GenerationError as exc:
        print(f"upstream/generate.py: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(outputs, args.out)
        if stale:
            print("out of date (run python upstream/generate.py):\n  " + "\n  ".join(stale), file=sys.stderr)
            return 1
        print(f"{args.out}: up to date ({', '.join(sorted(outputs))})")
        return 0
    write(outputs, args.out)
    print(f"wrote {', '.join(str(args.out / p) for p in sorted(outputs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
