"""Build (or reuse) the offline tiny-CLIP benchmark: ``fusion-bench-tsv-build --num-tasks 8``.

Layout under ``<root>/tiny_clip`` (``root``: ``--root``, else ``$FUSION_BENCH_TSV_DATA``, else
``~/.cache/fusion_bench_tsv``), which the YAML configs in ``config/*/…/tiny_clip_{8,14,20}.yaml`` read:

- ``pretrained/``: the contrastively pretrained ``CLIPModel`` with tokenizer and image processor;
- ``data/<task>/{train,validation,test}.parquet`` + ``classes.json`` (see :mod:`fusion_bench_tsv.benchmark.local_data`);
- ``models/<task>/``: the fine-tuned ``CLIPVisionModel`` of each task (``save_pretrained``);
- ``openclip/``: the same models in the open_clip task-vector layout, as safetensors (:mod:`.openclip_export`);
- ``build.json``: the settings and the accuracies measured while building.

Every artefact carries a ``.build_hash`` stamp: the SHA-256 of the settings it depends on. A stage whose
stamp matches is reused, so building 20 tasks after 8 only adds 12; a change of settings rebuilds what it
touches. Training is seeded and single-threaded, so the same settings give bit-identical weights with the
same torch build on the same kind of CPU; another torch version gives (slightly) different weights. Every stage
is written into a temporary directory and moved into place atomically
(:func:`~fusion_bench_tsv.io.atomic.write_dir_atomic`), so an interrupted build leaves no partial artefact.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..io.atomic import write_atomic, write_dir_atomic
from .data_root import DATA_ROOT_VAR, data_root

__all__ = ["BuildSettings", "SUITES", "DEFAULT_SUITE", "default_root", "suite_dir", "suite_tasks", "build_benchmark",
           "main"]

log = logging.getLogger(__name__)

BUILD_VERSION = 2  # bump when the generators or the training code change what they produce
TASK_CORPUS_VERSION = 3  # bump when the task part of the pretraining corpus (tasks.caption_corpus_batch) changes
OPENCLIP_EXPORT_VERSION = 2  # bump when the open_clip export's files change (2: safetensors, nothing pickled)
STAMP = ".build_hash"
ENV_VAR = DATA_ROOT_VAR


def _setting(default, doc: str):
    """A :class:`BuildSettings` field with its meaning (shown by ``fusion-bench-tsv-build --help``)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


