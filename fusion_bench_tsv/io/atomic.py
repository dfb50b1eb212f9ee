"""Atomic, durable writes: a reader sees the old file (or directory) or the complete new one, never part of one.

:func:`write_atomic` (a file) and :func:`write_dir_atomic` (a directory) let a callback write a temporary
beside the target, flush it to disk (``fsync`` of every file and directory written), and move it into
place with one rename; the parent directory is then synced so that the rename itself survives a crash.
Before that, every file and directory written gets the permissions the umask gives (files
``0666 & ~umask``, or ``0777 & ~umask`` when executable; directories ``0777 & ~umask``), whatever the
writing library chose: ``safetensors`` (0.8) creates its files ``0600``.

An existing directory is replaced by two renames (the old one aside, the new one in; the old one then
deleted): between them the target does not exist for an instant, and a crash there leaves the old content
under its temporary name (removed by the next write, see below); a reader never sees a partial directory.

Temporaries are named ``.<target>.<host>-<pid>.<32 hex>.tmp`` (``.old`` for a directory renamed aside),
``<host>`` being the first 8 hex digits of the SHA-256 of the host name. A write killed before its
rename leaves one behind; every later write to the same target removes the leftovers of that target
(:func:`remove_stale_temporaries`): those of this host whose process no longer runs, and those of other
hosts (a shared file system, where a process id means nothing here) or of an unknown process (names of
the form ``.<target>.<32 hex>.tmp|old`` and ``.<target>.tmp-XXXXXXXX`` / ``.<target>.old-XXXXXXXX``)
once nothing in them has changed for :data:`STALE_AFTER_S` seconds. Writes through this module only
ever write files (never compute in between), so a live writer modifies its temporary far more often.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

__all__ = ["STALE_AFTER_S", "current_umask", "expand_log_dir", "remove_stale_temporaries", "write_atomic", "write_dir_atomic"]

log = logging.getLogger(__name__)

STALE_AFTER_S = 600.0
"""Seconds without any change after which a temporary that cannot be traced to a dead process of this host
(another host's, or one without a process id) counts as abandoned."""

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temporary(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{uuid.uuid4().hex}.{kind}")


def _temporary_pattern(name: str) -> "re.Pattern[str]":
    """Our temporaries of target ``name``: ``host``/``pid`` groups set for names made by :func:`_temporary`."""
    n = re.escape(name)
    return re.compile(
        rf"^\.{n}\.(?:(?P<host>[0-9a-f]{{8}})-(?P<pid>[0-9]+)\.)?[0-9a-f]{{32}}\.(?:tmp|old)$"
        rf"|^\.{n}\.(?:tmp|old)-[a-z0-9_]{{8}}$"
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True
    return True


def _last_change(path: Path) -> float:
    """The newest modification time of ``path`` and, for a directory, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for entry in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
                except FileNotFoundError:
                    pass
    return newest


def _is_stale(match: "re.Match[str]", path: Path, now: float) -> bool:
    if match.group("host") == _HOST:
        return not _process_alive(int(match.group("pid")))
    return now - _last_change(path) > STALE_AFTER_S


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_temporaries(path: Union[str, os.PathLike]) -> List[Path]:
    """Delete abandoned temporaries of the target ``path`` (see the module's docstring) and return them.

    Only names of this module's temporaries *of this target* are considered; anything else in the
    directory is left alone. A temporary that disappears meanwhile (another writer cleaning up) is skipped.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern, now, removed = _temporary_pattern(path.name), time.time(), []
    for entry in os.scandir(path.parent):
        match = pattern.match(entry.name)
        if match is None:
            continue
        candidate = path.parent / entry.name
        try:
            if _is_stale(match, candidate, now):
                _remove(candidate)
                removed.append(candidate)
        except FileNotFoundError:
            continue
        except OSError as e:  # not ours to delete after all (permissions): leave it
            log.warning(f"could not remove the abandoned temporary {candidate}: {e}")
    if removed:
        log.info(f"removed {len(removed)} abandoned temporaries of {path}: {[p.name for p in removed]}")
    return removed


def current_umask() -> int:
    """The process's umask (from ``/proc/self/status`` where available, which does not change it)."""
    # not os.umask() alone: it reads the mask only by setting it, a race with threads creating files
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, and put it back at once
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk; directories where the OS cannot open them
    (Windows) are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _walk_bottom_up(root: Path) -> Iterator[tuple[Path, bool]]:
    """Every regular file and directory under ``root`` (and ``root``), children before their directory."""
    for current, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(current, name)
            if not file.is_symlink():
                yield file, False
        yield Path(current), True


def _finish(path: Path) -> None:
    """Give ``path`` and everything in it the permissions a plain ``open``/``mkdir`` would under the umask
    (files ``0666 & ~umask``, executables and directories ``0777 & ~umask``), and flush it all to disk."""
    mask = current_umask()
    for entry, is_dir in _walk_bottom_up(path) if path.is_dir() else [(path, False)]:
        executable = is_dir or bool(entry.stat().st_mode & 0o111)
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)
        _fsync(entry)


def write_atomic(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to create a temporary file beside ``path``, sync it and rename it into place.

    An existing ``path`` is replaced in one atomic rename; if ``write`` fails, the temporary is removed and
    ``path`` is untouched. Abandoned temporaries of ``path`` are removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path, "tmp")
    try:
        write(tmp)
        _finish(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def write_dir_atomic(
    path: Union[str, os.PathLike],
    write: Callable[[Path], None],
    before_replace: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Call ``write(tmp)`` on a new temporary directory beside ``path``, sync it and move it into place.

    A reader sees the old directory or the complete new one: an existing ``path`` is renamed aside, the new
    directory renamed into place and the old one deleted (restored if the second rename fails). If ``write``
    fails, the temporary directory is removed and ``path`` is untouched. ``before_replace(path)``, when
    given, runs right before the move and may refuse it by raising (the temporary is removed, ``path``
    untouched). Abandoned temporaries of ``path`` are removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp, old = _temporary(path, "tmp"), _temporary(path, "old")
    tmp.mkdir()
    try:
        write(tmp)
        _finish(tmp)
        if before_replace is not None:
            before_replace(path)
        if os.path.lexists(path):
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(old):
                os.replace(old, path)
            raise
        _fsync(path.parent)
    finally:
        for leftover in (tmp, old):
            if os.path.lexists(leftover):
                _remove(leftover)
    return path


def expand_log_dir(path: str, log_dir: Optional[str], option: str = "save_path") -> str:
    """Replace ``{log_dir}`` in an output path option by the run's log directory (FusionBench's convention)."""
    if "{log_dir}" in path:
        if log_dir is None:
            raise ValueError(f"option '{option}'={path!r} uses {{log_dir}} but this run has no log dir")
        path = path.format(log_dir=log_dir)
    return path
