"""Compatibility shims for the FusionBench release we support (fusion-bench 0.2.33)."""

from __future__ import annotations

import sys
import typing

__all__ = ["ensure_typing_override"]


def ensure_typing_override() -> None:
    """fusion-bench 0.2.33's OpenCLIP modelpool (and a few methods) import ``typing.override``, which exists
    from Python 3.12 on; on 3.10/3.11 provide ``typing_extensions.override`` under that name."""
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        from typing_extensions import override

        typing.override = override
