"""The output directory of TSV-M, TSV-C and STI (option ``save_path``): never anything this package did not write.

An output is one directory written as a whole (:func:`~.atomic.write_dir_atomic`) with a marker file,
:data:`MARKER`, listing the files written. :func:`output_dir` resolves ``save_path`` (``{log_dir}``
expanded; the run's log directory itself becomes a subdirectory of it, so the run's ``cli.log``,
``config.yaml``, ``hydra.yaml``, ``overrides.yaml`` are never touched) and refuses, before anything is
computed, a path that exists and is not replaceable: a file, or a directory that is neither empty nor
one this package wrote and that holds only what it wrote. :func:`write_output_dir` checks again right
before replacing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Union

from .atomic import expand_log_dir, write_dir_atomic

__all__ = ["MARKER", "foreign_entries", "output_dir", "write_output_dir"]

log = logging.getLogger(__name__)

MARKER = ".fusion_bench_tsv_output.json"
"""Marker of a directory written by this package: ``{"written_by": "fusion-bench", "method", "files"}``."""


def _relative_entries(root: Path) -> tuple[List[str], List[str]]:
    """Files (and links) and directories under ``root``, relative, not following links."""
    files, dirs = [], []
    for current, subdirs, names in os.walk(root):
        rel = Path(current).relative_to(root)
        for d in list(subdirs):
            if os.path.islink(Path(current, d)):  # a link is an entry, never walked into
                subdirs.remove(d)
                names.append(d)
            else:
                dirs.append((rel / d).as_posix())
        files += [(rel / n).as_posix() for n in names]
    return sorted(files), sorted(dirs)


def _written_files(root: Path) -> Optional[List[str]]:
    """The files the marker of ``root`` lists, or None when ``root`` has no valid marker."""
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != "fusion-bench":
        return None
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


def foreign_entries(path: Union[str, os.PathLike]) -> Optional[List[str]]:
    """What at ``path`` this package did not write: ``None`` when ``path`` does not exist, ``[]`` when it
    may be replaced (an empty directory, or one of ours holding only what its marker lists), else the
    entries (relative paths; ``["."]`` for a file or anything that is not a directory)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if not path.is_dir():
        return ["."]
    files, dirs = _relative_entries(path)
    if not files and not dirs:
        return []
    written = _written_files(path)
    if written is None:
        return files + [d + "/" for d in dirs if not any(f.startswith(d + "/") for f in files)]
    ours = set(written) | {MARKER}
    parents = {p.as_posix() for f in written for p in Path(f).parents}
    return [f for f in files if f not in ours] + [d + "/" for d in dirs if d not in parents]


def _refuse(path: Path, entries: List[str], owner: str, option: str, value: str, default_name: str) -> None:
    if entries == ["."]:
        what = "exists and is not a directory"
    else:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        what = f"is a directory holding files {owner} did not write ({shown})"
    raise FileExistsError(
        f"{owner}: option '{option}'={value!r}: {path} {what}; nothing there is deleted or replaced. "
        f"Give a new or empty directory (e.g. {option}='{{log_dir}}/{default_name}'), or move that one away"
    )


def output_dir(
    save_path: str, log_dir: Optional[str], default_name: str, owner: str, option: str = "save_path"
) -> Path:
    """The directory ``save_path`` names, checked to be writable without losing anything.

    ``{log_dir}`` is the run's log directory; the log directory itself (given either way) means
    ``<log_dir>/<default_name>``. A symbolic link is followed (the link stays). Raises ``FileExistsError``
    naming the option and what is in the way (see :func:`foreign_entries`).
    """
    path = Path(os.path.realpath(expand_log_dir(save_path, log_dir, option)))
    if log_dir is not None and path == Path(os.path.realpath(log_dir)):
        path = path / default_name
        log.info(f"{owner}: option '{option}'={save_path!r} is the run's log directory: writing into {path}")
    entries = foreign_entries(path)
    if entries:
        _refuse(path, entries, owner, option, save_path, default_name)
    return path


def write_output_dir(
    path: Union[str, os.PathLike], write: Callable[[Path], None], owner: str, option: str = "save_path"
) -> Path:
    """``write(tmp)`` into a new directory, add :data:`MARKER` listing its files, and move it to ``path``
    atomically; ``path`` is checked again (:func:`foreign_entries`) right before it is replaced."""
    path = Path(path)

    def marked(tmp: Path) -> None:
        write(tmp)
        files, _ = _relative_entries(tmp)
        record = {"written_by": "fusion-bench", "method": owner, "files": files}
        (tmp / MARKER).write_text(json.dumps(record, indent=1))

    def still_free(target: Path) -> None:
        entries = foreign_entries(target)
        if entries:
            _refuse(target, entries, owner, option, str(path), path.name)

    return write_dir_atomic(path, marked, before_replace=still_free)