#: settings added after the first builds, which enter ``build.json`` and the pretraining stamp only when set
_ADDED_LATER = ("pretrain_name_fraction", "real_pools", "tasks")


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything the built artefacts depend on (their content hash is taken over these fields)."""

    seed: int = _setting(0, "seed of everything random: initialisation, data, training batches")
    image_size: int = _setting(32, "side of the square RGB images, in pixels")
    patch_size: int = _setting(8, "side of a ViT patch, in pixels")
    width: int = _setting(64, "hidden size of the vision and text transformers")
    layers: int = _setting(2, "transformer layers per tower")
    heads: int = _setting(2, "attention heads per layer")
    projection_dim: int = _setting(64, "size of the joint image-text embedding")
    pretrain_steps: int = _setting(300, "contrastive (CLIP loss) pretraining steps, AdamW with warm-up + cosine decay")
    pretrain_batch: int = _setting(64, "image-caption pairs per pretraining step")
    pretrain_lr: float = _setting(1e-3, "peak pretraining learning rate")
    pretrain_threads: int = _setting(1, "torch threads of the pretraining (a fixed number, whatever the CPU has, so "
                                        "the weights do not depend on the machine's cores)")
    pretrain_task_fraction: float = _setting(0.0, "share of pretraining images drawn from the suite's tasks (train "
                                                  "splits only), captioned with unrelated nouns, one per class")
    pretrain_name_fraction: float = _setting(0.0, "share of those task images captioned with the class name in one "
                                                  "of the task's templates instead of the noun")
    real_pools: int = _setting(0, "1: each split of a real data set (digits, mnist) draws from its own disjoint pool "
                                  "and pretraining from the train pools only; 0: every split draws from the whole set")
    tasks: str = _setting("", "the suite's tasks in order, comma-separated (empty: the 20 procedural tasks of "
                              "tiny_clip); the N-task suite is the first N")
    finetune_steps: int = _setting(300, "fine-tuning steps per task (vision tower only, frozen zero-shot head)")
    finetune_batch: int = _setting(64, "images per fine-tuning step")
    finetune_lr: float = _setting(1e-3, "peak fine-tuning learning rate")
    train_size: int = _setting(500, "training images per task")
    val_size: int = _setting(100, "validation images per task")
    test_size: int = _setting(200, "test images per task")

    @property
    def task_names(self) -> list:
        from .tasks import TASK_NAMES, task_by_name

        names = [n.strip() for n in self.tasks.split(",") if n.strip()] if self.tasks else list(TASK_NAMES)
        for name in names:
            task_by_name(name)
        return names

    def _set(self, *names: str) -> list:
        """Those of ``names`` not at their defaults: settings added later enter ``build.json`` and the stamps only
        when set, so earlier builds keep their reports and stamps."""
        defaults = BuildSettings()
        return [n for n in names if getattr(self, n) != getattr(defaults, n)]

    def record(self) -> dict:
        """The settings as ``build.json`` stores them (:data:`_ADDED_LATER` only when set)."""
        omitted = set(_ADDED_LATER) - set(self._set(*_ADDED_LATER))
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in omitted}

    def digest(self, *fields: str, extra: str = "") -> str:
        values = {f: getattr(self, f) for f in fields}
        blob = json.dumps({"v": BUILD_VERSION, **values, "extra": extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def pretrain_hash(self) -> str:
        fields = ["seed", "image_size", "patch_size", "width", "layers", "heads", "projection_dim",
                  "pretrain_steps", "pretrain_batch", "pretrain_lr"]
        fields += self._set("pretrain_threads", *_ADDED_LATER)  # only when set: earlier builds keep their stamps
        if self.pretrain_task_fraction:
            return self.digest(*fields, "pretrain_task_fraction", extra=f"task corpus {TASK_CORPUS_VERSION}")
        return self.digest(*fields)

    def data_hash(self, task: str) -> str:
        from .tasks import task_by_name

        extra = f"{task}/pools" if self.real_pools and task_by_name(task).real else task
        return self.digest("seed", "image_size", "train_size", "val_size", "test_size", extra=extra)

    def finetune_hash(self, task: str, backbone: str = "") -> str:
        """``backbone``: the SHA-256 of a packaged backbone's weights, when the build starts from one."""
        return self.digest("finetune_steps", "finetune_batch", "finetune_lr",
                           extra=f"{self.pretrain_hash}{backbone}/{self.data_hash(task)}")


#: small_clip's tasks: the two real digit data sets first, then the procedural tasks (``combos`` left out)
SMALL_CLIP_TASKS = ("mnist,digits,colors,textures,counts,positions,orientations,shapes,sizes,brightness,gradients,"
                    "stripe_frequency,backgrounds,arrows,letters,rings,symmetry,pairs,image_noise,color_digits")

#: The suites: name -> (settings, one line on what it is for). ``tiny_clip`` is fast (tests); ``small_clip``
#: fine-tunes from a backbone pretrained once, long, on a corpus that also holds its tasks' train images, and
#: shipped in the package (:mod:`.backbone`): fine-tuning then aligns features the model already has, as at
#: scale. Its settings were chosen with ``benchmarks/suite_search.py`` (docs/benchmark.md).
SUITES: Dict[str, Tuple[BuildSettings, str]] = {
    "tiny_clip": (BuildSettings(), "2-layer width-64 ViT, seconds per task: tests"),
    "small_clip": (
        BuildSettings(patch_size=4, pretrain_steps=8000, pretrain_threads=1, pretrain_task_fraction=0.5,
                      finetune_lr=8e-4, real_pools=1, tasks=SMALL_CLIP_TASKS),
        "ViT with 4-pixel patches (65 tokens) fine-tuned from the backbone the package ships (pretrained long on "
        "a corpus that covers the tasks' train images), MNIST and scikit-learn's digits first: the suite in the "
        "paper's regime, and the demo's",
    ),
}
DEFAULT_SUITE = "tiny_clip"


def suite_tasks(suite: str) -> list:
    """The task names of ``suite`` in order (its N-task suite is the first N)."""
    return SUITES[suite][0].task_names


def default_root() -> Path:
    return Path(data_root())


