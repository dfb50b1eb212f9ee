"""Tiny Hugging Face CLIP models made locally, with the real CLIP tokenizer and no download.

The tokenizer is OpenAI CLIP's byte-level BPE, rebuilt from the merges file that ``open_clip_torch``
ships, so a tiny ``transformers.CLIPModel`` saved here loads with ``CLIPModel.from_pretrained`` and
``CLIPProcessor.from_pretrained`` from a local directory, as FusionBench's CLIP model and task pools
expect.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

__all__ = ["clip_tokenizer", "tiny_clip_config", "make_tiny_clip", "save_clip"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # as OpenAI CLIP / open_clip's SimpleTokenizer


def _bytes_to_unicode() -> dict:
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def clip_tokenizer(directory: Optional[os.PathLike] = None) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (vocabulary 49408) built from open_clip's bundled BPE merges."""
    from open_clip.tokenizer import default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(directory) if directory is not None else Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(
            vocab_file=str(tmp / "vocab.json"),
            merges_file=str(tmp / "merges.txt"),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=EOS,
            unk_token=EOS,
            model_max_length=77,
        )
        tok.init_kwargs.pop("vocab_file", None)
        tok.init_kwargs.pop("merges_file", None)
    return tok


def tiny_clip_config(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 32,
    vision_hidden_size: Optional[int] = None,
) -> CLIPConfig:
    """A small ``CLIPConfig`` with CLIP's vocabulary and context length."""
    vision_hidden = vision_hidden_size or hidden_size
    text = dict(
        vocab_size=len(_bytes_to_unicode()) * 2 + NUM_MERGES + 2,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def make_tiny_clip(seed: int = 0, **config_kwargs) -> CLIPModel:
    """A randomly initialised tiny ``CLIPModel`` (deterministic for a seed)."""
    config = tiny_clip_config(**config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval()


def clip_processor(image_size: int) -> CLIPProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


def save_clip(model: CLIPModel, directory: os.PathLike) -> Path:
    """Save a ``CLIPModel`` with its tokenizer and image processor (``from_pretrained``-loadable)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    clip_processor(model.config.vision_config.image_size).save_pretrained(directory)
    return directory
