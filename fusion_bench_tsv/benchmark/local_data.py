"""Local image-classification datasets for FusionBench's CLIP task pools, with no hub access.

A task lives in a directory ``<root>/<task>/`` holding one parquet file per split
(``train.parquet``, ``validation.parquet``, ``test.parquet``: columns ``image`` and ``label``) and
``classes.json`` with the class names and the zero-shot prompt templates (``"a photo of a {}."``).

:func:`load_task_dataset` is meant as a ``_target_`` in taskpool/modelpool YAML: it loads a split
and registers the task's class names and templates with FusionBench's CLIP template registry under
the name the task pool evaluates it by, so zero-shot heads can be built for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from ..io.atomic import write_atomic
from ..io.paths import confined_name

__all__ = ["save_task_dataset", "load_task_dataset", "register_classnames_and_templates", "read_classes"]

CLASSES_FILE = "classes.json"


def register_classnames_and_templates(name: str, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Register a task with FusionBench's ``CLIPTemplateFactory``.

    ``templates`` are format strings with one ``{}`` for the class name. FusionBench 0.2.33's own
    ``register_dataset`` stores the templates under a misspelt key, so the mapping is written directly.
    """
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"task '{name}': template {t!r} must contain exactly one '{{}}'")
    CLIPTemplateFactory._dataset_mapping[name] = {
        "classnames": list(classnames),
        "templates": [t.format for t in templates],
    }


def read_classes(task_dir: os.PathLike) -> dict:
    path = Path(task_dir) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CLASSES_FILE} in task directory {task_dir}")
    return json.loads(path.read_text(encoding="utf-8"))


def save_task_dataset(
    root: os.PathLike,
    task: str,
    splits: dict,
    classnames: Sequence[str],
    templates: Sequence[str],
) -> Path:
    """Write a task: ``splits`` maps a split name to ``(images, labels)`` (PIL images, ints).

    ``task`` and the split names must be plain names (they become ``<root>/<task>/<split>.parquet``).
    """
    from datasets import ClassLabel, Dataset, Features, Image

    task_dir = Path(root) / confined_name(task, "task name")
    for split in splits:
        confined_name(split, f"task '{task}': split name")
    task_dir.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "label": ClassLabel(names=list(classnames))})
    for split, (images, labels) in splits.items():
        ds = Dataset.from_dict({"image": list(images), "label": [int(y) for y in labels]}, features=features)
        write_atomic(task_dir / f"{split}.parquet", lambda p: ds.to_parquet(str(p)))
    classes = {"classnames": list(classnames), "templates": list(templates)}
    write_atomic(task_dir / CLASSES_FILE, lambda p: p.write_text(json.dumps(classes, indent=1)))
    return task_dir


def load_task_dataset(root: str, task: str, split: str = "test", name: Optional[str] = None):
    """Load one split of a local task as a ``datasets.Dataset`` and register its class names.

    Args:
        root: directory holding the task directories.
        task: the task's directory name.
        split: ``train``, ``validation`` or ``test``.
        name: the name the task pool evaluates the task by (its key in ``test_datasets``);
            defaults to ``task``.
    """
    from datasets import Dataset

    task_dir = Path(root) / confined_name(task, "task name")
    path = task_dir / f"{confined_name(split, f'task {task!r}: split name')}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"task '{task}': no split '{split}' at {path}")
    classes = read_classes(task_dir)
    register_classnames_and_templates(name or task, classes["classnames"], classes["templates"])
    return Dataset.from_parquet(str(path), keep_in_memory=True)
