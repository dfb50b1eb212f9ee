"""The FusionBench pull requests in ``upstream/series/``: written from this repository by ``upstream/generate.py``
and up to date; each one, in order, applies to FusionBench 0.2.33, the tests it adds fail before it and pass after
it; the whole series installs from the patched source distribution and its configs compose.

The source distribution is downloaded once (``pip download``) into the pytest cache and verified by its SHA-256;
later runs need no network. FusionBench's git main has the same text in every file the series touches
(``MAIN_BLOBS``); ``python upstream/check.py`` runs FusionBench's whole suite on main with each pull request.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO_ROOT
from test_install import _bridge_site_packages

_spec = importlib.util.spec_from_file_location("upstream_generate", REPO_ROOT / "upstream" / "generate.py")
generate = sys.modules.setdefault("upstream_generate", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(generate)

UPSTREAM = REPO_ROOT / "upstream"
#: SHA-256 of fusion_bench-0.2.33.tar.gz as the registry serves it (pip verified it against the index's hash)
SDIST_SHA256 = "2dd939c7389c36098364faae5dd3e721b8ce85978cdc81653ea49e4492ddb7f1"


def _run(cmd, cwd: Path, what: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run ``cmd`` offline, without this interpreter's PYTHONPATH, and fail the test with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | env
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def sdist(request, tmp_path_factory) -> Path:
    """fusion-bench 0.2.33's source distribution, downloaded once and verified."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: download into a temporary dir
    where = Path(cache.mkdir("fusion-bench-sdist") if cache is not None else tmp_path_factory.mktemp("fusion-bench-sdist"))
    archive = where / f"fusion_bench-{generate.FUSION_BENCH_VERSION}.tar.gz"
    if not archive.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"fusion-bench=={generate.FUSION_BENCH_VERSION}", "-d", str(where)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and archive.is_file(), (
            f"could not download the source distribution ({' '.join(cmd)}); without network put {archive.name} into "
            f"{where}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert digest == SDIST_SHA256, f"{archive}: SHA-256 {digest}, expected {SDIST_SHA256}: delete it to download again"
    return archive


def _repository_layout(fusion_bench: Path, config: Path, tree: Path) -> Path:
    """A FusionBench tree in its repository's layout: the package, ``config/`` (``fusion_bench_config`` is a link to
    it there) and the other files the series touches, which the release lacks (``upstream/base/``, main's text)."""
    shutil.copytree(fusion_bench, tree / "fusion_bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(config, tree / "config")
    (tree / "fusion_bench_config").symlink_to("config")
    shutil.copytree(UPSTREAM / "base", tree, dirs_exist_ok=True)
    (tree / "tests").mkdir(exist_ok=True)
    return tree


# ----------------------------------------------------------------------------------------- generation
def test_series_is_up_to_date():
    stale = generate.stale_files(generate.build_series(), UPSTREAM)
    assert not stale, "upstream/series is out of date: run `python upstream/generate.py`; differs: " + ", ".join(stale)


def test_series_edit_that_no_longer_matches_stops_the_generator(monkeypatch):
    first = generate.SERIES[0]
    path, old, new = first.edits[0]
    broken = generate.PullRequest(first.name, edits=((path, old + "# not in FusionBench\n", new),))
    monkeypatch.setattr(generate, "SERIES", [broken])
    with pytest.raises(generate.GenerationError, match=rf"{first.name}: the passage to replace in {re.escape(path)}"):
        generate.build_series()


def test_package_edit_after_generation_is_reported_stale(tmp_path):
    """On a copy of the repository (the real tree is never written): generate, ``--check`` passes; edit a file the
    series is written from (a copied package module where there is one); ``--check`` exits 1 naming the patch."""
    copy = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((REPO_ROOT / name).read_bytes())
    script = [sys.executable, copy / "upstream" / "generate.py"]
    _run(script, tmp_path, "generating the series in the copy")
    assert "up to date" in _run([*script, "--check"], tmp_path, "checking the fresh series").stdout
    last = generate.SERIES[-1]
    edited = copy / (last.modules[0][0] if last.modules else f"upstream/src/{last.name}/PR.md")
    edited.write_text(edited.read_text() + "\n# an edit made after the series was generated\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in [*script, "--check"]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode in (1, 2), proc.stdout + proc.stderr  # 2: the edit itself is refused (formatting)
    assert f"{last.name}" in proc.stderr, proc.stderr
    assert not (UPSTREAM / "series" / "stale").exists()


def test_modules_that_cannot_go_to_fusion_bench_as_they_are_stop_the_generator(tmp_path):
    """A copied module must import only what FusionBench has, name nothing of the plugin, and be formatted as
    FusionBench's code is (black, isort with profile black)."""
    dest = "fusion_bench/method/task_singular_vector/utils/example.py"
    ok = '"""An example."""\n\nimport torch\n\nfrom .TSVM_utils import compute_and_sum_svd_mem_reduction\n'
    generate.check_module("m.py", dest, ok, available=[])
    assert generate.formatting_problems(dest, ok) == []
    cases = {
        "import threadpoolctl\n": r"imports 'threadpoolctl', which FusionBench does not depend on",
        "from .missing_sibling import f\n": r"imports fusion_bench\.method\.task_singular_vector\.utils\.missing_sibling",
        "# see fusion_bench_tsv\n": r"'fusion_bench_tsv' refers to this plugin",
    }
    for text, message in cases.items():
        with pytest.raises(generate.GenerationError, match=message):
            generate.check_module("m.py", dest, text, available=[])
    assert generate.check_module("m.py", dest, "from .sibling import f\n", available=[dest.replace("example", "sibling")]) is None
    assert any("black" in p for p in generate.formatting_problems(dest, "x = {  'a':1 }\n"))
    assert any("isort" in p for p in generate.formatting_problems(dest, "import torch\nimport os\n"))


def test_every_python_file_of_the_series_is_formatted_as_fusion_bench_wants():
    """black (88) and isort (profile black, fusion_bench first-party) leave every added or changed file as it is."""
    current: dict = {}
    for pr in generate.SERIES:
        new = generate.pull_request_files(pr, current)  # raises on a formatting problem
        current.update(new)
    assert any(p.endswith(".py") for p in current)


# ----------------------------------------------------------------------------------------- applying it
#: run in a FusionBench tree (cwd): the tests of files matching argv[1]; prints one JSON line
RUN_TESTS = """
import json, sys, unittest
import fusion_bench
result = unittest.TextTestRunner(verbosity=2).run(unittest.defaultTestLoader.discover("tests", pattern=sys.argv[1]))
print(json.dumps({"fusion_bench": fusion_bench.__file__, "ran": result.testsRun,
                  "failed": sorted(t.id() for t, _ in result.failures + result.errors)}))
"""


def _run_tests(tree: Path, pattern: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", RUN_TESTS, pattern], cwd=tree, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert Path(report["fusion_bench"]).is_relative_to(tree), report  # the copy's FusionBench, not the installed one
    return report | {"log": proc.stderr[-3000:]}


def _added_tests(patch: Path) -> list:
    return re.findall(r"^\+\+\+ b/tests/(test_\w+\.py)$", patch.read_text(), flags=re.M)


def test_series_applies_to_fusion_bench_0_2_33_and_its_tests_pass(tmp_path):
    """Each pull request, in order, applies to the installed fusion-bench 0.2.33 (in its repository's layout); the
    tests it adds or changes fail before it (they test its change) and pass after it."""
    installed = generate.installed_fusion_bench()
    tree = _repository_layout(installed, installed.parent / "fusion_bench_config", tmp_path / "fusion_bench_repo")
    for pr in generate.SERIES:
        patch = UPSTREAM / "series" / f"{pr.name}.patch"
        added = _added_tests(patch)
        assert added, f"{pr.name} adds no tests/test_*.py"
        saved = {name: (tree / "tests" / name).read_text() for name in added if (tree / "tests" / name).is_file()}
        for name in added:  # the pull request's test file on the tree without the pull request: it must fail
            source = UPSTREAM / "src" / pr.name / "tests" / name
            if source.is_file():
                (tree / "tests" / name).write_text(source.read_text())
                before = _run_tests(tree, name)
                assert before["failed"], f"{pr.name}: tests/{name} passes without the pull request: {before}"
            if name in saved:
                (tree / "tests" / name).write_text(saved[name])
            else:
                (tree / "tests" / name).unlink()
        _run(["git", "apply", "--check", patch], tree, f"git apply --check {patch.name}", GIT_CEILING_DIRECTORIES=str(tmp_path))
        _run(["git", "apply", patch], tree, f"git apply {patch.name}", GIT_CEILING_DIRECTORIES=str(tmp_path))
        for name in added:
            after = _run_tests(tree, name)
            expected = (tree / "tests" / name).read_text().count("    def test_")
            assert after["ran"] == expected and not after["failed"], f"{pr.name}: {after}"


#: run in the scratch venv outside the source tree: every config of task_singular_vector composes and instantiates
#: the class it names from the installed package; prints one JSON line
SCRATCH_CHECKS = """
import json
from pathlib import Path
import fusion_bench, fusion_bench.method as method
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
config_dir = Path(fusion_bench.__file__).parent.parent / "fusion_bench_config"
configs = {}
with initialize_config_dir(config_dir=str(config_dir), version_base=None):
    for name in sorted(p.stem for p in (config_dir / "method" / "task_singular_vector").glob("*.yaml")):
        algorithm = instantiate(compose(overrides=["+method=task_singular_vector/" + name]).method)
        configs[name] = type(algorithm).__name__
        assert type(algorithm) is getattr(method, configs[name]), name
print(json.dumps({"fusion_bench": fusion_bench.__file__, "configs": configs}))
"""


def test_whole_series_installs_from_the_patched_source_distribution(sdist, tmp_path):
    """The release's source distribution with the whole series applied (``docs/`` and ``mkdocs.yml``, which it does
    not ship, left out) installs; its configs compose into the classes they name; the series' tests and the
    release's own tests pass against the installed copy."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools, the build backend of fusion-bench's sdist, is not installed here: pip install setuptools")
    src = generate.release_tree(sdist, tmp_path)
    shipped = sorted(p.name for p in (src / "tests").glob("test_*.py"))
    for pr in generate.SERIES:
        _run(["git", "apply", "--exclude=docs/*", "--exclude=mkdocs.yml", UPSTREAM / "series" / f"{pr.name}.patch"],
             src, f"git apply {pr.name}.patch", GIT_CEILING_DIRECTORIES=str(tmp_path))

    venv, deps = tmp_path / "venv", tmp_path / "deps"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, "python -m venv")
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                        "sysconfig").stdout.strip())
    _bridge_site_packages(deps, exclude="fusion_bench")  # neither the installed FusionBench nor this project
    (purelib / "zz_borrowed_dependencies.pth").write_text(f"{deps}\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", src], tmp_path, "pip install of the patched sdist")

    outside = tmp_path / "outside"
    outside.mkdir()
    report = json.loads(_run([python, "-c", SCRATCH_CHECKS], outside, "configs of the installed package").stdout.splitlines()[-1])
    assert Path(report["fusion_bench"]).is_relative_to(purelib), report
    assert "TaskSingularVectorMerging" in report["configs"], report
    series_tests = sorted({name for pr in generate.SERIES for name in _added_tests(UPSTREAM / "series" / f"{pr.name}.patch")})
    tests = outside / "tests"
    tests.mkdir()
    for name in series_tests + [n for n in shipped if n != "test_depth_upscaling.py"]:
        # test_depth_upscaling.py: its tests hit FusionBench 0.2.33's own NameError (and one builds a Mistral-7B)
        shutil.copy(src / "tests" / name, tests / name)
    proc = _run([python, "-m", "unittest", "discover", "-v", "-s", "tests", "-p", "test_*.py"], outside,
                "the series' tests and the release's own tests against the installed copy")
    ran = int(re.search(r"^Ran (\d+) test", proc.stderr, flags=re.M)[1])
    expected = sum((tests / n).read_text().count("    def test_") for n in series_tests)
    assert ran >= expected, proc.stderr[-3000:]
