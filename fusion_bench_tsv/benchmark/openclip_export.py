"""Export the tiny-CLIP suite in the open_clip task-vector layout (Ilharco et al.), for FusionBench's
``OpenCLIPVisionModelPool`` / ``OpenCLIPVisionModelTaskPool``.

Layout under ``<suite>/openclip``: ``zeroshot.safetensors`` and ``<task>/finetuned.safetensors`` (the
state dict of a ``fusion_bench.models.open_clip.ImageEncoder`` holding an ``open_clip.CLIP`` vision tower,
with the tower's configuration in the file's metadata) and ``head_<task>.safetensors`` (a
``ClassificationHead``: the zero-shot head times ``exp(logit_scale)``, input normalised). Nothing is
pickled: :func:`load_image_encoder` and :func:`load_classification_head` build the module from the
configuration (no download) and load the tensors into it, so a crafted file cannot run code. The model and
head configs of the pools use them as their ``_target_``.

Weight mapping (HF ``CLIPVisionTransformer`` → open_clip ``VisionTransformer``): patch embedding →
``conv1``, class/position embeddings, ``pre_layrnorm`` → ``ln_pre``, q/k/v projections concatenated into
``attn.in_proj_*``, ``out_proj``, ``layer_norm{1,2}`` → ``ln_{1,2}``, ``mlp.fc{1,2}`` → ``mlp.c_{fc,proj}``,
``post_layernorm`` → ``ln_post``, ``visual_projection.weight``ᵀ → ``proj``; quick-GELU as in HF's config.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch

from ..io.atomic import write_atomic
from ..io.safetensors_state import CheckpointError

__all__ = [
    "hf_to_open_clip_visual",
    "make_image_encoder",
    "load_image_encoder",
    "save_image_encoder",
    "make_classification_head",
    "load_classification_head",
    "save_classification_head",
]

_CONFIG_KEY = "fusion_bench_tsv.open_clip"
_CONFIG_FIELDS = ("layers", "width", "heads", "intermediate_size", "patch_size", "image_size", "projection_dim",
                  "quick_gelu", "mean", "std")


def encoder_config(vision_config, projection_dim: int) -> Dict[str, Any]:
    """What :func:`load_image_encoder` needs to rebuild the encoder: the tower's sizes and preprocessing."""
    from .pretrain import CLIP_MEAN, CLIP_STD

    return {
        "layers": vision_config.num_hidden_layers, "width": vision_config.hidden_size,
        "heads": vision_config.num_attention_heads, "intermediate_size": vision_config.intermediate_size,
        "patch_size": vision_config.patch_size, "image_size": vision_config.image_size,
        "projection_dim": int(projection_dim), "quick_gelu": vision_config.hidden_act == "quick_gelu",
        "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
    }


def _open_clip_model(cfg: Dict[str, Any]):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vc = CLIPVisionCfg(layers=cfg["layers"], width=cfg["width"], head_width=cfg["width"] // cfg["heads"],
                       mlp_ratio=cfg["intermediate_size"] / cfg["width"],
                       patch_size=cfg["patch_size"], image_size=cfg["image_size"])
    tc = CLIPTextCfg(context_length=8, vocab_size=16, width=8, heads=1, layers=1)
    model = open_clip.CLIP(cfg["projection_dim"], vc, tc, quick_gelu=cfg["quick_gelu"])
    for name in ("transformer", "token_embedding", "ln_final"):
        if hasattr(model, name):
            delattr(model, name)
    return model


