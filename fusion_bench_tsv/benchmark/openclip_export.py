"""Export the tiny-CLIP suite in the open_clip task-vector layout (Ilharco et al.), for FusionBench's
``OpenCLIPVisionModelPool`` / ``OpenCLIPVisionModelTaskPool``.

Layout under ``<suite>/openclip``: ``zeroshot.pt`` and ``<task>/finetuned.pt`` (pickled
``fusion_bench.models.open_clip.ImageEncoder`` holding an ``open_clip.CLIP`` vision tower built from a
custom config, no download) and ``head_<task>.pt`` (pickled ``ClassificationHead``: the zero-shot head
times ``exp(logit_scale)``, input normalised). FusionBench's modelpool loads a *string* checkpoint
with ``torch.load(weights_only=True)``, which refuses pickled modules, so the model configs use
:func:`load_image_encoder` as their ``_target_``.

Weight mapping (HF ``CLIPVisionTransformer`` → open_clip ``VisionTransformer``): patch embedding →
``conv1``, class/position embeddings, ``pre_layrnorm`` → ``ln_pre``, q/k/v projections concatenated into
``attn.in_proj_*``, ``out_proj``, ``layer_norm{1,2}`` → ``ln_{1,2}``, ``mlp.fc{1,2}`` → ``mlp.c_{fc,proj}``,
``post_layernorm`` → ``ln_post``, ``visual_projection.weight``ᵀ → ``proj``; quick-GELU as in HF's config.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from ..atomic import write_atomic

__all__ = ["hf_to_open_clip_visual", "make_image_encoder", "load_image_encoder", "make_classification_head", "save_module"]


def _open_clip_model(vision_config, projection_dim: int):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vc = CLIPVisionCfg(layers=vision_config.num_hidden_layers, width=vision_config.hidden_size,
                       head_width=vision_config.hidden_size // vision_config.num_attention_heads,
                       mlp_ratio=vision_config.intermediate_size / vision_config.hidden_size,
                       patch_size=vision_config.patch_size, image_size=vision_config.image_size)
    tc = CLIPTextCfg(context_length=8, vocab_size=16, width=8, heads=1, layers=1)
    model = open_clip.CLIP(projection_dim, vc, tc, quick_gelu=vision_config.hidden_act == "quick_gelu")
    for name in ("transformer", "token_embedding", "ln_final"):
        if hasattr(model, name):
            delattr(model, name)
    return model


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
    from open_clip.transform import image_transform

    from fusion_bench.models.open_clip import ImageEncoder

    from .pretrain import CLIP_MEAN, CLIP_STD

    cfg = vision_model.config
    encoder = ImageEncoder.__new__(ImageEncoder)  # ImageEncoder.__init__ downloads pretrained weights
    torch.nn.Module.__init__(encoder)
    encoder.model = _open_clip_model(cfg, projection.shape[0])
    encoder.model.visual.load_state_dict(hf_to_open_clip_visual(vision_model.state_dict(), projection, cfg.num_hidden_layers))
    encoder.train_preprocess = encoder.val_preprocess = image_transform(cfg.image_size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    encoder.cache_dir = None
    return encoder.eval()


def make_classification_head(zero_shot_weights: torch.Tensor, logit_scale: float):
    from fusion_bench.models.open_clip import ClassificationHead

    return ClassificationHead(normalize=True, weights=logit_scale * zero_shot_weights)


def load_image_encoder(path: str):
    """``_target_`` for ``OpenCLIPVisionModelPool`` model configs: unpickle an exported ``ImageEncoder``."""
    import fusion_bench.models.open_clip  # noqa: F401  (the pickled class)

    return torch.load(path, map_location="cpu", weights_only=False)


def save_module(module: torch.nn.Module, path: os.PathLike) -> None:
    write_atomic(path, lambda p: torch.save(module, p))
