"""Modelpool / taskpool YAML for the offline suites (``tiny_clip_{8,14,20}``, ``small_clip_{8,14,20}``).

The committed files in ``config/`` are written by ``python -m fusion_bench_tsv.benchmark.configs``;
:func:`write_suite_configs` also writes them for any other build directory (the tests' mini build).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from ..io.atomic import write_atomic

__all__ = ["DEFAULT_SUITE_DIR", "SUITE_SIZES", "clip_modelpool_config", "modelpool_config", "write_config", "clip_taskpool_config", "taskpool_config",
           "openclip_heads_config", "openclip_modelpool_config", "openclip_taskpool_config", "write_suite_configs"]

# resolved by OmegaConf when FusionBench composes the config. It is spelled out in every path: a helper key
# (``suite_dir: ...`` referred to as ``${.suite_dir}``) would reach the pool's constructor, which warns
# "Unused argument" for every key it does not know.
DEFAULT_SUITE_DIR = "${tsv_data_root:}/tiny_clip"
SUITE_SIZES = (8, 14, 20)

_HEADER = """\
# =============================================================================
# Offline {suite} benchmark, first {n} tasks ({tasks})
# =============================================================================
# Built by `fusion-bench-tsv-build --num-tasks {n}{suite_option}` (fusion_bench_tsv.benchmark.build).
# The paths are under the build directory: set FUSION_BENCH_TSV_DATA=<root> to use <root>/{suite}
# (default ~/.cache/fusion_bench_tsv/{suite}).
#
#   fusion_bench method=tsv/tsv_merge modelpool=CLIPVisionModelPool/{name}_{n} \\
#     taskpool=CLIPVisionModelTaskPool/{name}_{n}
# =============================================================================
"""


def clip_modelpool_config(pretrained: str, models: Mapping[str, str]) -> dict:
    """``CLIPVisionModelPool`` of the checkpoint directories ``pretrained`` and ``models`` (task -> directory)."""
    return {
        "_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_": False,
        "processor": str(pretrained),
        "models": {"_pretrained_": str(pretrained), **{t: str(p) for t, p in models.items()}},
        "platform": "hf",
    }


def modelpool_config(tasks: Sequence[str], suite_dir: str = DEFAULT_SUITE_DIR) -> dict:
    """``CLIPVisionModelPool`` of ``<suite_dir>/pretrained`` and ``<suite_dir>/models/<task>``."""
    return clip_modelpool_config(f"{suite_dir}/pretrained", {t: f"{suite_dir}/models/{t}" for t in tasks})


def clip_taskpool_config(tasks: Sequence[str], data_root: str, clip_model: str, split: str = "test",
                         batch_size: int = 200) -> dict:
    """``CLIPVisionModelTaskPool`` on the local datasets ``<data_root>/<task>`` (see
    :mod:`fusion_bench_tsv.benchmark.local_data`), with zero-shot heads from the ``CLIPModel`` saved at ``clip_model``."""
    return {
        "_target_": "fusion_bench.taskpool.CLIPVisionModelTaskPool",
        "_recursive_": False,
        "test_datasets": {
            t: {"_target_": "fusion_bench_tsv.benchmark.local_data.load_task_dataset", "root": str(data_root),
                "task": t, "split": split}
            for t in tasks
        },
        "clip_model": {"_target_": "transformers.CLIPModel.from_pretrained",
                       "pretrained_model_name_or_path": str(clip_model)},
        "processor": {"_target_": "transformers.CLIPProcessor.from_pretrained",
                      "pretrained_model_name_or_path": str(clip_model)},
        "dataloader_kwargs": {"batch_size": batch_size, "num_workers": 0, "shuffle": False},
    }


def taskpool_config(tasks: Sequence[str], suite_dir: str = DEFAULT_SUITE_DIR, split: str = "test",
                    batch_size: int = 200) -> dict:
    """:func:`clip_taskpool_config` on ``<suite_dir>/data`` with ``<suite_dir>/pretrained``."""
    return clip_taskpool_config(tasks, f"{suite_dir}/data", f"{suite_dir}/pretrained", split, batch_size)


def _openclip_file(loader: str, suite_dir: str, path: str) -> dict:
    return {"_target_": f"fusion_bench_tsv.benchmark.openclip_export.{loader}", "path": f"{suite_dir}/openclip/{path}"}


def openclip_heads_config(tasks: Sequence[str], suite_dir: str = DEFAULT_SUITE_DIR) -> dict:
    return {t: _openclip_file("load_classification_head", suite_dir, f"head_{t}.safetensors") for t in tasks}


def openclip_modelpool_config(tasks: Sequence[str], suite_dir: str = DEFAULT_SUITE_DIR) -> dict:
    def model(path: str) -> dict:
        return _openclip_file("load_image_encoder", suite_dir, path)

    return {
        "_target_": "fusion_bench.modelpool.OpenCLIPVisionModelPool",
        "_recursive_": False,
        "models": {"_pretrained_": model("zeroshot.safetensors"),
                   **{t: model(f"{t}/finetuned.safetensors") for t in tasks}},
        "classification_heads": openclip_heads_config(tasks, suite_dir),
    }


def openclip_taskpool_config(tasks: Sequence[str], suite_dir: str = DEFAULT_SUITE_DIR, split: str = "test",
                             batch_size: int = 200) -> dict:
    cfg = taskpool_config(tasks, suite_dir, split, batch_size)
    return {
        "_target_": "fusion_bench.taskpool.OpenCLIPVisionModelTaskPool",
        "_recursive_": False,
        "test_datasets": cfg["test_datasets"],
        "classification_heads": openclip_heads_config(tasks, suite_dir),
        "dataloader_kwargs": cfg["dataloader_kwargs"],
    }


def write_config(path: Path, header: str, cfg: dict) -> None:
    """Write ``cfg`` as YAML after the comment lines ``header``, atomically."""
    import yaml

    write_atomic(path, lambda p: p.write_text(header + yaml.safe_dump(cfg, sort_keys=False, width=120)))


def suite_config_dir(suite: str) -> str:
    """The build directory of ``suite`` as the configs spell it (resolved by OmegaConf)."""
    return DEFAULT_SUITE_DIR.rsplit("/", 1)[0] + f"/{suite}"


def write_suite_configs(config_dir: os.PathLike, suite_dir: str = DEFAULT_SUITE_DIR,
                        sizes: Sequence[int] = SUITE_SIZES, name: str = "tiny_clip", suite: str = "tiny_clip") -> None:
    """Write ``modelpool/CLIPVisionModelPool/<name>_<n>.yaml`` and ``taskpool/CLIPVisionModelTaskPool/<name>_<n>.yaml``
    (plus ``<name>_<n>_val.yaml`` on the validation splits) for each suite size ``n``; ``suite`` names the
    build (``fusion-bench-tsv-build --suite``) in the comments."""
    from .build import DEFAULT_SUITE, suite_tasks

    config_dir = Path(config_dir)
    suite_option = "" if suite == DEFAULT_SUITE else f" --suite {suite}"
    for n in sizes:
        tasks = suite_tasks(suite)[:n]
        header = _HEADER.format(n=n, tasks=", ".join(tasks), suite=suite, suite_option=suite_option, name=name)
        write_config(config_dir / "modelpool" / "CLIPVisionModelPool" / f"{name}_{n}.yaml", header,
               modelpool_config(tasks, suite_dir))
        write_config(config_dir / "taskpool" / "CLIPVisionModelTaskPool" / f"{name}_{n}.yaml", header,
               taskpool_config(tasks, suite_dir))
        write_config(config_dir / "taskpool" / "CLIPVisionModelTaskPool" / f"{name}_{n}_val.yaml",
               header.replace("# The paths", "# Validation splits (for choosing alpha).\n# The paths"),
               taskpool_config(tasks, suite_dir, split="validation"))
        oc_header = header.replace("CLIPVisionModel", "OpenCLIPVisionModel").replace(
            "# The paths", "# The open_clip task-vector layout (<build directory>/openclip).\n# The paths")
        write_config(config_dir / "modelpool" / "OpenCLIPVisionModelPool" / f"{name}_{n}.yaml", oc_header,
               openclip_modelpool_config(tasks, suite_dir))
        write_config(config_dir / "taskpool" / "OpenCLIPVisionModelTaskPool" / f"{name}_{n}.yaml", oc_header,
               openclip_taskpool_config(tasks, suite_dir))


if __name__ == "__main__":
    from .build import SUITES

    for suite in SUITES:
        write_suite_configs(Path(__file__).resolve().parents[2] / "config", suite_config_dir(suite), name=suite, suite=suite)
