#!/usr/bin/env python
"""Generate the FusionBench pull requests (``upstream/``).

The series (``upstream/series/``, :data:`SERIES`): small pull requests against FusionBench's git main
(:data:`MAIN_COMMIT`), each applying on top of the ones before it and also to ``0.2.33``; each is written from
``upstream/src/<name>/`` (its files in FusionBench's layout and its description ``PR.md``) and the passages it
edits in FusionBench's own files. ``series/<name>.patch`` and ``series/<name>.md`` per pull request.

The single pull request (``tsv.patch``, ``PR.md``) adds TSV-M, TSV-C and STI to FusionBench ``0.2.33`` as
``fusion_bench/method/tsv/``. Everything in it is derived from this repository by :data:`PLACEMENT` (what goes
where) and the rewrites below, so the package and the contribution never diverge:

    python upstream/generate.py                # writes the series, upstream/tsv.patch and upstream/PR.md
    python upstream/generate.py --series-only  # only the series (no download needed)
    python upstream/generate.py --tree         # also the single PR's files under upstream/pr/ (FusionBench's layout)
    python upstream/generate.py --check        # exit 1 (listing the files) when they are out of date

The unchanged FusionBench files that the patch edits come from the ``fusion-bench==0.2.33`` source
distribution, downloaded once with ``pip download`` into ``~/.cache/fusion_bench_tsv/upstream`` (or
``--cache-dir``) and verified by its SHA-256.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import importlib.metadata
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fusion_bench_tsv.io.atomic import write_atomic, write_dir_atomic  # noqa: E402

FUSION_BENCH_VERSION = "0.2.33"
#: SHA-256 of fusion_bench-0.2.33.tar.gz as the registry serves it (pip verified it against the index's hash)
SDIST_SHA256 = "2dd939c7389c36098364faae5dd3e721b8ce85978cdc81653ea49e4492ddb7f1"
SOURCE_PACKAGE = "fusion_bench_tsv"
#: the dotted name under which FusionBench registers the three algorithms (``_import_structure``)
METHOD_GROUP = "tsv"


@dataclass(frozen=True)
class Skip:
    """A part of this repository that is not contributed, and why."""

    reason: str


#: THE table: every source file of the package and every config, by repository path (a trailing ``/``
#: is a whole directory), goes to a path in FusionBench's repository or is skipped with its reason. A
#: path matches its longest entry; a package file or config that matches none stops the generator, so
#: a new module (or a redesign of the layout) is placed here explicitly. Imports and dotted references
#: are rewritten from these destinations, so any layout works as long as each package keeps its modules
#: under their own names.
PLACEMENT: Dict[str, Union[str, Skip]] = {
    # --- the method: pure math (functional), reading and writing (io), how the work runs (runtime), the
    # three algorithms (methods); the layers keep their names under fusion_bench/method/tsv/
    "fusion_bench_tsv/__init__.py": "fusion_bench/method/tsv/__init__.py",  # generated: see eager_init()
    "fusion_bench_tsv/functional/": "fusion_bench/method/tsv/functional/",
    "fusion_bench_tsv/io/": "fusion_bench/method/tsv/io/",
    "fusion_bench_tsv/runtime/": "fusion_bench/method/tsv/runtime/",
    "fusion_bench_tsv/methods/": "fusion_bench/method/tsv/methods/",
    "config/method/tsv/": "config/method/tsv/",
    "config/tsv/": "config/tsv/",  # the run summary callback the method configs include
    # --- written for the PR (FusionBench's unittest style, its docs); rewritten like the package
    "upstream/src/tests/test_tsv.py": "tests/test_tsv.py",
    "upstream/src/docs/algorithms/tsv.md": "docs/algorithms/tsv.md",
    # --- not contributed
    "fusion_bench_tsv/compat.py": Skip(
        "typing.override for FusionBench's own OpenCLIP modules on Python < 3.12: a fix that belongs in "
        "those modules, not in this method"
    ),
    "fusion_bench_tsv/benchmark/": Skip("the offline tiny-CLIP benchmark (models and data built locally)"),
    "fusion_bench_tsv/compare/": Skip("the plugin's comparison command (tables and plots runs, runs baselines)"),
    "config/modelpool/": Skip("pools of the offline tiny-CLIP benchmark"),
    "config/taskpool/": Skip("task pools of the offline tiny-CLIP benchmark"),
    # --- validation task pools of the TALL suites (TSV-M's alpha_grid) and the val splits they need
    "config/taskpool/CLIPVisionModelTaskPool/clip-vit-classification_TALL14_val.yaml":
        "config/taskpool/CLIPVisionModelTaskPool/clip-vit-classification_TALL14_val.yaml",
    "config/taskpool/CLIPVisionModelTaskPool/clip-vit-classification_TALL20_val.yaml":
        "config/taskpool/CLIPVisionModelTaskPool/clip-vit-classification_TALL20_val.yaml",
    "config/dataset/image_classification/val/": "config/dataset/image_classification/val/",
}

#: Python source trees and configs whose every file must be covered by PLACEMENT
COVERED = [("fusion_bench_tsv", "*.py"), ("config", "*.yaml")]

#: Text that is not a reference to this package's code and stays as it is: the format tag of TSV-C
#: checkpoints, so a checkpoint written by either code base loads in the other.
KEEP_LITERALLY = ['"fusion_bench_tsv/tsv_c"']

#: Edits of single passages, applied before the reference rewrite: (source path, regex, replacement, why).
#: Each pattern must match; one that no longer does stops the generator, naming it.
SUBSTITUTIONS: List[Tuple[str, str, str, str]] = [
    (
        "fusion_bench_tsv/io/modelpool.py",
        r"^OFFLINE_BENCHMARK_HINT = \(\n.*?\n\)$",
        'OFFLINE_BENCHMARK_HINT = "Without network, point the modelpool at local checkpoint directories"',
        "the offline benchmark and its build command are not contributed",
    ),
    (
        "fusion_bench_tsv/io/modelpool.py",
        r"^def offline_benchmark_hint\(path: str, num_tasks: int\) -> str:\n.*?\n(?=\n\n)",
        'def offline_benchmark_hint(path: str, num_tasks: int) -> str:\n    """No hint: the offline benchmark is not '
        'part of FusionBench."""\n    return ""',
        "the offline benchmark's build command (and its package) are not contributed",
    ),
    (
        "*",
        r"`?`?benchmarks/results/performance\.md`?`?",
        "the performance table of docs/algorithms/tsv.md",
        "benchmark results are summarized in the docs page",
    ),
]

