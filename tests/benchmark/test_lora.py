"""A tiny LoRA pool (peft adapters on a tiny CLIP vision tower) loaded through FusionBench's own loader.

Oracles: the merged weights are W + (alpha / r)·B·A computed in float64 from the saved adapter file; the
task updates have rank r up to float32 storage round-off; rank-revealing TSV-M merges them to one matrix.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from oracles import numpy_ranked_merge  # noqa: E402

from fusion_bench_tsv.benchmark.lora import LoraSettings, finetune_lora, lora_modelpool_config, save_lora_adapter  # noqa: E402
from fusion_bench_tsv.benchmark.tasks import TASKS  # noqa: E402
from fusion_bench_tsv.functional import tsv_merge_matrix  # noqa: E402
from fusion_bench_tsv.benchmark.tiny_clip import make_tiny_clip, save_clip  # noqa: E402

from support import REPO_ROOT as REPO  # noqa: E402
CONFIG = REPO / "config" / "modelpool" / "CLIPVisionModelPool" / "tiny_clip_8_lora.yaml"
SETTINGS = LoraSettings(rank=2, alpha=4.0, steps=3, batch_size=8, lr=5e-2)
BUILT = [t.name for t in TASKS[:3]]  # adapters made in the test; the config lists the first 8
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def tiny_lora_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora_root")
    suite = root / "tiny_clip"
    clip = make_tiny_clip(seed=0)
    save_clip(clip, suite / "pretrained")
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    head = torch.nn.functional.normalize(torch.randn(4, clip.config.projection_dim, generator=gen), dim=-1)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 16).astype(np.int64)
    for i, task in enumerate(BUILT):
        save_lora_adapter(finetune_lora(clip, head, images, labels, SETTINGS, seed=i), suite / "lora" / task)
    return root


def _pool(root: Path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(root))
    return instantiate(OmegaConf.load(CONFIG))


def test_config_matches_the_builder_and_loads_through_fusionbench(tiny_lora_suite, monkeypatch):
    cfg = OmegaConf.load(CONFIG)
    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(tiny_lora_suite))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    suite = resolved.pop("suite_dir")
    assert resolved == lora_modelpool_config([t.name for t in TASKS[:8]], suite), "YAML and lora_modelpool_config differ"
    pool = _pool(tiny_lora_suite, monkeypatch)
    assert pool.model_names[:3] == BUILT and "_pretrained_" not in pool.model_names


def test_merged_lora_models_are_base_plus_low_rank(tiny_lora_suite, monkeypatch):
    pool = _pool(tiny_lora_suite, monkeypatch)
    base = {k: v.detach() for k, v in pool.load_model("_pretrained_").state_dict().items()}
    scale = SETTINGS.alpha / SETTINGS.rank
    q_deltas, q_squares = [], []
    for task in BUILT:
        merged = pool.load_model(task).state_dict()
        assert merged.keys() == base.keys(), f"{task}: merged keys differ from the pretrained model's"
        adapter = load_file(str(tiny_lora_suite / "tiny_clip" / "lora" / task / "adapter_model.safetensors"))
        for key, theta0 in base.items():
            module = key.rsplit(".", 1)[0]  # e.g. encoder.layers.0.self_attn.q_proj
            a = [v for k, v in adapter.items() if k.endswith(f"{module}.lora_A.weight")]
            if not (key.endswith(".weight") and module.split(".")[-1] in SETTINGS.target_modules):
                assert torch.equal(merged[key], theta0), f"{task}: untargeted '{key}' changed"
                continue
            (b,) = [v for k, v in adapter.items() if k.endswith(f"{module}.lora_B.weight")]
            expected = theta0.double() + scale * b.double() @ a[0].double()
            err = float((merged[key].double() - expected).abs().max())
            bound = EPS32 * float(expected.abs().max())  # one float32 rounding of each entry: ≤ u₃₂·|θ| ≤ ε₃₂/2·max|θ|
            assert err <= bound, f"{task} '{key}': merged weight off by {err:.3g} > {bound:.3g}"
            delta = merged[key].double() - theta0.double()  # exact: difference of two float32
            s = torch.linalg.svdvals(delta)
            noise = EPS32 / 2 * float(merged[key].double().norm())  # ‖E‖₂ ≤ ‖E‖_F ≤ u₃₂·‖θᵢ‖_F
            r = SETTINGS.rank
            assert s[r - 1] > noise >= s[r], f"{task} '{key}': σ_r = {s[r - 1]:.3g}, σ_r+1 = {s[r]:.3g}, noise bound {noise:.3g}"
            if key.endswith("layers.0.self_attn.q_proj.weight"):
                q_deltas.append(merged[key] - theta0)
                q_squares.append(float((merged[key].double() ** 2).mean()))
                q_squares.append(float((theta0.double() ** 2).mean()))
    # rank-revealing TSV-M on the LoRA updates: k = floor(32/3) = 10 > r, one merged matrix on every path;
    # the checkpoints are float32, whose rounding noise (≈ 1e-8 here) is above float64 round-off: pass its floor
    floor = dict(storage_dtype=torch.float32, weight_rms=math.sqrt(sum(q_squares) / len(q_squares)))
    ref = numpy_ranked_merge(q_deltas, [SETTINGS.rank] * len(BUILT))
    for method in ("svd", "gram"):
        for dtype in (torch.float32, torch.float64):
            merged_q, ranks = tsv_merge_matrix([d.to(dtype) for d in q_deltas], method=method, return_ranks=True, **floor)
            err, tol = float(np.linalg.norm(merged_q.double().numpy() - ref.merged) / np.linalg.norm(ref.merged)), ref.error_bound(dtype)
            assert ranks == [SETTINGS.rank] * len(BUILT), f"{method}/{dtype}: kept {ranks}, expected {SETTINGS.rank} per task"
            assert err <= tol, f"{method}/{dtype}: relative error {err:.3g} > bound {tol:.3g}"
    legacy = tsv_merge_matrix(q_deltas, method="svd", rank_revealing=False)
    spread = float(np.linalg.norm(legacy.double().numpy() - ref.merged) / np.linalg.norm(ref.merged))
    assert spread > math.sqrt(EPS32), f"null-space vectors did not change the merge ({spread:.3g}): not rank-deficient?"


def test_build_lora_pool_on_a_tiny_suite(tmp_path):
    """The builder on a stand-in for a built benchmark (tiny sizes): adapters, report, reuse, missing suite."""
    import dataclasses
    import json

    from fusion_bench_tsv.benchmark.build import BuildSettings
    from fusion_bench_tsv.benchmark.lora import build_lora_pool

    with pytest.raises(FileNotFoundError, match="fusion-bench-tsv-build"):
        build_lora_pool(2, tmp_path, SETTINGS, show_pbar=False)
    suite = tmp_path / "tiny_clip"
    save_clip(make_tiny_clip(seed=0), suite / "pretrained")
    built = BuildSettings(train_size=16, val_size=4, test_size=8)
    (suite / "build.json").write_text(json.dumps({"settings": dataclasses.asdict(built), "tasks": {}}))
    out = build_lora_pool(2, tmp_path, SETTINGS, show_pbar=False)
    report = json.loads((out / "build.json").read_text())
    names = [t.name for t in TASKS[:2]]
    assert list(report["tasks"]) == names and report["settings"]["rank"] == SETTINGS.rank
    assert all(0 <= v <= 1 for t in names for v in report["tasks"][t].values()), report
    stamp = {t: (out / t / "adapter_model.safetensors").stat().st_mtime_ns for t in names}
    build_lora_pool(2, tmp_path, SETTINGS, show_pbar=False)  # same settings: nothing is retrained
    assert stamp == {t: (out / t / "adapter_model.safetensors").stat().st_mtime_ns for t in names}
