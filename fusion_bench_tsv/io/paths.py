"""Paths built from names found in configs and index files, confined to their directory; local vs hub names."""

from __future__ import annotations

import ntpath
import os
import posixpath
from pathlib import Path
from typing import Union

__all__ = ["confined_name", "confined_path", "looks_like_local_path"]


def confined_path(root: Union[str, os.PathLike], relative: str, what: str) -> Path:
    """``root / relative`` where ``relative`` is a relative path that stays inside ``root``.

    An absolute path, a drive (``C:``), a ``..`` component or an empty name is refused with a
    ``ValueError`` naming ``what`` (e.g. ``"entry 'x' of weight_map in /ckpt/model.safetensors.index.json"``).
    The check is on the name only: symbolic links inside ``root`` (as in the Hugging Face cache) are the
    directory owner's choice and are followed.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what}: {relative!r} is not a file name")
    parts = relative.replace("\\", "/").split("/")
    if (
        posixpath.isabs(relative)
        or ntpath.isabs(relative)
        or ntpath.splitdrive(relative)[0]
        or ".." in parts
        or "\0" in relative
    ):
        raise ValueError(f"{what}: {relative!r} points outside {root}; only names inside that directory are allowed")
    return Path(root, *[p for p in parts if p not in ("", ".")])


def confined_name(name: str, what: str) -> str:
    """``name`` when it is a single file or directory name (no separator, not ``.`` or ``..``), else a ``ValueError``."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(s in name for s in ("/", "\\", "\0")):
        raise ValueError(f"{what} {name!r} must be a plain name (no '/', '\\', '..'): it is used as a file or directory name")
    return name


def looks_like_local_path(entry: str) -> bool:
    """Whether a model entry is meant as a local path rather than a hub id (``org/name`` or ``name``).

    Local: an existing path; an absolute path; one starting with ``.`` or ``~``; one with a backslash or a
    drive; one with more than one ``/`` (hub ids have at most one).
    """
    if os.path.exists(entry):
        return True
    return (
        os.path.isabs(entry)
        or entry.startswith((".", "~"))
        or "\\" in entry
        or bool(ntpath.splitdrive(entry)[0])
        or entry.count("/") > 1
    )

