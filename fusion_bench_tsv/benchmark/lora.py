"""A LoRA pool for the offline tiny-CLIP benchmark: rank-deficient task updates, as FusionBench's LoRA pools.

FusionBench's ``CLIPVisionModelPool/clip-vit-base-patch16_TA8_lora`` loads each task as PEFT LoRA adapters on
the vision transformer, merged with ``merge_and_unload`` by
``fusion_bench.models.linearized.vision_model.load_lora_vision_model_hf``: every task update of an adapted
matrix then has rank ≤ the adapter rank r. Here the adapters are trained with ``peft`` on the benchmark's
task data (the frozen zero-shot head of :mod:`.finetune`, the same data and seeds as the full fine-tuning of
:mod:`.build`) and saved with ``PeftModel.save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors``), the layout that loader reads from a local directory:

    <suite_dir>/lora/<task>/            one adapter per task (base: <suite_dir>/pretrained)
    <suite_dir>/lora/build.json         settings and per-task test accuracy (zero-shot, LoRA)

``python -m fusion_bench_tsv.benchmark.lora`` builds it after ``fusion-bench-tsv-build``; the model pool is
``config/modelpool/CLIPVisionModelPool/tiny_clip_8_lora.yaml`` (:func:`lora_modelpool_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.atomic import write_atomic, write_dir_atomic

__all__ = [
    "LoraSettings",
    "LOADER",
    "lora_config",
    "finetune_lora",
    "save_lora_adapter",
    "lora_modelpool_config",
    "build_lora_pool",
    "main",
]

log = logging.getLogger(__name__)

#: FusionBench's loader of a LoRA task model (the ``_target_`` of its LoRA pools).
LOADER = "fusion_bench.models.linearized.vision_model.load_lora_vision_model_hf"
#: FusionBench's loader of the matching pretrained vision transformer (same state-dict keys).
BASE_LOADER = "fusion_bench.models.linearized.vision_model.load_fft_vision_model_hf"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape and training (the data are the benchmark's own training splits)."""

    rank: int = 4
    alpha: float = 8.0
    target_modules: tuple = ("q_proj", "v_proj")
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoRA option '{name}' must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0) or not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRA options 'lr' and 'alpha' must be positive numbers, got lr={self.lr!r}, alpha={self.alpha!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoRA option 'target_modules' must list module names, got {self.target_modules!r}")


def lora_config(settings: LoraSettings):
    """The ``peft.LoraConfig`` of the adapters: ``W + (alpha / rank) · B A`` on ``target_modules``."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.target_modules), lora_dropout=0.0,
        bias="none",
    )


def finetune_lora(clip, head: torch.Tensor, images: np.ndarray, labels: np.ndarray, settings: LoraSettings,
                  seed: int, show_pbar: bool = False):
    """LoRA adapters on a copy of ``clip``'s vision transformer, trained with the frozen zero-shot ``head``
    and visual projection (as :func:`.finetune.finetune_vision_tower`, only the adapters learn)."""
    from peft import get_peft_model
    from tqdm.auto import tqdm
    from transformers import CLIPVisionModel

    from .finetune import clip_logits
    from .pretrain import cosine_lr, to_pixel_values

    torch.manual_seed(seed)  # A's initialisation
    vision = CLIPVisionModel(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    model = get_peft_model(vision.vision_model, lora_config(settings))  # on CLIPVisionTransformer, as the loader
    weight = clip.visual_projection.weight.detach()
    scale = float(clip.logit_scale.detach().exp())
    gen = torch.Generator().manual_seed(seed)
    pixels, targets = to_pixel_values(images), torch.from_numpy(labels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, settings.steps, max(1, settings.steps // 10)))
    model.train()
    for _ in tqdm(range(settings.steps), desc="LoRA fine-tuning", disable=not show_pbar, leave=False):
        idx = torch.randint(len(pixels), (settings.batch_size,), generator=gen)
        loss = F.cross_entropy(clip_logits(model, lambda f: f @ weight.T, head, scale, pixels[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def save_lora_adapter(model, path: os.PathLike) -> Path:
    """Write the adapters atomically (a complete directory or none) in PEFT's layout."""
    return write_dir_atomic(path, lambda tmp: model.save_pretrained(str(tmp)))


def lora_modelpool_config(tasks: Sequence[str], suite_dir: str, lora_dir: str = "lora") -> dict:
    """A ``CLIPVisionModelPool`` config: ``_pretrained_`` and every task through FusionBench's own loaders
    (``merge_and_unload: true``), so all models are ``CLIPVisionTransformer`` with the same keys."""
    base = f"{suite_dir}/pretrained"
    models = {"_pretrained_": {"_target_": BASE_LOADER, "model_name": base}}
    for task in tasks:
        models[task] = {"_target_": LOADER, "base_model_name": base, "peft_name": f"{suite_dir}/{lora_dir}/{task}",
                        "merge_and_unload": True}
    return {"_target_": "fusion_bench.modelpool.CLIPVisionModelPool", "_recursive_": False, "processor": base,
            "models": models, "platform": "hf"}


def build_lora_pool(num_tasks: int = 8, root: Optional[os.PathLike] = None, settings: LoraSettings = LoraSettings(),
                    show_pbar: bool = True) -> Path:
    """Train and save one adapter per task of a built benchmark (``fusion-bench-tsv-build``); returns the
    ``lora`` directory. Adapters already there with the same settings are kept."""
    from transformers import CLIPModel, CLIPProcessor

    from .build import BuildSettings, _seed, suite_dir
    from .finetune import accuracy, zero_shot_head
    from .tasks import TASKS, make_split

    suite = suite_dir(root)
    pre, built = suite / "pretrained", suite / "build.json"
    if not ((pre / "config.json").is_file() and built.is_file()):
        raise FileNotFoundError(f"no built benchmark at {suite}: run `fusion-bench-tsv-build --num-tasks {num_tasks}` first")
    if not 1 <= num_tasks <= len(TASKS):
        raise ValueError(f"num_tasks must be in 1..{len(TASKS)}, got {num_tasks}")
    torch.set_num_threads(1)  # deterministic, and no OpenMP oversubscription (see build.py)
    s, out = BuildSettings(**json.loads(built.read_text())["settings"]), suite / "lora"  # the build's data
    clip = CLIPModel.from_pretrained(pre).eval()
    processor = CLIPProcessor.from_pretrained(pre)
    scale = float(clip.logit_scale.detach().exp())
    report_path = out / "build.json"
    wanted = dataclasses.asdict(settings)
    wanted["target_modules"] = list(settings.target_modules)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if report.get("settings") != wanted:
        report = {"settings": wanted, "tasks": {}}
    for task in TASKS[:num_tasks]:
        if task.name in report["tasks"] and (out / task.name / "adapter_config.json").is_file():
            continue
        train = make_split(task, s.train_size, s.image_size, _seed(s, task.name, "train"))
        test = make_split(task, s.test_size, s.image_size, _seed(s, task.name, "test"))
        head = zero_shot_head(clip, processor, task.classnames, task.templates)
        model = finetune_lora(clip, head, *train, settings, seed=_seed(s, task.name, "lora", str(settings.seed)),
                              show_pbar=show_pbar)
        save_lora_adapter(model, out / task.name)
        report["tasks"][task.name] = {
            "zero_shot_test": accuracy(clip.vision_model, clip.visual_projection, head, scale, *test),
            "lora_test": accuracy(model.merge_and_unload(), clip.visual_projection, head, scale, *test),
        }
        write_atomic(report_path, lambda p: p.write_text(json.dumps(report, indent=1)))
        log.info("LoRA %s: %s", task.name, report["tasks"][task.name])
    return out


def main(argv=None) -> None:
    """``python -m fusion_bench_tsv.benchmark.lora``: LoRA adapters for the first tasks of the built benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-tasks", type=int, default=8)
    parser.add_argument("--root", default=None, help="benchmark root (default: as fusion-bench-tsv-build)")
    fields = [f for f in dataclasses.fields(LoraSettings) if f.name != "target_modules"]
    for field in fields:
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=f"LoRA {field.name} (default {field.default})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        print(build_lora_pool(args.num_tasks, args.root, LoraSettings(**{f.name: getattr(args, f.name) for f in fields})))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
