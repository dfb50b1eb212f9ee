"""The output directory of TSV-M, TSV-C and STI (option ``save_path``) and the one rule for replacing it.

**The rule.** ``save_path`` may name a new path, an empty directory, or an earlier output of the same method
whose files are all unchanged since this package wrote them there; never an input of the run, the working
directory or one of its ancestors; anything else is refused before anything is computed, with the reason.

An output is one directory written as a whole (:func:`~.atomic.write_dir_atomic`) with a marker file,
:data:`MARKER`, recording the method, the directory it was written to, the run that wrote it and every file
with its size and SHA-256. :func:`output_dir` resolves ``save_path`` (``{log_dir}`` and ``~`` expanded,
symbolic links followed; the run's log directory itself becomes a subdirectory of it, so the run's
``cli.log`` and Hydra files are never touched), applies the rule and checks that the target's parent exists
or can be created and is writable. The check reads the marker, lists only the directories the marker names
(stopping at the first entries it does not list) and hashes the files it lists: its time is proportional to
the output, never to the tree at ``save_path``; a directory without a marker is refused after reading at
most :data:`_SCAN_BUDGET` of its entries. :func:`write_output_dir` applies the rule again right before the
replacing rename, and refuses when another run wrote the target since this run checked it (its output is
then kept beside the target, and the error names the other run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .atomic import expand_log_dir, write_dir_atomic

__all__ = ["MARKER", "OutputRefusedError", "file_sha256", "output_dir", "replace_refusal", "write_output_dir"]

log = logging.getLogger(__name__)

MARKER = ".fusion_bench_tsv_output.json"
"""Marker of a directory written by this package: ``{"written_by": "fusion_bench_tsv", "format": 2,
"method", "path", "run": {"id", "host", "pid", "written"}, "files": {relative path: {"bytes", "sha256"}}}``."""

_FORMAT = 2
_LISTED = 5  # entries named in a refusal
_SCAN_BUDGET = 1000  # entries of a directory without a marker read to name what is in it
_CHUNK = 1 << 20
_RUN_ID = uuid.uuid4().hex  # this process


class OutputRefusedError(FileExistsError):
    """``save_path`` names something the replacement rule protects (see the module's docstring)."""


@dataclass(frozen=True)
class _State:
    """What was at the target when this run checked it: nothing (``run`` None) or the output of run ``run``."""

    run: Optional[str]
    who: str = ""


_CHECKED: Dict[str, _State] = {}  # target -> its state at this process's last check (output_dir)


def file_sha256(path: Path) -> str:
    """SHA-256 of the file at ``path``, read in chunks (``hashlib.file_digest`` needs Python 3.11; we support 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(root: Path) -> Optional[dict]:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "fusion_bench_tsv" else None


def _who(marker: Mapping) -> str:
    run = marker.get("run") if isinstance(marker.get("run"), Mapping) else {}
    return (f"{marker.get('method', '?')} run {str(run.get('id', '?'))[:8]} (pid {run.get('pid', '?')} on "
            f"{run.get('host', '?')}, written {run.get('written', '?')})")


def _some_entries(root: Path) -> List[str]:
    """Up to :data:`_LISTED` + 1 files or empty directories under ``root`` (relative), reading at most
    :data:`_SCAN_BUDGET` entries; ``"..."`` last when directories were left unread."""
    found, budget, stack, stopped = [], _SCAN_BUDGET, [Path(".")], False
    while stack and not stopped:
        rel = stack.pop()
        try:
            with os.scandir(root / rel) as it:
                empty = True
                for entry in it:
                    empty, budget = False, budget - 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(rel / entry.name)
                    else:
                        found.append((rel / entry.name).as_posix())
                    stopped = len(found) > _LISTED or budget <= 0
                    if stopped:
                        break
        except OSError:
            found.append(rel.as_posix() + "/")
            continue
        if empty and rel != Path("."):
            found.append(rel.as_posix() + "/")
    return sorted(found) + (["..."] if stack or budget <= 0 else [])


def _marker_files(marker: Mapping) -> Optional[Dict[str, Mapping]]:
    files = marker.get("files")
    if marker.get("format") != _FORMAT or not isinstance(files, Mapping):
        return None
    if not all(isinstance(k, str) and isinstance(v, Mapping) and isinstance(v.get("bytes"), int)
               and isinstance(v.get("sha256"), str) for k, v in files.items()):
        return None
    return dict(files)


def _foreign_in_listed_dirs(root: Path, files: Iterable[str]) -> List[str]:
    """Entries of the directories the marker's ``files`` lie in that the marker does not list (stopping after
    :data:`_LISTED` + 1), or the listed directories that are not plain directories."""
    children: Dict[str, set] = {"": {MARKER}}
    for name in files:
        parts = name.split("/")
        for i in range(len(parts)):
            children.setdefault("/".join(parts[:i]), set()).add(parts[i])
            if i < len(parts) - 1:
                children.setdefault("/".join(parts[: i + 1]), set())
    foreign: List[str] = []
    for rel, names in children.items():
        where = root / rel if rel else root
        if rel and not os.path.lexists(where):
            continue  # its files are reported missing by _changed_files
        if rel and (not where.is_dir() or where.is_symlink()):
            return [rel + "/"]
        with os.scandir(where) as it:
            for entry in it:
                if entry.name not in names:
                    name = (f"{rel}/{entry.name}" if rel else entry.name) + ("/" if entry.is_dir(follow_symlinks=False) else "")
                    foreign.append(name)
                    if len(foreign) > _LISTED:
                        return foreign
    return foreign


def _changed_files(root: Path, files: Mapping[str, Mapping]) -> List[str]:
    """The marker's files that are missing, not regular files, or differ in size or SHA-256 (sizes first)."""
    changed, to_hash = [], []
    for name, meta in files.items():
        try:
            st = os.lstat(root / name)
        except OSError:
            changed.append(f"{name} (missing)")
            continue
        if not stat.S_ISREG(st.st_mode):
            changed.append(f"{name} (not a regular file)")
        elif st.st_size != meta["bytes"]:
            changed.append(f"{name} (size changed)")
        else:
            to_hash.append(name)
    if changed:
        return changed
    return [f"{name} (content changed)" for name in to_hash if file_sha256(root / name) != files[name]["sha256"]]


