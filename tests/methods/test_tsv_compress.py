"""TSV-C: rank choice, compression against a float64 oracle, the compressed checkpoint, routed evaluation."""

from __future__ import annotations

import json
import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from oracles import assert_within, eps, oracle_rank_k, rank_k_bound, roundoff_bound

from fusion_bench_tsv.functional import (
    check_rank_options,
    compress_matrix,
    energy_rank,
    factor_numel,
    fraction_rank,
    layer_rank,
    reconstruct,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny SVDs are orders of magnitude slower with threads fighting over 2 shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- functional
@pytest.mark.parametrize("shape,k", [((12, 7), 3), ((7, 12), 1), ((16, 16), 16), ((20, 9), 5)])
def test_reconstruction_equals_float64_truncated_svd(shape, k):
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + k), dtype=torch.float64)
    expected, S = oracle_rank_k(delta, k)
    factors = compress_matrix(delta, k)
    assert factors.U.shape == (shape[0], k) and factors.S.shape == (k,) and factors.Vh.shape == (k, shape[1])
    assert_within(reconstruct(factors), expected, rank_k_bound(delta, k, torch.float64), "float64 rank-k")
    assert_within(factors.S, S[:k], roundoff_bound(torch.float64, max(shape), S[0]), "σ")  # backward stable (Weyl)
    # float32 input: computed in float32, close to the float64 oracle
    rec32 = reconstruct(compress_matrix(delta.float(), k))
    assert rec32.dtype == torch.float32
    assert_within(rec32, expected, rank_k_bound(delta, k, torch.float32) + eps(torch.float32) * np.abs(expected).max(),
                  "float32 rank-k")


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_squared_frobenius_error_is_discarded_energy(k):
    delta = torch.randn(9, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    _, S = oracle_rank_k(delta, k)
    error = torch.linalg.matrix_norm(delta - reconstruct(compress_matrix(delta, k))) ** 2
    # an entrywise error δ = rank_k_bound in the residual R changes ‖R‖² by <= 2‖R‖·δ·√(mn) + mn·δ²
    tail, delta_r = float(np.sum(S[k:] ** 2)), rank_k_bound(delta, k, torch.float64)
    assert_within(error, tail, 2 * math.sqrt(tail) * delta_r * math.sqrt(54) + 54 * delta_r**2, "Eckart–Young")


def brute_energy_rank(S: np.ndarray, energy: float) -> int:
    total = float(np.sum(S**2))
    for k in range(1, len(S) + 1):
        if float(np.sum(S[:k] ** 2)) >= energy * total:
            return k
    return len(S)


@pytest.mark.parametrize("energy", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_energy_rank_is_smallest_k_keeping_the_share(energy):
    delta = torch.randn(10, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    delta[:, 0] *= 10  # uneven spectrum
    _, S = oracle_rank_k(delta, 1)
    k = brute_energy_rank(S, energy)
    assert energy_rank(torch.from_numpy(S), energy) == k
    factors = compress_matrix(delta, energy=energy)
    assert factors.S.numel() == k
    kept = float(torch.sum(factors.S**2))
    total = float(np.sum(S**2))
    assert kept >= energy * total - roundoff_bound(torch.float64, len(S), total)  # sums of len(S) squares


def test_rank_choices_never_zero():
    assert energy_rank(torch.zeros(5), 0.9) == 1  # a zero update keeps one triplet
    assert compress_matrix(torch.zeros(4, 3), energy=0.5).S.numel() == 1
    assert fraction_rank((10, 40), 0.3) == 3  # 0.3 * 10 is 2.999... in floating point
    assert fraction_rank((10, 40), 0.01) == 1
    assert fraction_rank((768, 3072), 1 / 8) == 96
    assert layer_rank((768, 768), 8) == 96  # the reference's floor(r / T)
    assert layer_rank((768, 768), 14) == 768 // 14
    assert layer_rank((3, 50), 8) == 1  # r < T: one triplet, not zero
    assert layer_rank((30, 50), 8, rank=7) == 7
    assert factor_numel((768, 3072), 96) == 96 * (768 + 3072 + 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fraction=0.0), "'fraction'"),
        (dict(fraction=1.5), "'fraction'"),
        (dict(fraction=float("nan")), "'fraction'"),
        (dict(rank=0), "'rank'"),
        (dict(rank=2.5), "'rank'"),
        (dict(rank=True), "'rank'"),
        (dict(energy=0.0), "'energy'"),
        (dict(energy=1.01), "'energy'"),
        (dict(fraction=0.5, rank=3), "exclusive"),
        (dict(rank=3, energy=0.9), "exclusive"),
    ],
)
def test_bad_rank_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_rank_options(**kwargs)
    from fusion_bench_tsv import TSVCompressAlgorithm

    with pytest.raises(ValueError, match=match):
        TSVCompressAlgorithm(**kwargs)


