"""Synthetic fine-tuned models and image tasks, for tests, demos and benchmarks that cannot download.

Task updates are made the way fine-tuning shapes them: a low-rank part plus small dense noise on
every matrix, and small noise on every other parameter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "synthetic_task_state",
    "random_image_task",
    "write_clip_pool",
    "write_pool_configs",
]


def synthetic_task_state(
    base: Mapping[str, Tensor],
    seed: int,
    rank: int = 4,
    scale: float = 0.02,
    noise: float = 1e-3,
    decay: Optional[float] = None,
) -> Dict[str, Tensor]:
    """θ₀ + a synthetic task update: a rank-``rank`` part plus ``noise·N`` on matrices, noise elsewhere.

    ``decay=None``: the low-rank part is ``scale·A·B`` with Gaussian factors (``rank`` singular values of
    about the same size, entries of RMS ``scale``). ``decay=d``: it is ``P diag(j^(-d)) Qᵀ`` with random
    orthonormal ``P, Q``, rescaled to entries of RMS ``scale``: a smoothly decaying spectrum, as fine-tuned
    task matrices have, so the top-k truncation is well posed at every k below ``rank``.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.items():
        if not torch.is_floating_point(value):
            out[key] = value.clone()
            continue
        work = value.detach().to(torch.float32)
        update = noise * torch.randn(work.shape, generator=gen)
        if work.dim() == 2:
            m, n = work.shape
            k = min(rank, m, n)
            if decay is None:
                a = torch.randn(m, k, generator=gen) / k**0.5
                b = torch.randn(k, n, generator=gen)
                update += scale * (a @ b)
            else:
                p = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
                q = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
                spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** (-decay)
                spectrum *= scale * (m * n) ** 0.5 / spectrum.norm()  # ‖low-rank‖_F = scale·sqrt(mn)
                update += (p * spectrum) @ q.T
        out[key] = (work + update).to(value.dtype)
    return out


def random_image_task(num_classes: int, num_images: int, image_size: int, seed: int) -> tuple[list, List[int]]:
    """Random RGB images with a class-dependent mean colour (learnable but not trivial)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(num_classes, 3))
    labels = rng.integers(0, num_classes, size=num_images)
    images = []
    for y in labels:
        pixels = colours[y] + rng.normal(0, 30, size=(image_size, image_size, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images, [int(y) for y in labels]


def write_clip_pool(
    directory: os.PathLike, pretrained_path: os.PathLike, task_names: Sequence[str], seed: int = 0, **update_kwargs
) -> Dict[str, Path]:
    """Save one synthetic fine-tuned ``CLIPVisionModel`` per task, derived from a saved ``CLIPModel``."""
    from transformers import CLIPVisionModel

    directory = Path(directory)
    base = CLIPVisionModel.from_pretrained(pretrained_path)
    base_state = base.state_dict()
    paths = {}
    for i, task in enumerate(task_names):
        model = CLIPVisionModel(base.config)
        model.load_state_dict(synthetic_task_state(base_state, seed=seed + 1000 * (i + 1), **update_kwargs))
        paths[task] = directory / task
        model.save_pretrained(paths[task])
    return paths


def write_pool_configs(
    config_dir: os.PathLike,
    name: str,
    pretrained_path: os.PathLike,
    task_paths: Mapping[str, os.PathLike],
    data_root: Optional[os.PathLike] = None,
    eval_tasks: Optional[Sequence[str]] = None,
    batch_size: int = 16,
) -> None:
    """Write ``modelpool/CLIPVisionModelPool/<name>.yaml`` and ``taskpool/CLIPVisionModelTaskPool/<name>.yaml``.

    The task pool evaluates ``eval_tasks`` (default: all tasks) from the local datasets in ``data_root``
    (see :mod:`fusion_bench_tsv.benchmark.local_data`); it is omitted when ``data_root`` is None.
    """
    from .configs import clip_modelpool_config, clip_taskpool_config, write_config

    config_dir = Path(config_dir)
    write_config(config_dir / "modelpool" / "CLIPVisionModelPool" / f"{name}.yaml", "",
                 clip_modelpool_config(str(pretrained_path), {t: str(p) for t, p in task_paths.items()}))
    if data_root is None:
        return
    tasks = list(eval_tasks) if eval_tasks is not None else list(task_paths)
    write_config(config_dir / "taskpool" / "CLIPVisionModelTaskPool" / f"{name}.yaml", "",
                 clip_taskpool_config(tasks, str(data_root), str(pretrained_path), batch_size=batch_size))
