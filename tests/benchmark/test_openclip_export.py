"""benchmark/openclip_export.py: open_clip checkpoints are never unpickled and round-trip through
FusionBench's OpenCLIP pools."""

from __future__ import annotations

import pickle

import pytest
import torch


class _Payload:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_open_clip_loaders_never_unpickle(tmp_path):
    from fusion_bench_tsv.benchmark.openclip_export import load_classification_head, load_image_encoder

    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "finetuned.pt"
    crafted.write_bytes(pickle.dumps(_Payload(str(marker))))
    for loader in (load_image_encoder, load_classification_head):
        with pytest.raises(ValueError, match=rf"{crafted} is not a readable safetensors file"):
            loader(str(crafted))
        assert not marker.exists(), f"{loader.__name__} ran the pickle's payload"


def _tiny_encoder():
    from transformers import CLIPVisionModel

    from fusion_bench_tsv.benchmark.openclip_export import make_image_encoder
    from fusion_bench_tsv.benchmark.tiny_clip import make_tiny_clip

    clip = make_tiny_clip(seed=1, hidden_size=32, num_layers=1, num_heads=2, image_size=32, patch_size=8, projection_dim=24)
    vision = CLIPVisionModel(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    return make_image_encoder(vision, clip.visual_projection.weight.detach())


def test_open_clip_export_round_trip_through_fusion_bench_pools(tmp_path):
    """The safetensors export loads through OpenCLIPVisionModelPool's ``_target_`` configs, model and head."""
    import fusion_bench_tsv  # noqa: F401  (compat shim for fusion-bench's OpenCLIP code)
    from fusion_bench.modelpool import OpenCLIPVisionModelPool
    from fusion_bench.modelpool.openclip_vision.modelpool import load_classifier_head
    from omegaconf import OmegaConf

    from fusion_bench_tsv.benchmark.openclip_export import (
        make_classification_head,
        save_classification_head,
        save_image_encoder,
    )

    encoder = _tiny_encoder()
    head = make_classification_head(torch.randn(5, 24), 10.0)
    save_image_encoder(encoder, tmp_path / "zeroshot.safetensors")
    save_classification_head(head, tmp_path / "head_x.safetensors")
    target = "fusion_bench_tsv.benchmark.openclip_export."
    pool = OpenCLIPVisionModelPool(
        models=OmegaConf.create({"_pretrained_": {"_target_": target + "load_image_encoder",
                                                  "path": str(tmp_path / "zeroshot.safetensors")}}),
        classification_heads=OmegaConf.create({"x": {"_target_": target + "load_classification_head",
                                                     "path": str(tmp_path / "head_x.safetensors")}}),
    )
    loaded = pool.load_model("_pretrained_")
    loaded_head = load_classifier_head(pool._classification_heads["x"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))
        assert torch.equal(loaded_head(loaded(images)), head(encoder(images)))
    assert loaded.val_preprocess is not None and pool.test_processor is not None
