"""The offline benchmark's data root: ``$FUSION_BENCH_TSV_DATA`` (empty counts as unset) and the OmegaConf resolver
its configs spell it with."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ROOT_RESOLVER", "DATA_ROOT_VAR", "data_root", "register_data_root_resolver"]

#: the environment variable naming the offline benchmark's data root
DATA_ROOT_VAR = "FUSION_BENCH_TSV_DATA"
#: the OmegaConf resolver the benchmark's configs spell their data root with: ``${tsv_data_root:}/tiny_clip/...``
DATA_ROOT_RESOLVER = "tsv_data_root"


def data_root() -> str:
    """``$FUSION_BENCH_TSV_DATA``, else ``~/.cache/fusion_bench_tsv``: set but empty counts as unset (OmegaConf's
    ``oc.env`` would give the empty string, and ``/tiny_clip``)."""
    return os.environ.get(DATA_ROOT_VAR) or str(Path.home() / ".cache" / "fusion_bench_tsv")


def register_data_root_resolver() -> None:
    """Register :data:`DATA_ROOT_RESOLVER` with OmegaConf (once; importing the package does it, and the Hydra
    plugin imports it for every app); nothing without OmegaConf."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return

    if not OmegaConf.has_resolver(DATA_ROOT_RESOLVER):
        OmegaConf.register_new_resolver(DATA_ROOT_RESOLVER, data_root)

