"""The installed environment: the plugin, FusionBench, torchvision and open_clip import together; an editable
install of the project composes its configs from any directory."""

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support import REPO_ROOT


def test_core_packages_import_together():
    code = (
        "import fusion_bench_tsv, fusion_bench, torchvision, open_clip, torch;"
        "from fusion_bench_tsv import TSVMergeAlgorithm;"
        "from fusion_bench import BaseAlgorithm;"
        "assert issubclass(TSVMergeAlgorithm, BaseAlgorithm);"
        "import torchvision.transforms;"
        "print(torch.__version__, torchvision.__version__, open_clip.__version__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch_version, vision_version, _ = proc.stdout.split()
    # torch and torchvision must be one build (a CUDA torchvision beside a CPU torch breaks imports)
    assert torch_version.partition("+")[2] == vision_version.partition("+")[2]


def test_functional_core_does_not_need_fusion_bench():
    code = "import sys, fusion_bench_tsv.functional; assert 'fusion_bench' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fusion_bench_openclip_pools_import_after_our_package():
    """fusion-bench 0.2.33's OpenCLIP code needs typing.override (Python >= 3.12); our compat shim provides it."""
    code = (
        "import fusion_bench_tsv;"
        "from fusion_bench.modelpool import OpenCLIPVisionModelPool;"
        "from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _bridge_site_packages(target: Path, exclude: str = "fusion_bench_tsv") -> None:
    """Mirror the running interpreter's site-packages into ``target`` with symlinks, leaving out every
    entry of the distribution ``exclude`` (package, dist-info, ``.pth`` and its Hydra plugin), so that a
    scratch venv can use the installed dependencies without seeing an installed copy of this project."""
    source = Path(sysconfig.get_paths()["purelib"])
    target.mkdir(parents=True)

    def excluded(name: str) -> bool:
        return exclude in name.lower().replace("-", "_") or name.endswith(".pth")

    for entry in source.iterdir():
        if excluded(entry.name) or entry.name == "hydra_plugins":
            continue
        (target / entry.name).symlink_to(entry)
    if (source / "hydra_plugins").is_dir():  # other projects' Hydra plugins stay visible
        (target / "hydra_plugins").mkdir()
        for entry in (source / "hydra_plugins").iterdir():
            if not excluded(entry.name):
                (target / "hydra_plugins" / entry.name).symlink_to(entry)


def test_editable_install_composes_tsv_configs_from_any_directory(tmp_path):
    """``pip install -e .`` (what contributors do) must let the ``fusion_bench`` CLI find ``method=tsv/...``
    from any directory: Hydra discovers our search-path plugin by scanning the ``hydra_plugins`` namespace
    package, which an import-hook editable install hides from it.

    The scratch venv borrows the already installed dependencies (a ``.pth`` to a symlink mirror of this
    interpreter's site-packages without this project), so nothing is downloaded; pip installs only the
    project itself, with the build backend of the running environment."""
    if importlib.util.find_spec("hatchling") is None:
        pytest.fail("the build backend hatchling is not installed here: install the test extra (pip install '.[test]')")
    venv, mirror = tmp_path / "venv", tmp_path / "deps"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    _bridge_site_packages(mirror)
    (Path(purelib) / "zz_borrowed_dependencies.pth").write_text(f"{mirror}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(REPO_ROOT)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    compose = subprocess.run(
        [str(python), "-m", "fusion_bench.scripts.cli", "--cfg", "job", "method=tsv/tsv_merge"],
        cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300,
    )
    assert compose.returncode == 0, compose.stderr[-3000:]
    assert "_target_: fusion_bench_tsv.TSVMergeAlgorithm" in compose.stdout, compose.stdout[-3000:]
    where = subprocess.run([str(python), "-c", "import fusion_bench_tsv; print(fusion_bench_tsv.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    assert Path(where.stdout.strip()).resolve().parent == REPO_ROOT / "fusion_bench_tsv", where.stdout + where.stderr
    compare = subprocess.run([str(venv / "bin" / "fusion-bench-tsv-compare"), "--help"], cwd=elsewhere,
                             capture_output=True, text=True, env=env, timeout=120)
    assert compare.returncode == 0 and "--suite" in compare.stdout, compare.stdout + compare.stderr
