"""Shared fixtures: a tiny local CLIP, synthetic fine-tuned vision towers and tiny image tasks.

Everything is made on the fly from seeds; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest
from support import TASKS_EVAL

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from fusion_bench_tsv.benchmark.tiny_clip import make_tiny_clip, save_clip

    return save_clip(make_tiny_clip(seed=0), tmp_path_factory.mktemp("tiny_clip") / "pretrained")


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory, tiny_clip_dir) -> Dict[str, object]:
    """A local CLIP pool on disk: pretrained + 8 synthetic fine-tuned towers, 2 tiny test sets, configs.

    Returns a dict with ``config_dir`` (pass as ``--config-dir``), ``name`` (the modelpool/taskpool
    config name, ``tiny_clip_T8``), ``pretrained``, ``tasks`` and ``data_root``.
    """
    from fusion_bench_tsv.benchmark.local_data import save_task_dataset
    from fusion_bench_tsv.benchmark.synthetic import random_image_task, write_clip_pool, write_pool_configs

    root = tmp_path_factory.mktemp("tiny_pool")
    tasks = TASKS_EVAL + [f"task_{i}" for i in range(len(TASKS_EVAL), 8)]
    paths = write_clip_pool(root / "models", tiny_clip_dir, tasks, seed=1)
    for i, task in enumerate(TASKS_EVAL):
        images, labels = random_image_task(num_classes=3, num_images=12, image_size=32, seed=10 + i)
        save_task_dataset(
            root / "data",
            task,
            {"test": (images, labels)},
            classnames=["red", "green", "blue"],
            templates=["a photo of a {}.", "a {} picture."],
        )
    config_dir = root / "config"
    write_pool_configs(config_dir, "tiny_clip_T8", tiny_clip_dir, paths, data_root=root / "data", eval_tasks=TASKS_EVAL)
    return {
        "config_dir": config_dir,
        "name": "tiny_clip_T8",
        "pretrained": tiny_clip_dir,
        "tasks": tasks,
        "paths": paths,
        "data_root": root / "data",
    }