#: Leftovers that mean a reference to something the PR does not contain (checked after rewriting).
FORBIDDEN = [r"\bfusion_bench_tsv\b", r"fusion-bench-tsv", r"\btiny_clip", r"\bbenchmarks/", r"hydra_plugins"]

#: Lines added to files FusionBench already has: (path, anchor regex, text inserted after the anchor's line).
#: ``{exports}`` is the algorithms' names, ``{new_deps}`` the new requirement lines. Each anchor must match once.
UPSTREAM_EDITS: List[Tuple[str, str, str]] = [
    (
        "fusion_bench/method/__init__.py",
        r'^    "task_singular_vector": \["TaskSingularVectorMerging"\],$',
        '    "{group}": [{exports_quoted}],',
    ),
    (
        "fusion_bench/method/__init__.py",
        r"^    from \.task_singular_vector import TaskSingularVectorMerging$",
        "    from .{group} import {exports}",
    ),
    ("pyproject.toml", r'^    "scipy",$', "{new_deps}"),
]

#: Files of FusionBench 0.2.33 replaced as a whole (its stubs that now have a working implementation).
UPSTREAM_REPLACEMENTS: Dict[str, str] = {
    "fusion_bench/method/task_singular_vector/TSVC.py": '''\
"""Task Singular Vector Compression (TSV-C): implemented by :mod:`fusion_bench.method.{group}.methods.tsv_compress`.

This module used to hold a stub whose ``run`` raised ``NotImplementedError``; the name is kept for imports.
"""

from ..{group}.methods.tsv_compress import TSVCompressAlgorithm as TaskSingularVectorCompression

__all__ = ["TaskSingularVectorCompression"]
''',
    "fusion_bench/method/task_singular_vector/utils/task_singular_interference.py": '''\
from typing import List

import torch

from ...{group}.functional import singular_task_interference


def compute_task_singular_interference(weight_differences: List[torch.Tensor]) -> float:
    R"""
    Compute the singular task interference of a list of weight differences $\\{{W_i - W_0\\}}_{{i=1}}^T$,
    where $W_0$ is the pre-trained model weight, $W_i$ is the weight of the i-th fine-tuned model
    and $T$ is the number of fine-tuned models (Gargiulo et al., CVPR 2025, Eq. 4, with the full-rank
    SVD of each difference): $\\lVert (U^\\top U - I) \\Sigma (V^\\top V - I) \\rVert_1$, the entrywise L1 norm,
    with $U$ and $V$ the column-wise concatenations of the tasks' singular vectors.

    Args:
        weight_differences (List[torch.Tensor]): A list of weight differences $\\{{W_i - W_0\\}}_{{i=1}}^T$.

    Returns:
        float: The singular interference of the list of weight differences.
    """
    rank = min(weight_differences[0].shape)
    return float(singular_task_interference(weight_differences, k=rank))
''',
}


