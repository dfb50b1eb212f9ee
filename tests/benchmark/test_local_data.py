"""benchmark/local_data.py: task datasets stay inside their root."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("task", ["../../x", "../x", "<absolute>", "a/b", "..", ""])
def test_task_datasets_stay_inside_their_root(tmp_path, task):
    from PIL import Image

    from fusion_bench_tsv.benchmark.local_data import load_task_dataset, save_task_dataset

    root = tmp_path / "a" / "b" / "root"
    task = str(tmp_path / "absolute") if task == "<absolute>" else task
    images = [Image.new("RGB", (4, 4))]
    with pytest.raises(ValueError, match=rf"task name {re.escape(repr(task))} must be a plain name"):
        save_task_dataset(root, task, {"test": (images, [0])}, ["c"], ["a {}."])
    with pytest.raises(ValueError, match="must be a plain name"):
        save_task_dataset(root, "ok", {"../test": (images, [0])}, ["c"], ["a {}."])
    with pytest.raises(ValueError, match=rf"task name {re.escape(repr(task))} must be a plain name"):
        load_task_dataset(str(root), task)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written
