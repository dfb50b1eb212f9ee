"""Atomic writes: leftovers of killed writes are removed, data is synced before the rename, an existing
directory is replaced (and restored when the replacement fails), and outputs follow the umask."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fusion_bench_tsv.io.atomic import write_dir_atomic
import torch

from support import REPO_ROOT

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
DAY = 24 * 3600


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float) -> None:
    """Set the modification time of ``path`` and everything in it ``seconds`` in the past."""
    when = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (when, when))


def test_later_write_removes_abandoned_temporaries_and_nothing_else(tmp_path):
    from fusion_bench_tsv.io.atomic import write_dir_atomic

    target = tmp_path / "out"
    hexes = iter(uuid.uuid4().hex for _ in range(20))
    stale = {
        f".out.{HOST}-{_dead_pid()}.{next(hexes)}.tmp": "dir",  # this host, process gone
        f".out.{HOST}-{_dead_pid()}.{next(hexes)}.old": "dir",
        f".out.{next(hexes)}.tmp": "old file",  # no process id: by age
        ".out.tmp-ab_12x9z": "old dir",
    }
    kept = {
        f".out.{HOST}-{os.getpid()}.{next(hexes)}.tmp": "dir",  # a live process (this one) may still write it
        f".out.0badc0de-{_dead_pid()}.{next(hexes)}.tmp": "dir",  # another host, changed recently
        f".out.{next(hexes)}.tmp": "file",  # no process id, changed recently
        f".other.{HOST}-{_dead_pid()}.{next(hexes)}.tmp": "dir",  # another target
        ".out.tmp": "file",  # not our pattern
        "out.backup": "file",
    }
    for name, kind in {**stale, **kept}.items():
        path = tmp_path / name
        if "dir" in kind:
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"partial")
        else:
            path.write_bytes(b"partial")
        if kind.startswith("old"):
            _age(path, 2 * DAY)
    write_dir_atomic(target, lambda tmp: (tmp / "a.txt").write_text("new"))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out", *kept}, f"left: {sorted(left)}"
    assert (target / "a.txt").read_text() == "new"


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from fusion_bench_tsv.io.atomic import {function} as write

def slow(tmp):
    target = tmp / "weights.bin" if tmp.is_dir() else tmp
    target.write_bytes(b"x" * 1000)
    Path(sys.argv[2]).write_text("ready")
    time.sleep(600)

write(Path(sys.argv[1]), slow)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_write_killed_midway_leaves_nothing_after_the_next_write(tmp_path, kind):
    from fusion_bench_tsv.io.atomic import write_atomic, write_dir_atomic

    target, ready = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}.ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER.format(function="write_dir_atomic" if kind == "dir" else "write_atomic"), str(target), str(ready)], env=env)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "the writer did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")], "the killed write left no temporary"
    if kind == "dir":
        write_dir_atomic(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"done"))
        assert (target / "weights.bin").read_bytes() == b"done"
    else:
        write_atomic(target, lambda tmp: tmp.write_bytes(b"done"))
        assert target.read_bytes() == b"done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_and_directories_synced_before_the_rename(tmp_path, monkeypatch):
    import fusion_bench_tsv.io.atomic as atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "ckpt"

    def write(tmp):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
        (tmp / "a.json").write_text("{}")

    atomic.write_dir_atomic(target, write)
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target)]
    assert renames, events
    tmp = Path(events[renames[0]][1])
    synced_before = {e[1] for e in events[: renames[0]] if e[0] == "fsync"}
    expected = {str(tmp / "a.json"), str(tmp / "sub" / "b.bin"), str(tmp / "sub"), str(tmp)}
    assert expected <= synced_before, f"not synced before the rename: {expected - synced_before}"
    assert ("fsync", str(tmp_path)) in events[renames[0]:], "the parent directory is not synced after the rename"

    events.clear()
    atomic.write_atomic(tmp_path / "report.json", lambda p: p.write_text("{}"))
    (rename,) = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert ("fsync", events[rename][1]) in events[:rename] and ("fsync", str(tmp_path)) in events[rename:], events


def test_replacing_a_directory_replaces_and_restores_on_failure(tmp_path, monkeypatch):
    import fusion_bench_tsv.io.atomic as atomic

    target = tmp_path / "merged"
    atomic.write_dir_atomic(target, lambda tmp: (tmp / "v").write_text("1"))
    atomic.write_dir_atomic(target, lambda tmp: (tmp / "v").write_text("2"))
    assert (target / "v").read_text() == "2"
    real_replace, calls = os.replace, []

    def failing_second_rename(src, dst, **kw):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="disk gone"):
        atomic.write_dir_atomic(target, lambda tmp: (tmp / "v").write_text("3"))
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ------------------------------------------------------------------------------------------- umask
def _wrong_modes(root: Path, umask: int) -> dict:
    """Paths under ``root`` (itself included) whose mode is not what the umask gives: directories
    0777 & ~umask, files 0666 & ~umask."""
    wrong = {}
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        if mode != expected:
            wrong[str(path.relative_to(root.parent))] = f"{mode:o} (expected {expected:o})"
    return wrong


@pytest.fixture()
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True)
def test_outputs_follow_the_umask(tmp_path, umask):
    """TSV-C's checkpoint, TSV-M's saved model and STI's files get the modes the umask gives
    (safetensors itself creates its files 0600)."""
    from fusion_bench import BaseModelPool
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm, TSVMergeAlgorithm
    from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    base = CLIPVisionModel(config).eval()
    models = {"_pretrained_": base}
    for i in range(2):
        models[f"t{i}"] = CLIPVisionModel(config).eval()
        models[f"t{i}"].load_state_dict(synthetic_task_state(base.state_dict(), seed=i + 1))
    TSVCompressAlgorithm(show_pbar=False, device="cpu", routed_eval=False, save_path=str(tmp_path / "tsv_c")).run(dict(models))
    TSVMergeAlgorithm(show_pbar=False, save_path=str(tmp_path / "merged")).run(BaseModelPool(dict(models)))
    STIAnalysis(show_pbar=False, device="cpu", save_path=str(tmp_path / "sti")).run(dict(models))
    wrong = {k: v for out in ("tsv_c", "merged", "sti") for k, v in _wrong_modes(tmp_path / out, umask).items()}
    assert not wrong, f"umask {umask:03o}: {wrong}"


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True)
def test_benchmark_build_follows_the_umask(tmp_path, umask):
    """Everything ``fusion-bench-tsv-build`` writes (a one-task build of a few steps), open_clip export included."""
    from fusion_bench_tsv.benchmark.build import BuildSettings, build_benchmark

    settings = BuildSettings(pretrain_steps=2, pretrain_batch=8, finetune_steps=2, finetune_batch=8, train_size=8,
                             val_size=4, test_size=4)
    out = build_benchmark(1, tmp_path, settings, show_pbar=False)
    assert (out / "openclip" / "zeroshot.safetensors").is_file() and (out / "build.json").is_file()
    wrong = _wrong_modes(out, umask)
    assert not wrong, f"umask {umask:03o}: {wrong}"
def test_write_dir_atomic_keeps_old_directory_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")

    def fail(tmp):
        (tmp / "a").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomic(target, fail)
    assert (target / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
