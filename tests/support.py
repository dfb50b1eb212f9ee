"""Helpers shared by the tests (imported as ``from support import ...``; the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_EVAL = ["shade_a", "shade_b"]  # tasks of the tiny pool with test data (evaluated through the CLI)


def run_fusion_bench(args: List[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``fusion_bench`` CLI in a subprocess (offline), returning the completed process."""
    exe = Path(sys.executable).parent / "fusion_bench"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def local_clip_pool(tiny_pool, **overrides):
    """A ``CLIPVisionModelPool`` of the ``tiny_pool`` fixture's local checkpoints, entries replaced by ``overrides``."""
    from fusion_bench.modelpool import CLIPVisionModelPool

    models = {"_pretrained_": str(tiny_pool["pretrained"]), **{t: str(p) for t, p in tiny_pool["paths"].items()}}
    models.update(overrides)
    return CLIPVisionModelPool(models=models, processor=str(tiny_pool["pretrained"]))