def _shown(entries: Sequence[str]) -> str:
    more = len(entries) > _LISTED or (entries and entries[-1] == "...")
    listed = [e for e in entries if e != "..."][:_LISTED]
    return ", ".join(listed) + (", and more" if more else "")


def replace_refusal(path: Union[str, os.PathLike], owner: str) -> Optional[str]:
    """Why the existing ``path`` may not be replaced by an output of method ``owner``, or None when it may
    (nothing there, an empty directory, or ``owner``'s unchanged output written to ``path``)."""
    return _check(Path(path), owner)[0]


def _check(path: Path, owner: str) -> Tuple[Optional[str], _State]:
    """:func:`replace_refusal`'s reason, and what is at ``path`` when it may be replaced, from one reading of
    its marker."""
    marker = _read_marker(path)  # None when there is no directory or no valid marker
    try:
        reason = _replace_refusal(path, owner, marker)
    except OSError as e:  # e.g. a directory this user may not read: nothing is known to be replaceable
        return f"cannot be read ({e.strerror or e})", _State(None)
    run = marker.get("run") if marker is not None and reason is None else None
    return reason, (_State(str(run.get("id")), _who(marker)) if isinstance(run, Mapping) else _State(None))


def _replace_refusal(path: Path, owner: str, marker: Optional[dict]) -> Optional[str]:
    if not os.path.lexists(path):
        return None
    if not path.is_dir() or path.is_symlink():
        return "exists and is not a directory"
    with os.scandir(path) as it:
        if next(it, None) is None:
            return None
    if marker is None:
        return f"is a directory holding files {owner} did not write ({_shown(_some_entries(path))})"
    if marker.get("method") != owner:
        return f"is the output of {_who(marker)}, not of {owner}: one method never replaces another's output"
    files = _marker_files(marker)
    if files is None:
        return ("is an output of an earlier fusion_bench_tsv whose marker records no content digests: whether "
                "its files were edited cannot be told")
    if marker.get("path") != str(path):
        return f"is an output written to {marker.get('path')}, then moved or copied here"
    outside = [name for name in files if name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/"))]
    if outside:
        return f"holds a marker naming files that are not plain paths inside it ({_shown(outside)})"
    foreign = _foreign_in_listed_dirs(path, files)
    if foreign:
        return f"is a directory holding files {owner} did not write ({_shown(foreign)})"
    changed = _changed_files(path, files)
    if changed:
        return f"holds files changed since {owner} wrote them ({_shown(changed)})"
    return None


def _refuse(path: Path, reason: str, owner: str, option: str, value: str, default_name: str,
            movable: bool = True) -> None:
    """``movable``: whether moving the directory away is a fix (not for an input, the working directory or the
    log directory's ancestors)."""
    raise OutputRefusedError(
        f"{owner}: option '{option}'={value!r}: {path} {reason}; nothing there is deleted or replaced. "
        f"Give a new or empty directory (e.g. {option}='{{log_dir}}/{default_name}')"
        + (", or move that one away" if movable else "")
    )


def _expand_user(save_path: str, owner: str, option: str) -> str:
    """``~`` and ``~user`` expanded as a shell does; a component that still starts with ``~`` is refused."""
    expanded = os.path.expanduser(save_path)
    literal = [part for part in Path(expanded).parts if part.startswith("~")]
    if literal:
        raise ValueError(
            f"{owner}: option '{option}'={save_path!r}: '{literal[0]}' would be a directory literally named "
            f"'{literal[0]}' (only a leading '~' or '~user' is expanded, to a home directory that exists); "
            "write the full path"
        )
    return expanded


def _within(path: Path, other: Path) -> bool:
    return path == other or path in other.parents or other in path.parents


def _check_parent(path: Path, owner: str, option: str, value: str) -> None:
    """The nearest existing ancestor of ``path``'s parent is a directory in which a file can be created."""
    ancestor = path.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(
            f"{owner}: option '{option}'={value!r}: {ancestor} is not a directory, so {path} cannot be created; "
            "give a path inside a directory"
        )
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise PermissionError(
            e.errno, f"{owner}: option '{option}'={value!r}: cannot write in {ancestor} ({e.strerror}), checked "
            f"before anything is computed; give a save_path in a writable directory"
        ) from None


def output_dir(
    save_path: str,
    log_dir: Optional[str],
    default_name: str,
    owner: str,
    option: str = "save_path",
    inputs: Sequence[Union[str, os.PathLike]] = (),
    record: bool = True,
) -> Path:
    """The directory ``save_path`` names, checked against the rule of the module's docstring.

    ``{log_dir}`` is the run's log directory; the log directory itself (given either way) means
    ``<log_dir>/<default_name>``. ``~`` is expanded (:func:`os.path.expanduser`); symbolic links are followed
    (the link stays). ``inputs`` are the run's input paths (:func:`~.modelpool.pool_input_paths`): the target
    may be none of them, inside none and hold none. With ``record``, what is there now is what
    :func:`write_output_dir` compares with before replacing it (a second check within one run passes False).
    Raises :class:`OutputRefusedError` (a ``FileExistsError``)
    naming the option, the path and the reason, ``ValueError`` for a literal ``~``, ``PermissionError`` or
    ``NotADirectoryError`` when the target's parent cannot be written.
    """
    expanded = _expand_user(expand_log_dir(save_path, log_dir, option), owner, option)
    path = Path(os.path.realpath(expanded))
    if log_dir is not None and path == Path(os.path.realpath(log_dir)):
        path = path / default_name
        log.info(f"{owner}: option '{option}'={save_path!r} is the run's log directory: writing into {path}")

    def refuse(reason: str, movable: bool = True) -> None:
        _refuse(path, reason, owner, option, save_path, default_name, movable)

    cwd = Path(os.path.realpath(os.getcwd()))
    if path == cwd or path in cwd.parents:
        refuse("is the working directory" + (" or one of its ancestors" if path != cwd else ""), movable=False)
    if log_dir is not None and path in Path(os.path.realpath(log_dir)).parents:
        refuse("holds the run's log directory", movable=False)
    for given in inputs:
        source = Path(os.path.realpath(given))
        if _within(path, source):
            where = "is" if path == source else "holds" if path in source.parents else "is inside"
            refuse(f"{where} an input of this run ({given})", movable=False)
    reason, found = _check(path, owner)
    if reason is not None:
        refuse(reason)
    _check_parent(path, owner, option, save_path)
    if record:
        _CHECKED[str(path)] = found
    return path


def _marker_record(tmp: Path, target: Path, owner: str, hashed: Mapping[str, str]) -> dict:
    """``hashed``: SHA-256 of files the writer already computed, by relative path (not read again)."""
    files = {}
    for current, dirs, names in os.walk(tmp):  # our own new directory: walked once, to list and hash it
        rel = Path(current).relative_to(tmp)
        for n in names:
            name = (rel / n).as_posix()
            files[name] = {"bytes": os.lstat(Path(current, n)).st_size,
                           "sha256": hashed.get(name) or file_sha256(Path(current, n))}
    run = {"id": _RUN_ID, "host": socket.gethostname(), "pid": os.getpid(),
           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {"written_by": "fusion_bench_tsv", "format": _FORMAT, "method": owner, "path": str(target),
            "run": run, "files": files}


def write_output_dir(
    path: Union[str, os.PathLike], write: Callable[[Path], Optional[Mapping[str, str]]], owner: str,
    option: str = "save_path"
) -> Path:
    """``write(tmp)`` into a new directory, add :data:`MARKER`, and move it to ``path`` atomically. ``write``
    may return the SHA-256 of files it hashed itself (``{relative path: hex digest}``): the marker takes them.

    Right before the move ``path`` is checked again (:func:`replace_refusal`), and compared with what
    :func:`output_dir` found there: when another run has written it since, nothing is replaced, this run's
    directory is kept as ``<path>.run-<id>`` and an :class:`OutputRefusedError` names the other run. A failed
    write (e.g. a full disk) raises an ``OSError`` naming ``path``, which is then unchanged.
    """
    path = Path(os.path.realpath(path))
    checked = _CHECKED.pop(str(path), None)
    written: List[Path] = []

    def marked(tmp: Path) -> None:
        written.append(tmp)
        hashed = write(tmp)  # a writer may return anything else (e.g. write_text's count): only a mapping counts
        record = _marker_record(tmp, path, owner, hashed if isinstance(hashed, Mapping) else {})
        (tmp / MARKER).write_text(json.dumps(record, indent=1))

    def still_free(target: Path) -> None:
        reason, now = _check(target, owner)
        if reason is not None:
            _refuse(target, reason + " (found right before replacing it)", owner, option, str(path), path.name)
        if checked is not None and now.run is not None and now.run != checked.run:
            kept = target.with_name(f"{target.name}.run-{_RUN_ID[:8]}")
            os.rename(written[0], kept)
            raise OutputRefusedError(
                f"{owner}: option '{option}'={str(path)!r}: {target} was written by another run, {now.who}, while "
                f"this run computed; nothing was replaced: this run's output is at {kept}. Give each run its own "
                f"{option}"
            )

    try:
        return write_dir_atomic(path, marked, before_replace=still_free)
    except OutputRefusedError:
        raise
    except OSError as e:
        message = f"{owner}: writing option '{option}' to {path} failed ({e.strerror or e}); {path} is unchanged"
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