def test_rank_larger_than_layer_names_the_key():
    with pytest.raises(ValueError, match=r"'rank'=9 exceeds .*'enc\.w'"):
        layer_rank((8, 20), 3, rank=9, name="enc.w")
    with pytest.raises(ValueError, match="exactly one"):
        compress_matrix(torch.zeros(3, 3), 2, energy=0.5)
    with pytest.raises(ValueError, match="out of range"):
        compress_matrix(torch.zeros(3, 3), 4)


# ----------------------------------------------------------------------------- the algorithm on a tiny pool
@pytest.fixture(scope="module")
def vision_pool():
    """An in-memory pool: a tiny CLIP vision tower and 3 synthetic fine-tuned ones."""
    from transformers import CLIPVisionModel

    from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state
    from fusion_bench_tsv.benchmark.tiny_clip import make_tiny_clip

    clip = make_tiny_clip(seed=0)
    base = CLIPVisionModel(clip.config.vision_config).eval()
    base.vision_model.load_state_dict(clip.vision_model.state_dict())
    pool = {"_pretrained_": base}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        model = CLIPVisionModel(base.config).eval()
        model.load_state_dict(synthetic_task_state(base.state_dict(), seed=100 + i))
        pool[name] = model
    return pool


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_models_are_pretrained_plus_rank_k_oracle(vision_pool):
    from fusion_bench_tsv import TSVCompressAlgorithm

    before = {name: _snapshot(m) for name, m in vision_pool.items()}
    models = TSVCompressAlgorithm(show_pbar=False, device="cpu").run(dict(vision_pool))
    assert list(models) == ["alpha", "beta", "gamma"]
    base = before["_pretrained_"]
    num_tasks, checked = 3, 0
    for name, model in models.items():
        state, finetuned = model.state_dict(), before[name]
        for key, value in state.items():
            if torch.is_floating_point(value) and value.dim() == 2:
                k = max(1, min(value.shape) // num_tasks)
                delta = finetuned[key] - base[key]
                approx, _ = oracle_rank_k(delta, k)
                expected = base[key].double().numpy() + approx
                # float32 factors and product (the model's dtype), then θ₀ + update rounded to float32
                bound = rank_k_bound(delta, k, torch.float32) + eps(torch.float32) * np.abs(expected).max()
                assert bound < np.abs(approx).max(), key  # else dropping the update would pass
                assert_within(value, expected, bound, key)
                checked += 1
            else:  # every other parameter exactly as the fine-tuned model has it
                assert torch.equal(value, finetuned[key]), key
    assert checked > 0
    for name, m in vision_pool.items():  # inputs never modified
        for key, value in m.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


@pytest.mark.parametrize("options", [{}, {"factor_dtype": "float16"}, {"energy": 0.8}, {"fraction": 0.25}])
def test_save_load_rebuild_is_bit_identical_and_bytes_exact(vision_pool, tmp_path, monkeypatch, options):
    import safetensors

    from fusion_bench_tsv import TSVCompressAlgorithm
    from fusion_bench_tsv.io.compressed_checkpoint import TENSOR_FILE, load_task_model, read_metadata

    ckpt = tmp_path / "ckpt"
    models = TSVCompressAlgorithm(show_pbar=False, device="cpu", save_path=str(ckpt), **options).run(dict(vision_pool))
    base = vision_pool["_pretrained_"]
    manifest = read_metadata(ckpt)
    assert manifest["tasks"] == ["alpha", "beta", "gamma"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind

    # bytes: the metadata's count is what the file holds, tensor by tensor and on disk
    path = ckpt / TENSOR_FILE
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    storage = manifest["storage"]
    assert storage["stored"]["bytes"] == data_bytes == len(raw) - 8 - header_len
    assert storage["stored"]["params"] == sum(t.numel() for t in tensors.values())
    # parameter counts from shapes: k (m + n + 1) per compressed matrix and task, the rest in full
    base_state = base.state_dict()
    floating = {k: v for k, v in base_state.items() if torch.is_floating_point(v)}
    expected_factors = sum(
        k * (sum(meta["shape"]) + 1) for meta in manifest["matrices"].values() for k in meta["k"]
    )
    expected_others = 3 * sum(v.numel() for k, v in floating.items() if k not in manifest["matrices"])
    assert storage["stored"]["matrix_factor_params"] == expected_factors
    assert storage["stored"]["other_params"] == expected_others
    one_model = sum(v.numel() * v.element_size() for v in floating.values())
    assert storage["one_model"]["bytes"] == one_model and storage["full_task_vectors"]["bytes"] == 3 * one_model
    if "factor_dtype" in options:
        assert all(t.dtype == torch.float16 for k, t in tensors.items() if k.endswith(("/U", "/S", "/Vh")))
    if "energy" in options:
        for i, name in enumerate(["alpha", "beta", "gamma"]):  # k per task and layer: the oracle's energy rank
            finetuned = vision_pool[name].state_dict()
            for key, meta in manifest["matrices"].items():
                _, S = oracle_rank_k(finetuned[key] - base_state[key], 1)
                assert meta["k"][i] == brute_energy_rank(S, options["energy"]), (name, key)

    # rebuild each task from base + file alone, keeping only that task's tensors
    from fusion_bench_tsv.io import compressed_checkpoint

    requested = []
    real_read = compressed_checkpoint._read

    def recording(f, name):
        requested.append(name)
        return real_read(f, name)

    monkeypatch.setattr(compressed_checkpoint, "_read", recording)
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        requested.clear()
        rebuilt = load_task_model(ckpt, name, base)
        assert requested and all(k.startswith(f"t{i}/") for k in requested)
        reference = models[name].state_dict()
        for key, value in rebuilt.state_dict().items():
            assert value.dtype == reference[key].dtype and torch.equal(value, reference[key]), (name, key)


def test_checkpoint_mismatch_names_the_key(vision_pool, tmp_path):
    from transformers import CLIPVisionModel

    from fusion_bench_tsv import TSVCompressAlgorithm
    from fusion_bench_tsv.io.compressed_checkpoint import load_task_model
    from fusion_bench_tsv.benchmark.tiny_clip import make_tiny_clip

    ckpt = tmp_path / "ckpt"
    TSVCompressAlgorithm(show_pbar=False, device="cpu", save_path=str(ckpt), rank=2).run(dict(vision_pool))
    base = vision_pool["_pretrained_"]

    other = CLIPVisionModel(make_tiny_clip(seed=0, vision_hidden_size=16).config.vision_config)
    with pytest.raises(ValueError, match=r"parameter 'vision_model\.embeddings\.[^']*': the base model has shape"):
        load_task_model(ckpt, "alpha", other)

    shifted = CLIPVisionModel(base.config)
    shifted.load_state_dict(base.state_dict())
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    with torch.no_grad():
        shifted.state_dict()[key].add_(0.01)
    with pytest.raises(ValueError, match=rf"'{key}' of the base model differs"):
        load_task_model(ckpt, "alpha", shifted)

    with pytest.raises(KeyError, match="'delta' is not in the compressed checkpoint"):
        load_task_model(ckpt, "delta", base)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"option 'save_path'=.*holding files TSV-C did not write \(notes.txt\)"):
        TSVCompressAlgorithm(show_pbar=False, device="cpu", save_path=str(tmp_path / "mine"), rank=1).run(
            dict(vision_pool)
        )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_rank_too_large_fails_before_loading_finetuned_models(vision_pool):
    from fusion_bench import BaseModelPool

    from fusion_bench_tsv import TSVCompressAlgorithm

    class Pool(BaseModelPool):
        loaded = []

        def load_model(self, name, *args, **kwargs):
            self.loaded.append(name)
            return super().load_model(name, *args, **kwargs)

    pool = Pool(dict(vision_pool))
    with pytest.raises(ValueError, match=r"'rank'=40 exceeds the rank of parameter 'vision_model\..*'"):
        TSVCompressAlgorithm(show_pbar=False, device="cpu", rank=40).run(pool)
    assert [n for n in Pool.loaded if n != "_pretrained_"] == []


# ----------------------------------------------------------------------------- routed evaluation
def _open_clip_encoder(seed: int):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.transform import image_transform

    from fusion_bench.models.open_clip import ImageEncoder

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = CLIP(
            16,
            CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
            CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=1, layers=1),
        )
    encoder = ImageEncoder.__new__(ImageEncoder)  # ImageEncoder(name) would download weights
    torch.nn.Module.__init__(encoder)
    encoder.model = clip
    del encoder.model.transformer
    encoder.val_preprocess = encoder.train_preprocess = image_transform(32, is_train=False)
    return encoder.eval()