class GenerationError(RuntimeError):
    """The package, the table or FusionBench's files do not fit together; the message says what to change."""


# ----------------------------------------------------------------------------------------- placement
def placement_of(path: str) -> Tuple[str, Union[str, Skip]]:
    """The longest PLACEMENT entry covering repository path ``path`` and its value."""
    best = None
    for key in PLACEMENT:
        if path == key or (key.endswith("/") and path.startswith(key)):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise GenerationError(
            f"{path} is not placed: add it to PLACEMENT in upstream/generate.py (a destination in FusionBench's "
            "repository, or Skip('why it is not contributed'))"
        )
    return best, PLACEMENT[best]


def destination(path: str) -> Optional[str]:
    """Where repository path ``path`` goes in FusionBench's repository; ``None`` when it is skipped."""
    key, value = placement_of(path)
    if isinstance(value, Skip):
        return None
    return value + path[len(key):] if key.endswith("/") else value


def contributed_files() -> Dict[str, str]:
    """``{source path: destination path}`` of every contributed file, after checking that every package file
    and config is covered by PLACEMENT and that every PLACEMENT entry still exists."""
    for key in PLACEMENT:
        if not (REPO_ROOT / key).exists():
            raise GenerationError(f"PLACEMENT entry {key!r} of upstream/generate.py does not exist: update the table")
    sources = set()
    for top, pattern in COVERED:
        sources.update(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / top).rglob(pattern))
    for key, value in PLACEMENT.items():
        if isinstance(value, Skip):
            continue
        if key.endswith("/"):
            sources.update(
                p.relative_to(REPO_ROOT).as_posix()
                for p in (REPO_ROOT / key).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            )
        else:
            sources.add(key)
    result = {}
    for src in sorted(sources):
        dst = destination(src)
        if dst is not None:
            result[src] = dst
    return result


def module_name(path: str) -> str:
    """Dotted module name of a Python file path (``a/b/__init__.py`` -> ``a.b``)."""
    parts = path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_map(files: Dict[str, str]) -> Dict[str, Optional[str]]:
    """Source module name -> destination module name (``None``: a module of the package that is skipped)."""
    mapping: Dict[str, Optional[str]] = {}
    for p in (REPO_ROOT / SOURCE_PACKAGE).rglob("*.py"):
        src = p.relative_to(REPO_ROOT).as_posix()
        dst = files.get(src)
        mapping[module_name(src)] = module_name(dst) if dst else None
    for name, dst in mapping.items():
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        if dst is not None and any(mapping.get(p) is None for p in parents):
            raise GenerationError(f"{name} is placed but a package above it is skipped: place its __init__.py too")
    return mapping


