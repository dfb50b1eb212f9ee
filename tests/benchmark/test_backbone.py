"""The packaged pretrained backbone (fusion_bench_tsv.benchmark.backbone) and the real-data tasks' split pools."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

# a reduced small_clip: the same corpus (its tasks, task and name fractions), a 16-wide CLIP, a few steps
REDUCED = dict(width=16, projection_dim=16, pretrain_steps=5, pretrain_batch=8, finetune_steps=3, finetune_batch=8,
               train_size=20, val_size=10, test_size=10)


def _reduced():
    from fusion_bench_tsv.benchmark.build import SUITES

    return dataclasses.replace(SUITES["small_clip"][0], **REDUCED)


@pytest.mark.parametrize("source", ["mnist", "digits"])
def test_real_pools_partition_each_class(source):
    from fusion_bench_tsv.benchmark.tasks import POOL_FRACTIONS, SPLITS, real_images, real_pool

    _, labels = real_images(source)
    for c in range(10):
        pools = [set(real_pool(source, split, c).tolist()) for split in SPLITS]
        assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2]), (source, c)
        assert set().union(*pools) == set(np.flatnonzero(labels == c).tolist())
        n = int((labels == c).sum())
        assert abs(len(pools[2]) - POOL_FRACTIONS[2] * n) <= 1  # rounding of the cut


def test_splits_and_pretraining_corpus_draw_only_their_pools(monkeypatch):
    """A test split draws only test-pool images; the pretraining corpus only train-pool ones."""
    from fusion_bench_tsv.benchmark import tasks

    seen = []
    glyph = tasks._real_glyph
    monkeypatch.setattr(tasks, "_real_glyph", lambda rng, source, label, split: seen.append(split) or
                        glyph(rng, source, label, split))
    tasks.make_split(tasks.MNIST, 20, 32, seed=0, split="test")
    assert seen and set(seen) == {"test"}
    seen.clear()
    tasks.caption_corpus_batch(np.random.default_rng(0), 64, 32, task_fraction=1.0, tasks=("mnist", "digits"),
                               split="train")
    assert len(seen) == 64 and set(seen) == {"train"}
    with pytest.raises(ValueError, match="unknown split"):
        tasks.MNIST.image(np.random.default_rng(0), 0, 32, "val")


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reduced_backbone(tmp_path_factory):
    from fusion_bench_tsv.benchmark.backbone import pretrain_backbone

    out = tmp_path_factory.mktemp("backbones")
    return pretrain_backbone(_reduced(), "small_clip", out, checkpoint_every=2, show_pbar=False)


def test_backbone_rebuilds_from_its_recipe(reduced_backbone, tmp_path):
    """The recipe names what the weights depend on; rebuilding from it gives the same bytes."""
    from fusion_bench_tsv.benchmark.backbone import main

    weights, recipe_path = reduced_backbone
    recipe = json.loads(recipe_path.read_text())
    settings = _reduced()
    assert recipe["complete"] and recipe["steps_done"] == settings.pretrain_steps
    assert recipe["pretrain_hash"] == settings.pretrain_hash
    assert recipe["settings"] == dataclasses.asdict(settings)
    assert recipe["weights_sha256"] == _sha256(weights)
    assert set(recipe["real_data"]) == {"mnist", "digits"} and set(recipe["versions"]) >= {"torch", "numpy"}
    # the recipe's settings through the command line: a second, independent run
    args = [f"--{k.replace('_', '-')}={v}" for k, v in recipe["settings"].items()]
    main(["--suite", recipe["suite"], "--out", str(tmp_path), "--no-pbar", *args])
    again = json.loads((tmp_path / "small_clip.json").read_text())
    assert again["weights_sha256"] == recipe["weights_sha256"]
    assert again["corpus_sha256"] == recipe["corpus_sha256"]


def test_loaded_backbone_keeps_the_trained_token_rows(reduced_backbone):
    from safetensors.torch import load_file

    from fusion_bench_tsv.benchmark.backbone import TOKEN_EMBEDDING, load_backbone
    from fusion_bench_tsv.benchmark.tasks import task_by_name
    from fusion_bench_tsv.benchmark.tiny_clip import clip_tokenizer

    weights, _ = reduced_backbone
    stored = load_file(str(weights))
    clip = load_backbone(weights, _reduced())
    state = clip.state_dict()
    for key, value in stored.items():
        if key not in ("token_ids", "token_rows"):
            assert torch.equal(state[key], value), key
    table, ids = state[TOKEN_EMBEDDING], stored["token_ids"]
    assert torch.equal(table[ids], stored["token_rows"])
    others = torch.ones(len(table), dtype=torch.bool)
    others[ids] = False
    assert not table[others].any()
    # every token of every class name in every template has its trained row
    tok = clip_tokenizer()
    for name in _reduced().task_names:
        task = task_by_name(name)
        used = {i for t in task.templates for c in task.classnames for i in tok(t.format(c))["input_ids"]}
        assert used <= set(ids.tolist()), name


def test_build_fine_tunes_from_the_packaged_backbone(reduced_backbone, tmp_path, monkeypatch):
    from fusion_bench_tsv.benchmark import backbone, build, pretrain

    weights, _ = reduced_backbone
    monkeypatch.setattr(backbone, "BACKBONES", weights.parent)
    monkeypatch.setattr(pretrain, "pretrain_clip", lambda *a, **k: pytest.fail("pretrained instead of loading"))
    out = build.build_benchmark(2, tmp_path, _reduced(), show_pbar=False, export_openclip=False, suite="small_clip",
                                jobs=1)
    report = json.loads((out / "build.json").read_text())
    assert list(report["tasks"]) == ["mnist", "digits"]
    clip = backbone.load_backbone(weights, _reduced())
    from transformers import CLIPModel

    built = CLIPModel.from_pretrained(out / "pretrained").state_dict()
    assert all(torch.equal(built[k], v) for k, v in clip.state_dict().items())
    # a backbone whose bytes no longer match its recipe is refused, naming the file
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in weights.parent.glob("small_clip.*"):
        (bad / path.name).write_bytes(path.read_bytes())
    (bad / "small_clip.safetensors").write_bytes((bad / "small_clip.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="small_clip.safetensors.*fusion-bench-tsv-pretrain"):
        backbone.packaged_backbone(_reduced(), bad)


def test_packaged_backbone_matches_its_recipe_and_the_suite():
    """The backbone the package ships is the one small_clip builds from, and its real-data pools are today's."""
    from fusion_bench_tsv.benchmark.backbone import _real_sources, backbone_files, packaged_backbone
    from fusion_bench_tsv.benchmark.build import SUITES

    weights, recipe_path = backbone_files("small_clip")
    recipe = json.loads(recipe_path.read_text())
    settings = SUITES["small_clip"][0]
    assert recipe["settings"] == dataclasses.asdict(settings) and recipe["complete"]
    assert packaged_backbone(settings) == (weights, recipe["weights_sha256"])
    assert weights.stat().st_size < 4 << 20
    assert settings.real_pools and recipe["real_data"] == _real_sources(settings.task_names)