def test_routed_evaluation_open_clip_taskpool(monkeypatch):
    import fusion_bench_tsv  # noqa: F401  (its compat shim lets fusion-bench's OpenCLIP code import on Python < 3.12)

    from fusion_bench.models.open_clip import ClassificationHead
    from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool

    from fusion_bench_tsv import TSVCompressAlgorithm
    from fusion_bench_tsv.io.compressed_checkpoint import build_task_model
    from fusion_bench_tsv.benchmark.synthetic import random_image_task, synthetic_task_state

    base = _open_clip_encoder(0)
    pool = {"_pretrained_": base}
    for i, task in enumerate(["shade_a", "shade_b", "shade_c"]):
        enc = _open_clip_encoder(0)
        enc.load_state_dict(synthetic_task_state(base.state_dict(), seed=i, scale=0.2))
        pool[task] = enc
    data, heads = {}, {}
    for i, task in enumerate(["shade_a", "shade_b"]):  # shade_c has no test set
        images, labels = random_image_task(3, 10, 32, seed=20 + i)
        data[task] = [{"image": im, "label": y} for im, y in zip(images, labels)]
        heads[task] = ClassificationHead(True, torch.randn(3, 16, generator=torch.Generator().manual_seed(i)))
    taskpool = OpenCLIPVisionModelTaskPool(test_datasets=data, classification_heads=heads, dataloader_kwargs={"batch_size": 4})
    taskpool._program = SimpleNamespace(modelpool=SimpleNamespace(test_processor=base.val_preprocess))

    calls = []
    real_evaluate = taskpool.evaluate

    def counting_evaluate(model, **kw):
        calls.append(sorted(taskpool.test_dataloaders))
        return real_evaluate(model, **kw)

    taskpool.evaluate = counting_evaluate
    algo = TSVCompressAlgorithm(show_pbar=False, device="cpu")
    algo._program = SimpleNamespace(taskpool=taskpool)
    routed = algo.run(dict(pool))
    report = algo.report
    assert routed["average"] == report["average"] and routed["shade_a"] == report["tasks"]["shade_a"]

    assert calls == [["shade_a"]] * 2 + [["shade_b"]] * 2  # compressed + fine-tuned, each on its own task
    assert sorted(taskpool.test_dataloaders) == ["shade_a", "shade_b"]  # restored
    assert report["not_evaluated"] == ["shade_c"]
    assert [e["model"] for e in report["evaluations"]] == [
        "tsv_c:shade_a", "finetuned:shade_a", "tsv_c:shade_b", "finetuned:shade_b"
    ]
    # the reported accuracy is the compressed model's own accuracy on its task, computed here directly
    _, tasks, _ = TSVCompressAlgorithm(show_pbar=False, device="cpu").compress(dict(pool))
    for task in tasks[:2]:
        model = build_task_model(base, task)
        x = torch.stack([base.val_preprocess(d["image"]) for d in data[task.name]])
        y = torch.tensor([d["label"] for d in data[task.name]])
        with torch.no_grad():
            acc = float((heads[task.name](model(x)).argmax(-1) == y).float().mean())
        # a count / 10 in float32 either way: within ε₃₂, far inside pytest.approx's relative 1e-6
        assert report["tasks"][task.name]["accuracy"] == pytest.approx(acc)
    accs = [report["tasks"][t]["accuracy"] for t in ("shade_a", "shade_b")]
    assert report["average"]["accuracy"] == pytest.approx(sum(accs) / 2)  # one float64 rounding
    assert "storage" in report and report["storage"]["num_tasks"] == 3