def exports() -> Dict[str, str]:
    """The algorithms the package exports (its ``_LAZY`` table): ``{class name: source module}``."""
    tree = ast.parse((REPO_ROOT / SOURCE_PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets):
                return ast.literal_eval(node.value)
    raise GenerationError(f"{SOURCE_PACKAGE}/__init__.py has no _LAZY table of exported algorithms")


# ----------------------------------------------------------------------------------------- rewriting
class Rewriter:
    """Rewrites one file's references to this package into references to the contribution."""

    def __init__(self, modules: Dict[str, Optional[str]], exported: Dict[str, str]):
        self.modules = modules
        self.exported = exported

    def _map_dotted(self, dotted: str, where: str, yaml: bool) -> str:
        parts = dotted.split(".")
        if yaml and len(parts) == 2 and parts[1] in self.exported:
            return f"fusion_bench.method.{parts[1]}"  # FusionBench's configs target the lazy registry
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in self.modules:
                dst = self.modules[head]
                if dst is None:
                    raise GenerationError(f"{where}: refers to {head}, which PLACEMENT skips: place it or drop the reference")
                return ".".join([dst, *parts[cut:]])
        raise GenerationError(f"{where}: {dotted} is not a module of {SOURCE_PACKAGE}")

    def _relative_import(self, src_module: str, is_package: bool, dots: str, rest: str, names: str, where: str) -> str:
        package = src_module.split(".") if is_package else src_module.split(".")[:-1]
        base = package[: len(package) - (len(dots) - 1)]
        target = ".".join(base + ([rest] if rest else []))
        dst_target = self.modules.get(target)
        if dst_target is None:
            raise GenerationError(f"{where}: imports {target}, which PLACEMENT skips or does not know")
        for name in re.findall(r"\w+", names.split(" as ")[0]) if not rest else []:
            sub = f"{target}.{name}"  # ``from . import module``: the module must keep its name beside it
            if sub in self.modules and self.modules[sub] != f"{dst_target}.{name}":
                raise GenerationError(f"{where}: imports module {sub} from its package, so it must stay in that package")
        dst_module = self.modules[src_module]
        dst_package = dst_module.split(".") if is_package else dst_module.split(".")[:-1]
        target_parts = dst_target.split(".")
        common = 0
        while common < min(len(dst_package), len(target_parts)) and dst_package[common] == target_parts[common]:
            common += 1
        up = len(dst_package) - common
        return "." * (up + 1) + ".".join(target_parts[common:])

    def rewrite(self, text: str, src: str, module: Optional[str]) -> str:
        yaml = src.endswith((".yaml", ".yml"))
        for path, pattern, replacement, _why in SUBSTITUTIONS:
            if path not in ("*", src):
                continue
            text, count = re.subn(pattern, replacement, text, flags=re.M | re.S)
            if count == 0 and path != "*":
                raise GenerationError(f"{src}: SUBSTITUTIONS pattern {pattern!r} no longer matches: update it")
        keep = {f"\x00{i}\x00": literal for i, literal in enumerate(KEEP_LITERALLY)}
        for token, literal in keep.items():
            text = text.replace(literal, token)
        if module is not None:
            is_package = src.endswith("__init__.py")

            def relative(match: re.Match) -> str:
                where = f"{src}:{text.count(chr(10), 0, match.start()) + 1}"
                new = self._relative_import(module, is_package, match[2], match[3], match[4], where)
                return f"{match[1]}from {new} import {match[4]}"

            text = re.sub(r"^(\s*)from (\.+)([\w.]*) import (.*)$", relative, text, flags=re.M)

        def dotted(match: re.Match) -> str:
            return self._map_dotted(match[0], f"{src}:{text.count(chr(10), 0, match.start()) + 1}", yaml)

        text = re.sub(rf"\b{SOURCE_PACKAGE}(?:\.\w+)+", dotted, text)
        text = re.sub(rf"(:mod:`~?){SOURCE_PACKAGE}`", lambda m: f"{m[1]}{self.modules[SOURCE_PACKAGE]}`", text)
        text = re.sub(rf"\b{SOURCE_PACKAGE}\b", "fusion-bench", text)  # the distribution, in prose and messages
        for token, literal in keep.items():
            text = text.replace(token, literal)
        for pattern in FORBIDDEN:
            for match in re.finditer(pattern, text.replace(KEEP_LITERALLY[0], "")):
                line = text.count("\n", 0, match.start()) + 1
                raise GenerationError(
                    f"{src}:{line}: {match[0]!r} refers to something the PR does not contain: add a SUBSTITUTIONS "
                    "entry to upstream/generate.py (or place what it refers to)"
                )
        return text


def eager_init(exported: Dict[str, str], modules: Dict[str, Optional[str]], package: str) -> str:
    """``__init__.py`` of the contributed package: FusionBench imports method packages lazily through
    ``fusion_bench.method._import_structure``, so the package itself imports its algorithms directly."""
    lines = ['"""Task Singular Vectors (Gargiulo et al., CVPR 2025, arXiv:2412.00081): TSV-M, TSV-C and STI.', "",
             "Streaming implementations: one fine-tuned model (or one layer) in memory at a time.", '"""', "",
             "# flake8: noqa F401"]
    for name, src_module in sorted(exported.items(), key=lambda kv: kv[1]):
        dst = modules[src_module]
        lines.append(f"from .{dst[len(package) + 1:]} import {name}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- dependencies
def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(sources: Dict[str, str]) -> Dict[str, str]:
    """``{distribution: import name}`` of every third-party top-level import in the contributed Python files."""
    stdlib = set(sys.stdlib_module_names)
    names = set()
    for text in sources.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    names -= stdlib | {"fusion_bench", "__future__"}
    providers = importlib.metadata.packages_distributions()
    result = {}
    for name in sorted(names):
        if name not in providers:
            raise GenerationError(f"the contribution imports {name!r}, which no installed distribution provides")
        result[_dist_name(providers[name][0])] = name
    return result


def requirement_closure(direct: Sequence[str]) -> set:
    """Distributions installed with ``direct`` (their requirements, recursively, by installed metadata)."""
    from packaging.requirements import Requirement

    seen, stack = set(), [_dist_name(d) for d in direct]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return seen


def dependency_report(sources: Dict[str, str], pkg_info: str) -> Tuple[List[str], List[str]]:
    """(new requirements for FusionBench's pyproject, lines describing every third-party import), from the
    sdist's metadata (``PKG-INFO``: its ``Requires-Dist`` without extras)."""
    from email.parser import Parser

    from packaging.requirements import Requirement

    requires = [Requirement(r) for r in Parser().parsestr(pkg_info).get_all("Requires-Dist", [])]
    declared = [r.name for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})]
    declared_names = {_dist_name(d) for d in declared}
    closure = requirement_closure(declared)
    new, lines = [], []
    for dist, module in third_party_imports(sources).items():
        if dist in declared_names:
            status = "a dependency of fusion-bench"
        elif dist in closure:
            status = "installed with fusion-bench's dependencies"
        else:
            status = "**new**: added to `pyproject.toml`"
            new.append(dist)
        lines.append(f"- `{module}` ({dist}): {status}")
    return new, lines


