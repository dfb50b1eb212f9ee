"""Fine-tuning one vision tower per task with the frozen zero-shot head (the task-arithmetic protocol).

Ilharco et al. (2023) fine-tune the image encoder of CLIP with a classification head made from the
text tower (class names × templates, averaged and normalised) and keep that head frozen. Here the head
is built by FusionBench's own ``HFCLIPClassifier.set_classification_task`` so that training and
evaluation use the same zero-shot weights; ``logits = exp(logit_scale) · norm(P·f(x)) · Wᵀ`` with the
pretrained visual projection P frozen too (``CLIPVisionModel`` has no projection).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPVisionModel

from .pretrain import cosine_lr, to_pixel_values

__all__ = ["zero_shot_head", "clip_logits", "finetune_vision_tower", "accuracy"]


@torch.no_grad()
def zero_shot_head(clip: CLIPModel, processor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``C × d`` unit-norm text embeddings, as FusionBench's task pool computes them."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier

    classifier = HFCLIPClassifier(clip, processor=processor)
    classifier.set_classification_task(list(classnames), [t.format for t in templates])
    return classifier.zeroshot_weights.detach().clone()


def clip_logits(vision: CLIPVisionModel, projection: torch.nn.Module, head: torch.Tensor, scale: float,
                pixel_values: torch.Tensor) -> torch.Tensor:
    feats = projection(vision(pixel_values=pixel_values).pooler_output)
    return scale * F.normalize(feats, dim=-1) @ head.T


@torch.no_grad()
def accuracy(vision, projection, head, scale, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    vision.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = clip_logits(vision, projection, head, scale, to_pixel_values(images[i : i + batch_size]))
        correct += int((logits.argmax(-1) == torch.from_numpy(labels[i : i + batch_size])).sum())
    return correct / len(images)


def finetune_vision_tower(
    clip: CLIPModel,
    head: torch.Tensor,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.1,
    desc: str = "fine-tuning",
    show_pbar: bool = True,
) -> CLIPVisionModel:
    """A copy of ``clip``'s vision tower fine-tuned on ``(images, labels)`` with the frozen ``head``."""
    torch.manual_seed(seed)
    vision = CLIPVisionModel(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    weight = clip.visual_projection.weight.detach()  # frozen, and ``clip`` is left untouched
    projection = lambda f: f @ weight.T  # noqa: E731  (CLIP's projection has no bias)
    scale = float(clip.logit_scale.detach().exp())
    gen = torch.Generator().manual_seed(seed)
    pixels = to_pixel_values(images)
    targets = torch.from_numpy(labels)
    vision.train()
    opt = torch.optim.AdamW(vision.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 10)))
    pbar = tqdm(range(steps), desc=desc, disable=not show_pbar, leave=False)
    for _ in pbar:
        idx = torch.randint(len(pixels), (batch_size,), generator=gen)
        loss = F.cross_entropy(clip_logits(vision, projection, head, scale, pixels[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pbar.set_postfix(loss=f"{loss.item():.3f}")
    return vision.eval()
