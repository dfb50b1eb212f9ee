"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["write_atomic", "write_dir_atomic"]


def write_atomic(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_dir_atomic(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a new temporary directory next to ``path``, then rename it into place.

    A reader sees the old directory or the complete new one, never a partial one: an existing ``path``
    is first renamed aside (and deleted after the new one is in place); if ``write`` fails, the
    temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    old = path.with_name(f".{path.name}.{tag}.old")
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def expand_log_dir(path: str, log_dir: Optional[str], option: str = "save_path") -> str:
    """Replace ``{log_dir}`` in an output path option by the run's log directory (FusionBench's convention)."""
    if "{log_dir}" in path:
        if log_dir is None:
            raise ValueError(f"option '{option}'={path!r} uses {{log_dir}} but this run has no log dir")
        path = path.format(log_dir=log_dir)
    return path