# ----------------------------------------------------------------------------------------- FusionBench files
def sdist_path(cache_dir: Path) -> Path:
    """The verified ``fusion-bench`` source distribution in ``cache_dir``, downloaded with pip when absent."""
    archive = cache_dir / f"fusion_bench-{FUSION_BENCH_VERSION}.tar.gz"
    if not archive.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"fusion-bench=={FUSION_BENCH_VERSION}", "-d", str(cache_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not archive.is_file():
            raise GenerationError(
                f"could not download fusion-bench=={FUSION_BENCH_VERSION}'s source distribution ({' '.join(cmd)}): "
                f"{(proc.stdout + proc.stderr)[-2000:]}\nWithout network, put {archive.name} into {cache_dir}"
            )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise GenerationError(f"{archive}: SHA-256 {digest}, expected {SDIST_SHA256}: delete the file to download it again")
    return archive


def read_sdist(archive: Path, paths: Sequence[str]) -> Dict[str, str]:
    """The text of ``paths`` (FusionBench repository paths) in the source distribution."""
    prefix = f"fusion_bench-{FUSION_BENCH_VERSION}/"
    with tarfile.open(archive) as tar:
        result = {}
        for path in paths:
            try:
                member = tar.extractfile(prefix + path)
            except KeyError:
                member = None
            if member is None:
                raise GenerationError(f"{archive.name} has no file {path}")
            result[path] = member.read().decode()
    return result


def insert_after(text: str, anchor: str, addition: str, where: str) -> str:
    matches = list(re.finditer(anchor, text, flags=re.M))
    if len(matches) != 1:
        raise GenerationError(f"{where}: anchor {anchor!r} matches {len(matches)} times (need once): update UPSTREAM_EDITS")
    if not addition:
        return text
    end = matches[0].end()
    return text[:end] + "\n" + addition + text[end:]


# ----------------------------------------------------------------------------------------- generation
def unified_diff(path: str, old: Optional[str], new: str) -> str:
    old_lines = [] if old is None else old.splitlines(keepends=True)
    diff = difflib.unified_diff(
        old_lines, new.splitlines(keepends=True),
        fromfile="/dev/null" if old is None else f"a/{path}", tofile=f"b/{path}", n=3,
    )
    header = f"diff --git a/{path} b/{path}\n" + ("new file mode 100644\n" if old is None else "")
    return header + "".join(diff)


def build(cache_dir: Path) -> Dict[str, str]:
    """Every generated file, ``{path under upstream/: text}``: ``pr/<FusionBench path>``, ``tsv.patch``, ``PR.md``."""
    files = contributed_files()
    modules = module_map(files)
    exported = exports()
    rewriter = Rewriter(modules, exported)
    package = modules[SOURCE_PACKAGE]
    tree: Dict[str, str] = {}
    for src, dst in files.items():
        if src == f"{SOURCE_PACKAGE}/__init__.py":
            tree[dst] = eager_init(exported, modules, package)
            continue
        text = (REPO_ROOT / src).read_text()
        module = module_name(src) if src.startswith(SOURCE_PACKAGE + "/") and src.endswith(".py") else None
        tree[dst] = rewriter.rewrite(text, src, module)
    performance = REPO_ROOT / "benchmarks/results/performance.md"
    table = "".join(  # the CLIP-shaped rows (the LLM rows refer to a report the PR does not contain)
        line for line in performance.read_text().splitlines(keepends=True) if line.startswith("|") and "LLM" not in line
    )
    docs = "docs/algorithms/tsv.md"
    if "{performance_table}" not in tree[docs]:
        raise GenerationError(f"upstream/src/{docs} lost its {{performance_table}} placeholder")
    tree[docs] = tree[docs].replace("{performance_table}", table.rstrip("\n"))

    archive = sdist_path(cache_dir)
    edited = sorted({p for p, _, _ in UPSTREAM_EDITS} | set(UPSTREAM_REPLACEMENTS))
    originals = read_sdist(archive, edited)
    python_sources = {p: t for p, t in tree.items() if p.endswith(".py") and not p.startswith("tests/")}
    new_deps, dep_lines = dependency_report(python_sources, read_sdist(archive, ["PKG-INFO"])["PKG-INFO"])
    names = sorted(exported)
    fill = dict(
        group=METHOD_GROUP,
        exports=", ".join(names),
        exports_quoted=", ".join(f'"{n}"' for n in names),
        new_deps="\n".join(f'    "{d}",' for d in new_deps),
    )
    for path in edited:
        text = originals[path]
        if path in UPSTREAM_REPLACEMENTS:
            text = UPSTREAM_REPLACEMENTS[path].format(**fill)
        for edit_path, anchor, addition in UPSTREAM_EDITS:
            if edit_path == path:
                text = insert_after(text, anchor, addition.format(**fill), path)
        if text != originals[path]:
            tree[path] = text

    patch = "".join(unified_diff(p, originals.get(p), tree[p]) for p in sorted(tree))
    listing = "\n".join(
        f"- `{p}`" + (" (changed)" if p in originals else "") for p in sorted(tree)
    )
    template = (REPO_ROOT / "upstream/src/PR.md").read_text()
    pr = template.format(
        version=FUSION_BENCH_VERSION,
        files=listing,
        num_files=len(tree),
        dependencies="\n".join(dep_lines),
        skipped="\n".join(f"- `{k}`: {v.reason}" for k, v in PLACEMENT.items() if isinstance(v, Skip)),
    )
    out = {f"pr/{p}": t for p, t in tree.items()}
    out["tsv.patch"] = patch
    out["PR.md"] = pr
    return out


# ----------------------------------------------------------------------------------------- the series
#: FusionBench's git main (github.com/tanganke/fusion_bench) that every pull request of the series is made against
MAIN_COMMIT = "54c9e8c9d9621620c720452cd8533332a32d3689"
#: Every FusionBench file the series touches: its git blob id at MAIN_COMMIT, ``None`` for a file main does not
#: have. A file main has is read from the installed ``fusion_bench`` (0.2.33: no file the series touches changed
#: between 0.2.33 and MAIN_COMMIT) and must hash to this blob id, so each patch is made against main's text.
MAIN_BLOBS: Dict[str, Optional[str]] = {
    "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py": "f45ff82c7af9a51a0fa1c025f9f95845a4371edc",
    "fusion_bench/method/task_singular_vector/utils/task_singular_interference.py":
        "4dae241d79f24f6a2bd6f3a50b3e33014717c73e",
    "tests/test_task_singular_vector.py": None,
}


@dataclass(frozen=True)
class PullRequest:
    """One pull request of the series: ``upstream/src/<name>/`` holds its new or replaced files in FusionBench's
    repository layout and ``PR.md``, its description; ``edits`` replace single passages of FusionBench's files
    (``(path, old, new)``, each ``old`` found exactly once)."""

    name: str
    edits: Tuple[Tuple[str, str, str], ...] = ()


SERIES: List[PullRequest] = [
    PullRequest(
        "0001-tsv-fixes",
        edits=(
            (
                "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
                """\
                if i == 0:
                    print(f"Computed SVD for {key}...")
                    sum_u = torch.zeros_like(u, device=accelerator)
                    sum_s = torch.zeros_like(s, device=accelerator)
                    sum_vh = torch.zeros_like(vh, device=accelerator)
                reduced_index_s = int(s.shape[0] * sv_reduction)
""",
                """\
                # at least one singular triplet per task: int(min(m, n) / T) is 0 when
                # min(m, n) < T, which would drop the layer's update
                reduced_index_s = max(1, int(s.shape[0] * sv_reduction))
                if i == 0:
                    print(f"Computed SVD for {key}...")
                    # T * reduced_index_s exceeds min(m, n) when min(m, n) < T
                    width = max(s.shape[0], num_tasks * reduced_index_s)
                    sum_u = u.new_zeros(u.shape[0], width)
                    sum_s = s.new_zeros(width)
                    sum_vh = vh.new_zeros(width, vh.shape[1])
""",
            ),
            (
                "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
                """\
            if return_single_task_models:
                reduced_index_s = int(sum_s.shape[0] * sv_reduction)
                new_u = u_u @ vh_u
""",
                """\
            if return_single_task_models:
                new_u = u_u @ vh_u
""",
            ),
        ),
    ),
]


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


def main_file(path: str) -> Optional[str]:
    """FusionBench's ``path`` at MAIN_COMMIT (``None``: main has no such file), read from the installed package."""
    if path not in MAIN_BLOBS:
        raise GenerationError(f"the series touches {path}: record its blob id at {MAIN_COMMIT[:7]} in MAIN_BLOBS "
                              f"(`git ls-tree {MAIN_COMMIT[:7]} {path}`; None for a new file)")
    blob = MAIN_BLOBS[path]
    if blob is None:
        return None
    installed = installed_fusion_bench().parent / re.sub(r"^config/", "fusion_bench_config/", path)
    if not installed.is_file():
        raise GenerationError(f"{path} is not part of the installed fusion_bench; the series can only edit its files")
    data = installed.read_bytes()
    if git_blob_id(data) != blob:
        raise GenerationError(f"{installed} is not FusionBench's {path} at {MAIN_COMMIT[:7]} (blob {blob}): "
                              f"install fusion-bench=={FUSION_BENCH_VERSION}")
    return data.decode()


def diffstat(patch: str) -> Tuple[Dict[str, Tuple[int, int]], int, int]:
    """``({path: (added, removed)}, added, removed)`` of a patch made by :func:`unified_diff`."""
    stats: Dict[str, List[int]] = {}
    for block in patch.split("diff --git a/")[1:]:
        path = block.split(" ", 1)[0]
        lines = block.splitlines()
        body = [line for line in lines[1:] if not line.startswith(("--- ", "+++ "))]
        stats[path] = [sum(line.startswith("+") for line in body), sum(line.startswith("-") for line in body)]
    return ({p: (a, r) for p, (a, r) in stats.items()}, sum(a for a, _ in stats.values()),
            sum(r for _, r in stats.values()))


def build_series() -> Dict[str, str]:
    """``{path under upstream/: text}`` of the series: ``series/<name>.patch`` and ``series/<name>.md`` per pull
    request; each patch is made against main with the pull requests before it applied."""
    current: Dict[str, Optional[str]] = {}
    out: Dict[str, str] = {}
    for pr in SERIES:
        src = REPO_ROOT / "upstream" / "src" / pr.name
        description = src / "PR.md"
        if not description.is_file():
            raise GenerationError(f"upstream/src/{pr.name}/PR.md (the pull request's description) is missing")
        new: Dict[str, str] = {}

        def text_of_base(path: str) -> Optional[str]:
            return current[path] if path in current else main_file(path)

        for file in sorted(src.rglob("*")):
            if file.is_file() and file != description and "__pycache__" not in file.parts:
                new[file.relative_to(src).as_posix()] = file.read_text()
        for path, old, replacement in pr.edits:
            text = new[path] if path in new else text_of_base(path)
            if text is None or text.count(old) != 1:
                raise GenerationError(f"{pr.name}: the passage to replace in {path} is not there exactly once: "
                                      "update SERIES in upstream/generate.py")
            new[path] = text.replace(old, replacement)
        base = {path: text_of_base(path) for path in new}
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


def committed(outputs: Dict[str, str]) -> List[str]:
    """The outputs the repository keeps: everything but the ``pr/`` tree (``--tree``: the single pull request's
    files as a directory tree for reading; committed, it would be a second copy of the package's code)."""
    return sorted(p for p in outputs if not p.startswith("pr/"))


def write(outputs: Dict[str, str], out_dir: Path, tree: bool = False) -> None:
    """Write the committed outputs; with ``tree``, also replace ``out_dir/pr`` (atomically, as one directory)."""

    def fill(tmp: Path) -> None:
        for path, text in outputs.items():
            if path.startswith("pr/"):
                target = tmp / path[len("pr/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)

    if tree:
        write_dir_atomic(out_dir / "pr", fill)
    for name in committed(outputs):
        write_atomic(out_dir / name, lambda tmp, name=name: tmp.write_text(outputs[name]))


def stale_files(outputs: Dict[str, str], out_dir: Path) -> List[str]:
    """The committed outputs under ``out_dir`` that differ from ``outputs`` or are missing."""
    return [p for p in committed(outputs) if not (out_dir / p).is_file() or (out_dir / p).read_text() != outputs[p]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "upstream", help="output directory (default: upstream/)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/fusion_bench_tsv/upstream",
                        help="where the fusion-bench source distribution is kept")
    parser.add_argument("--check", action="store_true", help="only report files that are out of date (exit 1)")
    parser.add_argument("--tree", action="store_true",
                        help="also write the pull request's files as a tree under <out>/pr/ (for reading; not committed)")
    parser.add_argument("--series-only", action="store_true",
                        help="only the series (upstream/series/), not tsv.patch and PR.md")
    args = parser.parse_args(argv)
    try:
        outputs = build_series()
        if not args.series_only:
            outputs.update(build(args.cache_dir))
    except GenerationError as exc:
        print(f"upstream/generate.py: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(outputs, args.out)
        if stale:
            print("out of date (run python upstream/generate.py):\n  " + "\n  ".join(stale), file=sys.stderr)
            return 1
        print(f"{args.out}: up to date ({', '.join(committed(outputs))})")
        return 0
    write(outputs, args.out, tree=args.tree)
    tree = f" and the tree under {args.out / 'pr'}" if args.tree else ""
    print(f"wrote {', '.join(str(args.out / p) for p in committed(outputs))}{tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
