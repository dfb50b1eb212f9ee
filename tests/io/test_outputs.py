"""The replacement rule of ``save_path`` (fusion_bench_tsv.io.outputs): only an unchanged output of the same
method is replaced; inputs of the run, the working directory and its ancestors, another method's output, edited
files, planted or copied markers are refused before anything is computed; the check reads what the marker lists,
not the tree; the rule is applied again right before the replacing rename; concurrent runs never silently discard
each other's output."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm, TSVMergeAlgorithm
from fusion_bench_tsv.io import outputs
from fusion_bench_tsv.io.outputs import MARKER, OutputRefusedError, output_dir, write_output_dir
from fusion_bench_tsv.methods import sti, tsv_merge

from methods.test_options import CLASSES, QUIET, make_pool, snapshot
from support import REPO_ROOT


def merge(save_path, pool=None, **options):
    return TSVMergeAlgorithm(**QUIET["TSV-M"], save_path=str(save_path), **options).run(pool or make_pool())


def no_fine_tuned_loaded(pool) -> bool:
    return [n for n in pool.loaded if n != "_pretrained_"] == []


def write_files(files: dict):
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return write


# ------------------------------------------------------------------------------ issue case 2: what is replaced
@pytest.fixture
def disk_pool(tmp_path):
    """The pool of test_options saved with save_pretrained: ``{name: directory}``."""
    root = tmp_path / "models"
    pool = make_pool()
    paths = {}
    for name in ["_pretrained_", *pool.model_names]:
        pool.load_model(name).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_earlier_output_used_as_an_input_of_the_run_is_refused(disk_pool, tmp_path):
    """A merged model of ours used as a task (or as _pretrained_) of the next run is an input: never replaced,
    though it holds our unchanged output."""
    from fusion_bench.modelpool import CLIPVisionModelPool

    merged = tmp_path / "merged"
    merge(merged, CLIPVisionModelPool(models=disk_pool))
    before = snapshot(merged)
    for role in ["task_0", "_pretrained_"]:
        models = {**disk_pool, role: str(merged)}
        with pytest.raises(OutputRefusedError, match=rf"{merged} is an input of this run \({merged}\)") as refused:
            merge(merged, CLIPVisionModelPool(models=models))
        assert "move that one away" not in str(refused.value)  # moving an input away would break the run
        assert snapshot(merged) == before
    link = tmp_path / "link_to_pretrained"
    link.symlink_to(disk_pool["_pretrained_"])
    with pytest.raises(OutputRefusedError, match=r"is an input of this run"):  # resolved through the link
        merge(link, CLIPVisionModelPool(models=disk_pool))
    for inside, how in [(Path(disk_pool["task_1"]) / "merged", "is inside"), (tmp_path / "models", "holds")]:
        with pytest.raises(OutputRefusedError, match=rf"{how} an input of this run"):
            merge(inside, CLIPVisionModelPool(models=disk_pool))


def test_another_methods_output_is_never_replaced(tmp_path):
    target = tmp_path / "out"
    merge(target)
    before = snapshot(target)
    pool = make_pool()
    with pytest.raises(OutputRefusedError, match=r"is the output of TSV-M run \w{8} \(pid \d+ on .*\), not of STI: "
                                                 r"one method never replaces another's output"):
        STIAnalysis(**QUIET["STI"], save_path=str(target)).run(pool)
    assert snapshot(target) == before and no_fine_tuned_loaded(pool)


@pytest.mark.parametrize("edit", ["append", "same size", "delete", "to a link"])
def test_files_edited_after_we_wrote_them_are_never_replaced(tmp_path, edit):
    """config.json edited (size kept or not, mtime restored), deleted, or replaced by a link: refused."""
    target = tmp_path / "out"
    merge(target)
    config = target / "config.json"
    st = config.stat()
    if edit == "append":
        config.write_text(config.read_text() + " ")
    elif edit == "same size":
        text = config.read_text()
        config.write_text(text.replace('"', "'", 1))
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert config.stat().st_size == st.st_size
    elif edit == "delete":
        config.unlink()
    else:
        (tmp_path / "mine.json").write_text(config.read_text())
        config.unlink()
        config.symlink_to(tmp_path / "mine.json")
    before = snapshot(target)
    pool = make_pool()
    with pytest.raises(OutputRefusedError, match=r"holds files changed since TSV-M wrote them \(config\.json \("):
        merge(target, pool)
    assert snapshot(target) == before and no_fine_tuned_loaded(pool)


@pytest.mark.parametrize("method, name", [("TSV-M", "config.json"), ("TSV-C", "tsv_c.safetensors"), ("STI", "sti.csv")])
def test_each_methods_edited_file_protects_its_output(method, name, tmp_path):
    """One character changed, size and mtime put back: the SHA-256 in the marker tells."""
    target = tmp_path / "out"
    CLASSES[method](**QUIET[method], save_path=str(target)).run(make_pool())
    edited = target / name
    st, data = edited.stat(), bytearray(edited.read_bytes())
    data[len(data) // 2] = ord("x") if data[len(data) // 2] != ord("x") else ord("y")
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(OutputRefusedError, match=rf"holds files changed since {method} wrote them \({name} "
                                                 r"\(content changed\)\)"):
        CLASSES[method](**QUIET[method], save_path=str(target)).run(make_pool())
    assert edited.read_bytes() == bytes(data)


@pytest.mark.parametrize("method", CLASSES)
def test_each_methods_unchanged_output_is_replaced(method, tmp_path):
    target = tmp_path / "out"
    for _ in range(2):
        CLASSES[method](**QUIET[method], save_path=str(target)).run(make_pool())
    marker = json.loads((target / MARKER).read_text())
    assert marker["method"] == method and marker["path"] == str(target) and marker["format"] == 2
    assert set(marker["files"]) == set(snapshot(target)) - {MARKER}


def test_planted_copied_or_old_markers_protect_nothing(tmp_path):
    """A marker the user planted in their directory (listing their files), an output of ours copied elsewhere,
    a marker of an earlier version (no digests): all refused."""
    target = tmp_path / "out"
    merge(target)
    marker = json.loads((target / MARKER).read_text())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own config")
    (mine / MARKER).write_text(json.dumps({**marker, "path": str(mine),
                                           "files": {"config.json": {"bytes": 13, "sha256": "0" * 64}}}))
    with pytest.raises(OutputRefusedError, match=r"holds files changed since TSV-M wrote them \(config.json "
                                                 r"\(content changed\)\)"):
        merge(mine)
    copy = tmp_path / "backup"
    subprocess.run(["cp", "-a", str(target), str(copy)], check=True)
    with pytest.raises(OutputRefusedError, match=rf"is an output written to {target}, then moved or copied here"):
        merge(copy)
    old = {k: v for k, v in marker.items() if k not in ("format",)} | {"files": sorted(marker["files"])}
    (target / MARKER).write_text(json.dumps(old))
    with pytest.raises(OutputRefusedError, match=r"records no content digests"):
        merge(target)
    assert (mine / "config.json").read_text() == "my own config"
    (tmp_path / "big").write_text("x" * 100)
    (mine / MARKER).write_text(json.dumps({**marker, "path": str(mine),
                                           "files": {"../big": {"bytes": 100, "sha256": "0" * 64}}}))
    with pytest.raises(OutputRefusedError, match=r"marker naming files that are not plain paths inside it \(\.\./big\)"):
        merge(mine)


@pytest.mark.parametrize("where", [".", "..", "/"])
def test_working_directory_and_its_ancestors_are_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "empty_work_dir"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    pool = make_pool()
    with pytest.raises(OutputRefusedError, match=r"is the working directory") as refused:
        merge(where, pool)
    assert "move that one away" not in str(refused.value)  # not a fix for the directory the process runs in
    assert work.is_dir() and list(work.iterdir()) == [] and no_fine_tuned_loaded(pool)


def test_log_dirs_ancestor_is_refused(tmp_path):
    log_dir = tmp_path / "outputs" / "run"
    log_dir.mkdir(parents=True)
    with pytest.raises(OutputRefusedError, match=r"holds the run's log directory") as refused:
        output_dir(str(tmp_path / "outputs"), str(log_dir), "merged", "TSV-M")
    assert "move that one away" not in str(refused.value)


def test_tilde_is_expanded_to_the_home_directory_and_a_literal_one_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    merge("~/merged")
    assert (tmp_path / "home" / "merged" / "config.json").is_file()
    assert not (tmp_path / "~").exists()
    for literal in ["out/~/x", "~no_such_user_h24/x"]:
        with pytest.raises(ValueError, match=r"would be a directory literally named '~"):
            output_dir(literal, None, "merged", "TSV-M")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ issue case 3: linear time, parent
class CountingScandir:
    """``os.scandir`` counting the entries it yields."""

    def __init__(self):
        self.entries, self.scandir = 0, os.scandir

    def __call__(self, path):
        counter = self

        class Wrapped:
            def __init__(self):
                self.it = counter.scandir(path)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.it.close()

            def __iter__(self):
                for entry in self.it:
                    counter.entries += 1
                    yield entry

            def __next__(self):
                counter.entries += 1
                return next(self.it)

        return Wrapped()


def _tree(root: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(files):
            (root / f"d{d}" / f"f{f}").touch()


def test_the_check_reads_what_the_marker_lists_not_the_tree(tmp_path, monkeypatch):
    """A 3,000-file tree without a marker, and our output with 3,000 foreign files added: the check reads a
    bounded number of directory entries (never os.walk)."""
    monkeypatch.setattr(outputs.os, "walk", lambda *a, **k: pytest.fail("the check walked the tree"))
    counting = CountingScandir()
    monkeypatch.setattr(outputs.os, "scandir", counting)
    _tree(tmp_path / "big", 30, 100)
    with pytest.raises(OutputRefusedError, match=r"did not write \(.*, and more\)"):
        output_dir(str(tmp_path / "big"), None, "merged", "TSV-M")
    assert counting.entries <= outputs._SCAN_BUDGET + 1, counting.entries
    monkeypatch.undo()
    target = tmp_path / "out"
    write_output_dir(target, write_files({"a.txt": "a", "sub/b.txt": "b"}), "TSV-M")
    _tree(target / "sub", 30, 100)
    counting = CountingScandir()
    monkeypatch.setattr(outputs.os, "walk", lambda *a, **k: pytest.fail("the check walked the tree"))
    monkeypatch.setattr(outputs.os, "scandir", counting)
    with pytest.raises(OutputRefusedError, match=r"did not write \(sub/d"):
        output_dir(str(target), None, "merged", "TSV-M")
    assert counting.entries <= 3 + 3 + outputs._LISTED, counting.entries  # root, sub, and the first foreign ones


def test_parent_that_cannot_hold_the_output_is_refused_before_the_computation(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    pool = make_pool()
    with pytest.raises(NotADirectoryError, match=rf"{tmp_path / 'a_file'} is not a directory"):
        merge(tmp_path / "a_file" / "sub" / "merged", pool)
    assert no_fine_tuned_loaded(pool)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", read_only)
    pool = make_pool()
    with pytest.raises(PermissionError, match=rf"cannot write in {tmp_path} \(Read-only file system\), checked before"):
        merge(tmp_path / "new" / "merged", pool)
    assert no_fine_tuned_loaded(pool) and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused_before_the_computation(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    pool = make_pool()
    with pytest.raises(PermissionError, match=r"cannot write in"):
        merge(parent / "merged", pool)
    assert no_fine_tuned_loaded(pool)


def test_failed_write_names_the_path_and_leaves_it_unchanged(tmp_path):
    target = tmp_path / "out"
    write_output_dir(target, write_files({"a.txt": "old"}), "TSV-M")

    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"TSV-M: writing option 'save_path' to {target} failed \(No space left on "
                                      rf"device\); {target} is unchanged"):
        write_output_dir(target, full, "TSV-M")
    assert (target / "a.txt").read_text() == "old"


# ------------------------------------------------------------------------------ the re-check before the rename
def test_user_file_created_between_check_and_write_survives(tmp_path):
    """Fails if the check right before the replacing rename is removed: the pre-check passed on an empty
    directory, then the user saved a file there."""
    target = tmp_path / "out"
    target.mkdir()
    output_dir(str(target), None, "merged", "TSV-M")
    (target / "notes.txt").write_text("written during the run")
    with pytest.raises(OutputRefusedError, match=r"did not write \(notes.txt\) \(found right before replacing it\)"):
        write_output_dir(target, write_files({"config.json": "{}"}), "TSV-M")
    assert (target / "notes.txt").read_text() == "written during the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a temporary was left behind"


def test_user_file_created_during_a_run_survives(tmp_path, monkeypatch):
    """The same through TSV-M: the file appears while the model is merged."""
    target = tmp_path / "out"
    merge(target)
    real = tsv_merge.merge_parameters

    def user_writes_meanwhile(*args, **kwargs):
        (target / "notes.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(tsv_merge, "merge_parameters", user_writes_meanwhile)
    with pytest.raises(OutputRefusedError, match=r"\(notes.txt\) \(found right before replacing it\)"):
        merge(target)
    assert (target / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ issue case 6: concurrent runs
OTHER_RUN = """
import sys
from pathlib import Path
from fusion_bench_tsv.io.outputs import write_output_dir
write_output_dir(sys.argv[1], lambda tmp: (Path(tmp) / "notes.json").write_text("the other run's"), sys.argv[2])
"""
DURING = {"TSV-M": (tsv_merge, "merge_parameters"), "TSV-C": (TSVCompressAlgorithm, "compress"),
          "STI": (sti, "summarize")}  # something each method calls between its check and its write


def other_run(target: Path, method: str) -> dict:
    """Another process writes ``method``'s output to ``target``; the run record of its marker."""
    subprocess.run([sys.executable, "-c", OTHER_RUN, str(target), method], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return json.loads((target / MARKER).read_text())["run"]


@pytest.mark.parametrize("method", CLASSES)
def test_concurrent_run_that_finishes_first_is_never_silently_replaced(method, tmp_path, monkeypatch):
    """Another process writes the same save_path while this run computes: this run refuses to replace it, names
    the other run, and keeps its own output beside it."""
    target = tmp_path / "out"
    owner, name = DURING[method]
    real, other = getattr(owner, name), {}

    def other_run_finishes_meanwhile(*args, **kwargs):
        other.update(other_run(target, method))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, other_run_finishes_meanwhile)
    with pytest.raises(OutputRefusedError) as info:
        CLASSES[method](**QUIET[method], save_path=str(target)).run(make_pool())
    message = str(info.value)
    assert f"{target} was written by another run, {method} run {other['id'][:8]} (pid {other['pid']}" in message
    kept = target.with_name(f"out.run-{outputs._RUN_ID[:8]}")
    assert f"this run's output is at {kept}" in message
    assert (target / "notes.json").read_text() == "the other run's"
    assert json.loads((kept / MARKER).read_text())["method"] == method


def test_sequential_runs_replace_their_own_output(tmp_path):
    """No false alarm: runs one after the other (same process or not) replace the unchanged output."""
    target = tmp_path / "out"
    other_run(target, "TSV-M")
    merge(target)
    merge(target)
    assert (target / "model.safetensors").is_file()
    assert set(json.loads((target / MARKER).read_text())["files"]) == set(snapshot(target)) - {MARKER}


def test_a_users_directory_is_refused_with_both_fixes(tmp_path):
    """A directory of the user's (not an input, not the working directory): a new path, or moving it away."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputRefusedError, match=r"Give a new or empty directory .*, or move that one away$"):
        output_dir(str(tmp_path / "mine"), None, "merged", "TSV-M")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