@pytest.mark.cli
def test_routed_evaluation_through_the_cli(tiny_pool, tmp_path, monkeypatch):
    from support import run_fusion_bench

    from fusion_bench_tsv.io.compressed_checkpoint import read_metadata

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run_fusion_bench(
        [
            "--config-dir", str(tiny_pool["config_dir"]),
            "method=tsv/tsv_compress",
            f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
            f"taskpool=CLIPVisionModelTaskPool/{tiny_pool['name']}",
            "method.save_path='{log_dir}/tsv_c'",
            "method.show_pbar=false",
            "print_config=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (log_dir,) = list((tmp_path / "outputs" / "fabric_model_fusion").iterdir())
    routed = json.loads((log_dir / "program_report.json").read_text())  # a task pool's report, routed
    report = json.loads((log_dir / "tsv_compress_report.json").read_text())  # everything
    assert routed["average"] == report["average"]
    assert {t: routed[t] for t in report["tasks"]} == {t: {k: v for k, v in e.items() if v is not None}
                                                       for t, e in report["tasks"].items()}
    assert sorted(report["tasks"]) == ["shade_a", "shade_b"]
    assert report["not_evaluated"] == [t for t in tiny_pool["tasks"] if t not in ("shade_a", "shade_b")]
    models = [e["model"] for e in report["evaluations"]]
    assert sorted(models) == ["finetuned:shade_a", "finetuned:shade_b", "tsv_c:shade_a", "tsv_c:shade_b"]
    # FusionBench's task pool writes one report per evaluate() call: 4 calls, each on one task only, each
    # moved to routed_eval/<model>-<task>.json; none left as report.json, report_1.json, ...
    assert not list(log_dir.glob("report*.json"))
    pool_reports = [json.loads((log_dir / "routed_eval" / f"{m.replace(':', '-')}.json").read_text()) for m in models]
    assert [next(k for k in r if k not in ("model_info", "average")) for r in pool_reports] == [
        m.split(":")[1] for m in models]
    assert all(len([k for k in r if k not in ("model_info", "average")]) == 1 for r in pool_reports)
    # normalized accuracy from the task pool's own report files (one per evaluate() call, in call order),
    # not from the method's report: acc / ft, undefined (None) where the fine-tuned accuracy is 0
    assert models == ["tsv_c:shade_a", "finetuned:shade_a", "tsv_c:shade_b", "finetuned:shade_b"]
    pool_accuracy = {m: r[m.split(":")[1]]["accuracy"] for m, r in zip(models, pool_reports)}
    for t in ("shade_a", "shade_b"):
        e, acc, ft = report["tasks"][t], pool_accuracy[f"tsv_c:{t}"], pool_accuracy[f"finetuned:{t}"]
        assert (e["accuracy"], e["finetuned_accuracy"]) == (acc, ft)  # copied from the task pool: exact
        # one division in float64: exact to half an ulp, far inside pytest.approx's relative 1e-6
        assert e["normalized_accuracy"] == (pytest.approx(acc / ft) if ft > 0 else None), (t, acc, ft)
    assert any(pool_accuracy[f"finetuned:{t}"] > 0 for t in ("shade_a", "shade_b")), pool_accuracy
    manifest = read_metadata(log_dir / "tsv_c")
    assert manifest["tasks"] == tiny_pool["tasks"]
    assert manifest["storage"] == report["storage"]
    assert manifest["rank_choice"]["mode"] == "default"
    assert "TSV-C storage, T=8" in proc.stdout + proc.stderr
    # the closing summary: the routed average (percent, two decimals; the JSON keeps full precision), the report
    lines = proc.stdout.splitlines()
    assert f"  average accuracy: {100 * report['average']['accuracy']:.2f}% over 2 tasks" in lines
    assert f"  full report: {log_dir / 'tsv_compress_report.json'}" in lines
    assert "TSV-C routed: average {" not in proc.stdout + proc.stderr  # the former unrounded dict
    # FusionBench's 'No save path specified ...' after the run is explained, as for TSV-M (the job's log file)
    (log_file,) = log_dir.glob("*.log")
    assert "TSV-C: saved by method.save_path; FusionBench's own merged_model_save_path" in log_file.read_text()
