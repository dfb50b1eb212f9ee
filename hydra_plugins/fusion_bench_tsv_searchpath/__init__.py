"""Hydra search-path plugin: makes ``method=tsv/...`` and FusionBench's own configs compose together.

FusionBench takes ``./config`` (or ``./fusion_bench_config``) of the current directory as its primary
config directory when there is one, else its packaged ``fusion_bench_config``. This plugin appends
both fusion_bench_tsv's configs and FusionBench's packaged configs to the search path, so either
primary directory finds ``fabric_model_fusion``, the modelpools, the taskpools and ``method/tsv/*``.
It also makes Hydra's error for an unknown config (``method=tsv/tsv_merg``) suggest the closest ones and
list ours, which Hydra leaves out (it lists only the configs directly in ``method/``, not ``method/tsv/``).
It imports neither FusionBench nor our algorithms (Hydra loads every plugin for every app); it applies
:func:`fusion_bench_tsv.compat.ensure_typing_override` so that FusionBench's OpenCLIP pools import on
Python < 3.12 in the ``fusion_bench`` CLI, and registers the ``${tsv_data_root:}`` resolver of the offline
benchmark's configs (:func:`fusion_bench_tsv.benchmark.data_root.data_root`).
"""

import sys
from importlib.util import find_spec
from pathlib import Path
from typing import List, Optional

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


def _nested_options(repo, group: str, depth: int = 3) -> List[str]:
    """Configs of ``group`` and of its subgroups (``tsv/tsv_merge``), as Hydra's ``group=name`` takes them."""
    from hydra.core.object_type import ObjectType

    options = list(repo.get_group_options(group, ObjectType.CONFIG))
    if depth > 0:
        for sub in repo.get_group_options(group, ObjectType.GROUP):
            options += [f"{sub}/{o}" for o in _nested_options(repo, f"{group}/{sub}", depth - 1)]
    return sorted(set(options))


def _our_options(group: str) -> List[str]:
    """fusion_bench_tsv's configs of ``group`` (e.g. ``tsv/tsv_merge`` for ``method``)."""
    root = tsv_config_dir()
    if root is None or not (root / group).is_dir():
        return []
    return sorted(p.relative_to(root / group).with_suffix("").as_posix() for p in (root / group).rglob("*.yaml"))


def explain_missing_config(message: str, repo, group: str, name: str) -> str:
    """Hydra's "Could not find" ``message`` with, first, the closest configs of ``group`` at any depth and
    the options of fusion_bench_tsv (Hydra lists only the configs directly in ``group``, not ``tsv/*``)."""
    import difflib

    nested = _nested_options(repo, group)
    lines = []
    close = difflib.get_close_matches(name, nested, n=3, cutoff=0.6)
    if close:
        lines.append("Did you mean " + " or ".join(f"'{group}={c}'" for c in close) + "?")
    ours = _our_options(group)
    if ours:
        lines.append(f"Options of fusion_bench_tsv for '{group}': " + ", ".join(ours))
    if not lines:
        return message
    first, _, rest = message.partition("\n")
    return "\n".join([first, *lines, rest])


def _patch_missing_config_error() -> None:
    """Make Hydra's error for an unknown ``group=name`` list nested configs (see :func:`explain_missing_config`)."""
    from hydra._internal import defaults_list
    from hydra.core.default_element import GroupDefault
    from hydra.errors import MissingConfigException

    original = defaults_list.config_not_found_error
    if getattr(original, "_fusion_bench_tsv", False):
        return

    def config_not_found_error(repo, tree) -> None:
        try:
            original(repo=repo, tree=tree)
        except MissingConfigException as e:
            element = tree.node
            if not isinstance(element, GroupDefault) or element.primary:
                raise
            group = element.get_group_path()
            name = element.get_config_path()[len(group) + 1:]
            message = explain_missing_config(str(e), repo, group, name)
            raise MissingConfigException(message, missing_cfg_file=e.missing_cfg_file, options=e.options) from None

    config_not_found_error._fusion_bench_tsv = True
    defaults_list.config_not_found_error = config_not_found_error


try:
    _patch_missing_config_error()
except (ImportError, AttributeError):  # another Hydra: its own message stays
    pass

try:
    from fusion_bench_tsv.compat import ensure_typing_override
    from fusion_bench_tsv.benchmark.data_root import register_data_root_resolver

    ensure_typing_override()
    register_data_root_resolver()  # ${tsv_data_root:} of the offline benchmark's configs
except ImportError:  # the plugin outlived an uninstalled package
    pass


class FusionBenchTSVSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for provider, path in (("fusion_bench_tsv", tsv_config_dir()), ("fusion_bench", fusion_bench_config_dir())):
            if path is not None:
                search_path.append(provider=provider, path=f"file://{path}")