def suite_dir(root: Optional[os.PathLike] = None, suite: str = DEFAULT_SUITE) -> Path:
    return Path(root if root is not None else default_root()) / suite


def _stamped(path: Path, digest: str) -> bool:
    return (path / STAMP).is_file() and (path / STAMP).read_text().strip() == digest


def _publish(final: Path, digest: str, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary directory, stamp it with ``digest`` and move it to ``final``
    atomically (replacing a stale one)."""
    def stamped(tmp: Path) -> None:
        write(tmp)
        (tmp / STAMP).write_text(digest)

    write_dir_atomic(final, stamped)


def _openclip_stamp(digest: str) -> str:
    return f"{digest}-openclip{OPENCLIP_EXPORT_VERSION}"


def _seed(settings: BuildSettings, *parts: str) -> int:
    return int(hashlib.sha256("/".join([str(settings.seed), *parts]).encode()).hexdigest()[:8], 16)


# longer than ~60 lines: the build's steps in order (pretrain, tasks, fine-tunes, exports), each a call
def build_benchmark(
    num_tasks: int = 20,
    root: Optional[os.PathLike] = None,
    settings: Optional[BuildSettings] = None,
    show_pbar: bool = True,
    export_openclip: bool = True,
    suite: str = DEFAULT_SUITE,
    jobs: Optional[int] = 1,
) -> Path:
    """Build the first ``num_tasks`` tasks of ``suite`` (``settings.task_names``)
    (its :data:`SUITES` settings unless ``settings`` is given) in ``<root>/<suite>``, reusing what is already
    built with the same settings, and return that directory. ``jobs`` processes (None: the CPU cores) fine-tune
    tasks side by side, one thread each, so the weights do not depend on it."""
    import torch
    from tqdm.auto import tqdm
    from transformers import CLIPModel, CLIPProcessor

    from .local_data import save_task_dataset
    from .tiny_clip import clip_tokenizer, save_clip
    from .finetune import accuracy, zero_shot_head
    from .backbone import load_backbone, packaged_backbone
    from .tasks import task_by_name

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
    s = settings if settings is not None else SUITES[suite][0]
    tasks = [task_by_name(n) for n in s.task_names]
    if not 1 <= num_tasks <= len(tasks):
        raise ValueError(f"num_tasks must be in 1..{len(tasks)}, got {num_tasks}")
    # one thread: the same weights on every rebuild with the same torch build and CPU (a different torch
    # version changes them, see docs/benchmark.md), and no OpenMP oversubscription slow-down
    torch.set_num_threads(1)
    out = suite_dir(root, suite)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "models"):
        (out / sub).mkdir(exist_ok=True)
    t0 = time.time()

    pre = out / "pretrained"
    backbone = packaged_backbone(s)  # (weights file, their SHA-256) shipped with the package, or None
    pre_digest = s.pretrain_hash + (f"-{backbone[1][:16]}" if backbone else "")
    backbone_sha = backbone[1] if backbone else ""
    if not _stamped(pre, pre_digest):
        if backbone:
            clip = load_backbone(backbone[0], s)
        else:
            log.info("no packaged backbone for these settings: pretraining (%d steps)", s.pretrain_steps)
            clip = make_clip(s)
            torch.set_num_threads(s.pretrain_threads)
            pretrain_with_settings(clip, s, clip_tokenizer(), show_pbar)
            torch.set_num_threads(1)
        _publish(pre, pre_digest, lambda tmp: save_clip(clip, tmp))
    clip = CLIPModel.from_pretrained(pre).eval()
    processor = CLIPProcessor.from_pretrained(pre)
    scale = float(clip.logit_scale.detach().exp())
    projection = clip.visual_projection.weight.detach()
    oc = out / "openclip"
    if export_openclip and not _stamped(oc, _openclip_stamp(pre_digest)):
        from transformers import CLIPVisionModel

        from .openclip_export import make_image_encoder, save_image_encoder

        base = CLIPVisionModel(clip.config.vision_config)
        base.vision_model.load_state_dict(clip.vision_model.state_dict())
        encoder = make_image_encoder(base, projection)
        _publish(oc, _openclip_stamp(pre_digest), lambda tmp: save_image_encoder(encoder, tmp / "zeroshot.safetensors"))

    report_path = out / "build.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if report.get("settings") != s.record():
        report = {"settings": s.record(), "tasks": {}}
    pending = []  # (task, head, splits, fine-tuning digest) of the tasks to fine-tune
    for task in tasks[:num_tasks]:
        data_dir, model_dir = out / "data" / task.name, out / "models" / task.name
        ft_digest = s.finetune_hash(task.name, backbone_sha)
        splits = _splits(task, s)
        if not _stamped(data_dir, s.data_hash(task.name)):
            from PIL import Image

            images = {k: ([Image.fromarray(im) for im in x], y) for k, (x, y) in splits.items()}
            _publish(data_dir, s.data_hash(task.name),
                     lambda tmp: save_task_dataset(tmp.parent, tmp.name, images, task.classnames, task.templates))
        head = zero_shot_head(clip, processor, task.classnames, task.templates)
        if export_openclip and not _stamped(oc / task.name, _openclip_stamp(ft_digest)) and _stamped(model_dir, ft_digest):
            _export_openclip_task(oc, task.name, model_dir, projection, head, scale, ft_digest)
        if _stamped(model_dir, ft_digest) and task.name in report["tasks"]:
            continue
        pending.append((task, head, splits, ft_digest))
        report["tasks"][task.name] = {
            "num_classes": task.num_classes,
            "zero_shot_test": accuracy(clip.vision_model, clip.visual_projection, head, scale, *splits["test"]),
        }
    workers = jobs_count(jobs, len(pending))
    work = [(str(out), s, task.name, digest, head, splits["train"], splits["test"], show_pbar and workers == 1)
            for task, head, splits, digest in pending]
    results = tqdm(_map(_finetune_task, work, workers), total=len(work), desc=f"fine-tuning ({workers} processes)",
                   disable=not show_pbar or workers == 1)
    for (task, head, _, digest), fine_tuned_test in zip(pending, results):
        if export_openclip:
            _export_openclip_task(oc, task.name, out / "models" / task.name, projection, head, scale, digest)
        report["tasks"][task.name]["fine_tuned_test"] = fine_tuned_test
        write_atomic(report_path, lambda p: p.write_text(json.dumps(report, indent=1)))
    log.info("%s with %d tasks ready at %s (%.0f s)", suite, num_tasks, out, time.time() - t0)
    return out


def make_clip(s: BuildSettings):
    """The randomly initialised CLIP of the settings' architecture (seeded)."""
    from .tiny_clip import make_tiny_clip

    return make_tiny_clip(seed=s.seed, hidden_size=s.width, num_layers=s.layers, num_heads=s.heads,
                          image_size=s.image_size, patch_size=s.patch_size, projection_dim=s.projection_dim)


def pretrain_with_settings(clip, s: BuildSettings, tokenizer, show_pbar: bool, on_step=None):
    """:func:`~.pretrain.pretrain_clip` of ``clip`` in place with the settings' pretraining (steps, batch, lr, seed,
    corpus); the caller sets ``s.pretrain_threads``."""
    from .pretrain import pretrain_clip

    return pretrain_clip(clip, tokenizer, s.pretrain_steps, s.pretrain_batch, s.pretrain_lr,
                         seed=_seed(s, "pretrain"), show_pbar=show_pbar, task_fraction=s.pretrain_task_fraction,
                         tasks=s.task_names, name_fraction=s.pretrain_name_fraction, real_pools=bool(s.real_pools),
                         on_step=on_step)


def _split(task, s: BuildSettings, split: str):
    """``(images, labels)`` of ``task``'s ``split`` (``"train"``, ``"validation"``, ``"test"``) under the settings."""
    from .tasks import make_split

    n = {"train": s.train_size, "validation": s.val_size, "test": s.test_size}[split]
    return make_split(task, n, s.image_size, _seed(s, task.name, split), split if s.real_pools else None)


def _splits(task, s: BuildSettings) -> dict:
    return {name: _split(task, s, name) for name in ("train", "validation", "test")}


def _finetune_task(job) -> float:
    """Fine-tune one task's vision tower from ``<out>/pretrained``, publish it to ``<out>/models/<task>`` and
    return its test accuracy. Runs in a worker process (or in the caller with one job), on one thread."""
    import torch
    from transformers import CLIPModel

    from .finetune import accuracy, finetune_vision_tower

    out, s, name, digest, head, train, test, show_pbar = job
    torch.set_num_threads(1)
    clip = CLIPModel.from_pretrained(Path(out) / "pretrained").eval()
    vision = finetune_vision_tower(clip, head, *train, steps=s.finetune_steps, batch_size=s.finetune_batch,
                                   lr=s.finetune_lr, seed=_seed(s, name, "finetune"), desc=f"fine-tuning {name}",
                                   show_pbar=show_pbar)
    _publish(Path(out) / "models" / name, digest, vision.save_pretrained)
    scale = float(clip.logit_scale.detach().exp())
    return accuracy(vision.vision_model, clip.visual_projection, head, scale, *test)


def jobs_count(requested: Optional[int], pending: int) -> int:
    """Worker processes for ``pending`` fine-tunes: ``requested`` (None: the CPU cores), at most ``pending``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested if requested is not None else cores, pending))


def _map(fn, items, workers: int):
    """``map(fn, items)`` in order, in ``workers`` spawned processes when more than one."""
    if workers <= 1:
        yield from map(fn, items)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(fn, items)


def _export_openclip_task(oc: Path, task: str, model_dir: Path, projection, head, scale: float, digest: str) -> None:
    """``openclip/<task>/finetuned.safetensors`` and ``openclip/head_<task>.safetensors`` (see :mod:`.openclip_export`)."""
    from transformers import CLIPVisionModel

    from .openclip_export import make_classification_head, make_image_encoder, save_classification_head, save_image_encoder

    encoder = make_image_encoder(CLIPVisionModel.from_pretrained(model_dir), projection)
    save_classification_head(make_classification_head(head, scale), oc / f"head_{task}.safetensors")
    _publish(oc / task, _openclip_stamp(digest), lambda tmp: save_image_encoder(encoder, tmp / "finetuned.safetensors"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-bench-tsv-build",
        description="Build (or reuse) an offline CLIP benchmark suite in DIR/SUITE (see --root, --suite): a "
                    "contrastively pretrained small CLIP, the first N of 20 synthetic image tasks and one fine-tuned "
                    "vision tower per task, plus the same models in the open_clip layout. What is already built with "
                    "the same settings is reused. The last line printed is the suite directory.",
    )
    parser.add_argument("--suite", default=DEFAULT_SUITE, choices=sorted(SUITES),
                        help="; ".join(f"{name}: {doc}" for name, (_, doc) in SUITES.items())
                             + f" (default: {DEFAULT_SUITE}); the options below override its settings")
    parser.add_argument("--num-tasks", type=int, default=20, metavar="N",
                        help="build the first N of the 20 tasks, 1..20; the configs cover 8, 14 and 20 (default: 20)")
    parser.add_argument("--root", default=None, metavar="DIR",
                        help=f"data root; the suite goes to DIR/SUITE (default: ${ENV_VAR}, else ~/.cache/fusion_bench_tsv)")
    parser.add_argument("--jobs", type=int, default=None, metavar="J",
                        help="processes fine-tuning tasks side by side, one thread each: the weights do not depend on "
                             "it (default: the CPU cores)")
    parser.add_argument("--no-pbar", action="store_true", help="no progress bars (default: shown)")
    parser.add_argument("--no-openclip", action="store_true",
                        help="skip the open_clip export used by the OpenCLIPVision* configs (default: exported)")
    add_settings_options(parser)
    return parser


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One ``--<field>`` option per :class:`BuildSettings` field (None: the suite's value)."""
    for f in dataclasses.fields(BuildSettings):
        defaults = ", ".join(f"{name} {getattr(settings, f.name)!r}" for name, (settings, _) in SUITES.items())
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                            help=f"{f.metadata['doc']} (default: {defaults})")


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    """The suite's :class:`BuildSettings` with the options given on the command line."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildSettings) if getattr(args, f.name) is not None}
    return dataclasses.replace(SUITES[args.suite][0], **overrides)


def main(argv=None) -> None:
    """``fusion-bench-tsv-build``: build, then print the suite directory."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = settings_from_args(args)
    out = build_benchmark(args.num_tasks, args.root, settings, show_pbar=not args.no_pbar,
                          export_openclip=not args.no_openclip, suite=args.suite, jobs=args.jobs)
    print(out)


if __name__ == "__main__":
    main()
