"""Contrastive (CLIP) pretraining of the tiny CLIP on the generated image–caption corpus.

Loss: the symmetric InfoNCE of Radford et al. (2021), as ``CLIPModel(return_loss=True)`` computes it.
Each step draws a fresh batch from :func:`~fusion_bench_tsv.benchmark.tasks.caption_corpus_batch`.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPModel

from .tasks import TASK_NAMES, caption_corpus_batch

__all__ = ["to_pixel_values", "cosine_lr", "pretrain_clip"]

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation, as CLIPImageProcessor and open_clip use
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """``N × H × W × 3`` uint8 → normalised ``N × 3 × H × W`` float32, as ``CLIPImageProcessor`` does at
    the model's own resolution (resize and crop are identities there; checked in the tests)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0: the multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_clip(
    model: CLIPModel,
    tokenizer,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.1,
    show_pbar: bool = True,
    task_fraction: float = 0.0,
    tasks: Sequence[str] = tuple(TASK_NAMES),
    name_fraction: float = 0.0,
    real_pools: bool = False,
    on_step: Optional[Callable[[int, np.ndarray, list, torch.Tensor, float], None]] = None,
) -> CLIPModel:
    """Train ``model`` in place with the CLIP loss for ``steps`` steps on fresh corpus batches
    (``task_fraction``, ``tasks``, ``name_fraction``, ``real_pools`` → ``split="train"``: see
    :func:`~fusion_bench_tsv.benchmark.tasks.caption_corpus_batch`). ``on_step(step, images, captions,
    input_ids, loss)`` is called after every step (progress, checkpoints, a hash of the data seen)."""
    size = model.config.vision_config.image_size
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    pbar = tqdm(range(steps), desc="pretraining tiny CLIP", disable=not show_pbar)
    for step in pbar:
        images, captions = caption_corpus_batch(rng, batch_size, size, task_fraction, tasks, name_fraction,
                                                "train" if real_pools else None)
        text = tokenizer(captions, padding=True, return_tensors="pt")
        out = model(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=to_pixel_values(images),
            return_loss=True,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        pbar.set_postfix(loss=f"{out.loss.item():.3f}")
        if on_step is not None:
            on_step(step, images, captions, text["input_ids"], out.loss.item())
    return model.eval()