def _empty_image_encoder(cfg: Dict[str, Any]):
    """A FusionBench ``ImageEncoder`` of the configuration ``cfg`` (random weights; no download)."""
    from open_clip.transform import image_transform

    from fusion_bench.models.open_clip import ImageEncoder

    encoder = ImageEncoder.__new__(ImageEncoder)  # ImageEncoder.__init__ downloads pretrained weights
    torch.nn.Module.__init__(encoder)
    encoder.model = _open_clip_model(cfg)
    encoder.train_preprocess = encoder.val_preprocess = image_transform(
        cfg["image_size"], is_train=False, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    encoder.cache_dir = None
    encoder.export_config = dict(cfg)
    return encoder.eval()


def hf_to_open_clip_visual(vision_state: Dict[str, torch.Tensor], projection: torch.Tensor, num_layers: int) -> Dict[str, torch.Tensor]:
    """An open_clip ``visual.*`` state dict from a HF ``CLIPVisionModel`` state dict and the visual projection."""
    s = {k.removeprefix("vision_model."): v for k, v in vision_state.items()}
    out = {
        "conv1.weight": s["embeddings.patch_embedding.weight"],
        "class_embedding": s["embeddings.class_embedding"],
        "positional_embedding": s["embeddings.position_embedding.weight"],
        "ln_pre.weight": s["pre_layrnorm.weight"], "ln_pre.bias": s["pre_layrnorm.bias"],
        "ln_post.weight": s["post_layernorm.weight"], "ln_post.bias": s["post_layernorm.bias"],
        "proj": projection.T.contiguous(),
    }
    for i in range(num_layers):
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[o + "attn.in_proj_weight"] = torch.cat([s[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[o + "attn.in_proj_bias"] = torch.cat([s[h + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        out[o + "attn.out_proj.weight"] = s[h + "self_attn.out_proj.weight"]
        out[o + "attn.out_proj.bias"] = s[h + "self_attn.out_proj.bias"]
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[o + f"{b}.weight"], out[o + f"{b}.bias"] = s[h + f"{a}.weight"], s[h + f"{a}.bias"]
        for a, b in (("fc1", "c_fc"), ("fc2", "c_proj")):
            out[o + f"mlp.{b}.weight"], out[o + f"mlp.{b}.bias"] = s[h + f"mlp.{a}.weight"], s[h + f"mlp.{a}.bias"]
    return out


def make_image_encoder(vision_model, projection: torch.Tensor):
    """A FusionBench ``ImageEncoder`` (open_clip) with the weights of a HF ``CLIPVisionModel``."""
    cfg = vision_model.config
    encoder = _empty_image_encoder(encoder_config(cfg, projection.shape[0]))
    encoder.model.visual.load_state_dict(hf_to_open_clip_visual(vision_model.state_dict(), projection, cfg.num_hidden_layers))
    return encoder


def save_image_encoder(encoder, path: os.PathLike) -> None:
    """Write an encoder made by :func:`make_image_encoder` (or loaded by :func:`load_image_encoder`) as
    safetensors, its configuration in the metadata, atomically."""
    from safetensors.torch import save_file

    config = getattr(encoder, "export_config", None)
    if not isinstance(config, dict):
        raise ValueError("save_image_encoder: the encoder has no export_config (make it with make_image_encoder)")
    tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    write_atomic(path, lambda p: save_file(tensors, str(p), metadata={_CONFIG_KEY: json.dumps(config)}))


def _read_safetensors(path: str, what: str):
    """``(tensors, metadata)`` of a safetensors file; a :class:`CheckpointError` naming ``what`` and the file
    for anything else (a pickle, a damaged file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{what} {path} is not a readable safetensors file ({type(e).__name__}: {e}); rebuild it with "
            "`fusion-bench-tsv-build` (pickled .pt exports are not loaded)"
        ) from e
    return tensors, metadata


def load_image_encoder(path: str):
    """``_target_`` for ``OpenCLIPVisionModelPool`` model configs: an ``ImageEncoder`` built from the
    configuration in the file's metadata, its weights loaded from the file (nothing is unpickled)."""
    tensors, metadata = _read_safetensors(path, "open_clip image encoder")
    try:
        config = json.loads(metadata[_CONFIG_KEY])
        missing = [k for k in _CONFIG_FIELDS if k not in config]
        if missing:
            raise KeyError(missing)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"open_clip image encoder {path}: its metadata has no valid '{_CONFIG_KEY}' ({e})") from e
    encoder = _empty_image_encoder(config)
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"open_clip image encoder {path}: the weights do not fit its configuration: {e}") from e
    return encoder


def make_classification_head(zero_shot_weights: torch.Tensor, logit_scale: float):
    from fusion_bench.models.open_clip import ClassificationHead

    return ClassificationHead(normalize=True, weights=logit_scale * zero_shot_weights)


def save_classification_head(head, path: os.PathLike) -> None:
    """Write a ``ClassificationHead`` (weight, bias, normalize) as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
    write_atomic(path, lambda p: save_file(tensors, str(p), metadata={"normalize": json.dumps(bool(head.normalize))}))


def load_classification_head(path: str):
    """``_target_`` for the classification heads of the open_clip pools: a ``ClassificationHead`` from a file
    written by :func:`save_classification_head`."""
    from fusion_bench.models.open_clip import ClassificationHead

    tensors, metadata = _read_safetensors(path, "open_clip classification head")
    if set(tensors) != {"weight", "bias"} or "normalize" not in metadata:
        raise CheckpointError(f"open_clip classification head {path}: expected tensors weight and bias and a "
                              f"'normalize' metadata entry, found {sorted(tensors)} and {sorted(metadata)}")
    return ClassificationHead(normalize=json.loads(metadata["normalize"]), weights=tensors["weight"],
                              biases=tensors["bias"])
