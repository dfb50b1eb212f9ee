"""The offline tiny-CLIP benchmark: task generators, a 3-task mini build, its cache, determinism and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from support import REPO_ROOT, run_fusion_bench
from oracles import assert_within, roundoff_bound

MINI = dict(pretrain_steps=20, pretrain_batch=32, finetune_steps=15, finetune_batch=16,
            train_size=48, val_size=12, test_size=24)


def test_tasks_are_distinct_and_deterministic():
    from fusion_bench_tsv.benchmark.tasks import TASKS, make_split

    assert len(TASKS) == 20 and len({t.name for t in TASKS}) == 20
    assert len({t.num_classes for t in TASKS}) >= 5  # different class counts
    for task in TASKS:
        a, ya = make_split(task, 2 * task.num_classes, 32, seed=3)
        b, yb = make_split(task, 2 * task.num_classes, 32, seed=3)
        assert a.shape == (2 * task.num_classes, 32, 32, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
        assert sorted(set(ya.tolist())) == list(range(task.num_classes)), task.name


def test_classnames_tokenize_without_unknown_tokens():
    from fusion_bench_tsv.benchmark.tasks import ALL_TASKS
    from fusion_bench_tsv.benchmark.tiny_clip import clip_tokenizer

    tok = clip_tokenizer()
    for task in ALL_TASKS:
        for name in task.classnames:
            ids = tok(task.templates[0].format(name))["input_ids"]
            assert tok.unk_token_id not in ids[1:-1], (task.name, name)


def test_task_corpus_words_are_single_tokens_and_never_class_words():
    """The pretraining corpus captions task images with one unrelated noun per class (``small_clip``): each word is
    one BPE token, no two classes share one, and none occurs in a class name or template (zero-shot stays a test
    of the class names)."""
    from fusion_bench_tsv.benchmark.tasks import ALL_TASKS, caption_corpus_batch, code_word
    from fusion_bench_tsv.benchmark.tiny_clip import clip_tokenizer

    tok = clip_tokenizer()
    words = [code_word(i, c) for i, t in enumerate(ALL_TASKS) for c in range(t.num_classes)]
    assert len(set(words)) == len(words)
    task_text = " ".join(" ".join(t.classnames + t.templates) for t in ALL_TASKS).replace(".", " ").split()
    for w in words:
        assert len(tok(w)["input_ids"]) == 3, w  # <start> word <end>
        assert w not in task_text, w
    images, captions = caption_corpus_batch(np.random.default_rng(0), 64, 32, task_fraction=0.5)
    assert images.shape == (64, 32, 32, 3)
    assert 16 <= sum(c.split()[-1].rstrip(".") in words for c in captions) <= 48  # ~half from the tasks
    # without task images the corpus is the tiny suite's, draw for draw
    a, ca = caption_corpus_batch(np.random.default_rng(1), 8, 32)
    b, cb = caption_corpus_batch(np.random.default_rng(1), 8, 32, task_fraction=0.0)
    np.testing.assert_array_equal(a, b)
    assert ca == cb


def test_pixel_values_match_clip_image_processor():
    from PIL import Image

    from fusion_bench_tsv.benchmark.pretrain import to_pixel_values
    from fusion_bench_tsv.benchmark.tasks import TASKS, make_split
    from fusion_bench_tsv.benchmark.tiny_clip import clip_processor

    images, _ = make_split(TASKS[2], 4, 32, seed=0)
    ref = clip_processor(32)(images=[Image.fromarray(x) for x in images], return_tensors="pt")["pixel_values"]
    # (x/255 − mean)/std: a few float32 roundings of values of size max|ref| on either side
    assert_within(to_pixel_values(images), ref, roundoff_bound(torch.float32, 1, ref.abs().max().item()), "pixels")


@pytest.fixture(scope="module")
def mini_build(tmp_path_factory):
    from fusion_bench_tsv.benchmark.build import BuildSettings, build_benchmark

    root = tmp_path_factory.mktemp("bench")
    settings = BuildSettings(**MINI)
    return build_benchmark(3, root, settings, show_pbar=False), settings


def test_mini_build_layout_and_cache(mini_build):
    from fusion_bench_tsv.benchmark.build import build_benchmark
    from fusion_bench_tsv.benchmark.tasks import TASK_NAMES

    out, settings = mini_build
    assert (out / "pretrained" / "config.json").is_file()
    for task in TASK_NAMES[:3]:
        for split in ("train", "validation", "test"):
            assert (out / "data" / task / f"{split}.parquet").is_file()
        assert (out / "models" / task / "config.json").is_file()
    report = json.loads((out / "build.json").read_text())
    assert set(report["tasks"]) == set(TASK_NAMES[:3])
    weights = out / "models" / TASK_NAMES[0] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    build_benchmark(3, out.parent, settings, show_pbar=False)  # same settings: everything reused
    assert weights.stat().st_mtime_ns == before


def test_rebuild_gives_the_same_weights(mini_build, tmp_path):
    from safetensors.torch import load_file

    from fusion_bench_tsv.benchmark.build import BuildSettings, build_benchmark
    from fusion_bench_tsv.benchmark.tasks import TASK_NAMES

    out, settings = mini_build
    # two worker processes fine-tune the two tasks side by side: the same weights as one after the other
    other = build_benchmark(2, tmp_path, settings, show_pbar=False, jobs=2)
    for task in TASK_NAMES[:2]:
        a = load_file(out / "models" / task / "model.safetensors")
        b = load_file(other / "models" / task / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (task, k)
    built = json.loads((out / "build.json").read_text())["tasks"]
    assert json.loads((other / "build.json").read_text())["tasks"] == {t: built[t] for t in TASK_NAMES[:2]}
    # a different fine-tuning setting is a different content hash
    assert BuildSettings(**{**MINI, "finetune_lr": 3e-3}).finetune_hash("shapes") != settings.finetune_hash("shapes")


def test_committed_configs_are_current(tmp_path):
    from fusion_bench_tsv.benchmark.build import SUITES
    from fusion_bench_tsv.benchmark.configs import suite_config_dir, write_suite_configs

    for suite in SUITES:
        write_suite_configs(tmp_path, suite_config_dir(suite), name=suite, suite=suite)
    for path in tmp_path.rglob("*.yaml"):
        committed = REPO_ROOT / "config" / path.relative_to(tmp_path)
        assert committed.is_file() and committed.read_text() == path.read_text(), committed


@pytest.mark.cli
@pytest.mark.parametrize("family", ["CLIPVision", "OpenCLIPVision"])
def test_fusion_bench_cli_on_mini_build(mini_build, tmp_path, family):
    """TSV-M through the CLI on the mini build, from the HF pool and from the open_clip export."""
    from fusion_bench_tsv.benchmark.configs import write_suite_configs
    from fusion_bench_tsv.benchmark.tasks import TASK_NAMES

    out, _ = mini_build
    write_suite_configs(tmp_path / "config", suite_dir=str(out), sizes=[3], name="mini")
    report = tmp_path / "report.json"
    proc = run_fusion_bench(
        ["--config-dir", str(tmp_path / "config"), "method=tsv/tsv_merge", f"modelpool={family}ModelPool/mini_3",
         f"taskpool={family}ModelTaskPool/mini_3", f"report_save_path={report}", "print_config=false"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Unused argument" not in log, [line for line in log.splitlines() if "Unused argument" in line]
    result = json.loads(report.read_text())
    for task in TASK_NAMES[:3]:
        assert 0.0 <= result[task]["accuracy"] <= 1.0


def test_openclip_export_matches_hf_tower():
    import torch
    from transformers import CLIPVisionModel

    from fusion_bench_tsv.benchmark.openclip_export import make_image_encoder
    from fusion_bench_tsv.benchmark.tiny_clip import make_tiny_clip

    clip = make_tiny_clip(seed=1, hidden_size=64, num_layers=2, num_heads=2, image_size=32, patch_size=8, projection_dim=48)
    vision = CLIPVisionModel(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    encoder = make_image_encoder(vision, clip.visual_projection.weight.detach())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = clip.visual_projection(vision(pixel_values=x).pooler_output)
        got = encoder(x)
    # the same float32 forward pass with other op orders: each of the 2 layers' length-64 inner products and
    # the projection adds c·√64·ε₃₂ relative to the activations; LayerNorm keeps them O(1), so × (2 + 1) layers
    assert_within(got, ref, 3 * roundoff_bound(torch.float32, 64, ref.abs().max().item()), "open_clip export")


def test_build_help_explains_every_setting(capsys):
    import dataclasses

    import argparse

    from fusion_bench_tsv.benchmark.build import BuildSettings, _parser, main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for f in dataclasses.fields(BuildSettings):
        doc = " ".join(f.metadata.get("doc", "").split())
        assert doc, f"BuildSettings.{f.name} has no doc"
        assert f"{doc} (default: tiny_clip {f.default!r}, small_clip " in text, f.name
    # and every other option says what it does and what happens without it
    for action in _parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and "default" in action.help, action.option_strings
