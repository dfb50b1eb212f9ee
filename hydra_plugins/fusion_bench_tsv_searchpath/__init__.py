"""Hydra search-path plugin: makes ``method=tsv/...`` and FusionBench's own configs compose together.

FusionBench takes ``./config`` (or ``./fusion_bench_config``) of the current directory as its primary
config directory when there is one, else its packaged ``fusion_bench_config``. This plugin appends
both fusion_bench_tsv's configs and FusionBench's packaged configs to the search path, so either
primary directory finds ``fabric_model_fusion``, the modelpools, the taskpools and ``method/tsv/*``.
It imports neither FusionBench nor our algorithms (Hydra loads every plugin for every app); it applies
:func:`fusion_bench_tsv.compat.ensure_typing_override` so that FusionBench's OpenCLIP pools import on
Python < 3.12 in the ``fusion_bench`` CLI.
"""

import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def _package_dir(name: str) -> Optional[Path]:
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__path__", None):
        # fusion_bench replaces itself by a lazy module whose __spec__ is None
        return Path(list(module.__path__)[0])
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def tsv_config_dir() -> Optional[Path]:
    """fusion_bench_tsv's config tree: packaged as ``fusion_bench_tsv/config`` when installed,
    ``config/`` beside the package in a source checkout."""
    pkg = _package_dir("fusion_bench_tsv")
    if pkg is None:
        return None
    for candidate in (pkg / "config", pkg.parent / "config"):
        if (candidate / "method" / "tsv").is_dir():
            return candidate
    return None


def fusion_bench_config_dir() -> Optional[Path]:
    """FusionBench's packaged config tree (``site-packages/fusion_bench_config``)."""
    pkg = _package_dir("fusion_bench")
    if pkg is None:
        return None
    candidate = pkg.parent / "fusion_bench_config"
    return candidate if (candidate / "fabric_model_fusion.yaml").is_file() else None


try:
    from fusion_bench_tsv.compat import ensure_typing_override

    ensure_typing_override()
except ImportError:  # the plugin outlived an uninstalled package
    pass


class FusionBenchTSVSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for provider, path in (("fusion_bench_tsv", tsv_config_dir()), ("fusion_bench", fusion_bench_config_dir())):
            if path is not None:
                search_path.append(provider=provider, path=f"file://{path}")
