"""benchmark/configs.py: the committed tiny-CLIP configs compose and instantiate without "Unused argument"
warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


# Composes every committed tiny-CLIP modelpool/taskpool pair as the ``fusion_bench`` CLI does and instantiates
# pool, task pool and method as its program does (nothing is loaded before ``setup``); prints the warnings and
# where the paths point.
COMPOSE_AND_INSTANTIATE = textwrap.dedent(
    """
    import json, logging, sys
    from hydra import compose, initialize_config_dir
    from fusion_bench.utils import instantiate
    from fusion_bench.utils.hydra_utils import get_default_config_path

    warnings = []
    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger().addHandler(Collect(level=logging.WARNING))
    paths = {}
    with initialize_config_dir(config_dir=str(get_default_config_path()), version_base=None):
        for family in ("CLIPVision", "OpenCLIPVision"):
            for n in (8, 14, 20):
                for split in ("", "_val") if family == "CLIPVision" else ("",):
                    cfg = compose("fabric_model_fusion", overrides=[
                        "method=tsv/tsv_merge", f"modelpool={family}ModelPool/tiny_clip_{n}",
                        f"taskpool={family}ModelTaskPool/tiny_clip_{n}{split}"])
                    for key in ("modelpool", "taskpool", "method"):
                        instantiate(cfg[key], _recursive_=False)
                    paths[f"{family}_{n}{split}"] = [cfg.taskpool.test_datasets.shapes.root,
                                                     cfg.taskpool.classification_heads.shapes.path
                                                     if family == "OpenCLIPVision" else cfg.modelpool.models.shapes]
    json.dump({"warnings": warnings, "paths": paths}, sys.stdout)
    """
)


def test_tiny_clip_configs_give_no_unused_argument_warning(tmp_path):
    """FusionBench warns "Unused argument: key=value" for every config key its pool/task pool classes do not take
    (it did for our helper keys ``suite_dir`` and ``base_model``); the paths still point into the build directory."""
    env = dict(os.environ, FUSION_BENCH_TSV_DATA=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", COMPOSE_AND_INSTANTIATE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    unused = [w for w in result["warnings"] if "Unused argument" in w]
    assert not unused, unused
    assert len(result["paths"]) == 9
    suite = tmp_path / "tiny_clip"
    for name, (data_root, model) in result["paths"].items():
        assert data_root == str(suite / "data"), name
        expected = suite / ("openclip/head_shapes.safetensors" if name.startswith("OpenCLIP") else "models/shapes")
        assert model == str(expected), name
