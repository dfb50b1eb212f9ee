R"""
Task Singular Vector Merging (TSV-M) as a FusionBench algorithm, streaming one model at a time.

For every weight matrix, each task update ``Δᵢ = θᵢ − θ₀`` is reduced to its top-k singular
triplets (k = floor(min(m, n) / T) by default), the per-task singular vectors are concatenated and
decorrelated (orthogonal Procrustes), and the merged weight is ``θ₀ + α · U⊥ Σ V⊥ᵀ``. Parameters that
are not matrices (biases, LayerNorm, class token, conv kernels) and the ``exclude_keys`` are averaged
over tasks and scaled by α too (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025, arXiv:2412.00081).

Unlike FusionBench's ``TaskSingularVectorMerging``, the fine-tuned models are loaded one at a time and
only their rank-k factors and running sums are kept, so peak memory is about the pretrained model,
one fine-tuned model and the factors, whatever T is; and a layer whose rank is below T keeps one
component per task instead of being zeroed.

Example (20 CLIP ViT-B/32 tasks)::

    fusion_bench \
        method=tsv/tsv_merge \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TALL20_model_only \
        taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TALL20

Options from the command line, e.g. ``method.alpha=1.5 method.rank=16 method.device=cuda``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config

from .functional import SVDFactors, compute_dtype, layer_rank, truncated_svd, tsv_merge_factors
from .hf_checkpoint import save_hf_model
from .options import validate_options
from .outputs import output_dir
from .parallel import LayerExecutor, resolve_workers
from .sharding import send_to_rank_zero, split_by_size
from .streaming import (
    as_modelpool,
    check_finite,
    finetuned_model_names,
    iter_finetuned_states,
    iter_layers,
    load_pretrained_model,
    open_lazy_states,
    split_keys,
    state_dict_of,
    unique_storage_keys,
)

log = logging.getLogger(__name__)

__all__ = ["TSVMergeAlgorithm"]

DEFAULT_EXCLUDE_KEYS = ("*text_projection*",)


def resolve_alpha(alpha: Union[float, Sequence[float], None], num_tasks: int) -> tuple[List[float], float]:
    """Split ``alpha`` (validated by :func:`~.options.validate_options`) into per-task scales (applied to
    each Δᵢ before the SVD) and a final scale.

    A number scales the merged update; a list of T numbers scales each task vector, as FusionBench's
    TSVM does.
    """
    if alpha is None:
        return [1.0] * num_tasks, 1.0
    if not isinstance(alpha, (list, tuple)):
        return [1.0] * num_tasks, float(alpha)
    if len(alpha) != num_tasks:
        raise ValueError(
            f"option 'alpha' has {len(alpha)} values but the modelpool has {num_tasks} fine-tuned models: "
            f"give one number per task, or a single number"
        )
    return [float(a) for a in alpha], 1.0


@auto_register_config
class TSVMergeAlgorithm(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """Task Singular Vector Merging, streaming the modelpool one fine-tuned model at a time.

    Args:
        alpha: scaling of the merged update, ``θ = θ₀ + α·M`` (default 1.0, the paper's choice); or a
            list of one float per task, applied to each task vector before the SVD.
        exclude_keys: glob patterns of parameter names that are averaged instead of decomposed. The
            default, ``["*text_projection*"]``, reproduces the reference implementation.
        rank: per-task rank k of every matrix; ``None`` (default) is ``floor(min(m, n) / T)``,
            at least 1.
        device: where the linear algebra runs; ``None`` (default) is the Fabric device, so a GPU is
            used when there is one. The merged model stays where the pretrained model was loaded.
        show_pbar: show progress bars over models and layers.
        svd_method: how each task's top-k triplets are computed. ``"gram"`` (default): eigenvectors of the
            smaller Gram matrix formed and decomposed in float64 (only the top k, LAPACK ``dsyevr``), and the
            orthogonalization by whitening the ``Tk × Tk`` Gram matrices in float64 (SVD fallback when
            ill-conditioned): a float64 evaluation of TSV-M (within 1e-7 relative of float64 SVDs in the
            tests), faster than float32 SVDs. It differs from FusionBench's float32 result by that float32
            round-off (1e-5 to 5e-5 on ViT-B pools with smoothly decaying task spectra, 7e-4 where the top-k
            cut falls inside a flat noise spectrum, see ``benchmarks/results/performance.md``). ``"svd"``: full SVDs in float32
            (float64 stays float64), FusionBench's own factors: the merged model equals FusionBench's to 1e-5.
            ``"randomized"``: randomized SVD, approximate.
        lazy_loading: read fine-tuned checkpoints tensor by tensor from ``model.safetensors`` (or its
            shards) where the pool allows (a ``CLIPVisionModelPool`` or ``CausalLMPool`` entry that is a
            local directory) instead of building each model. When every fine-tuned model can be read so,
            the merge runs layer by layer (θ₀[key] and each task's [key] read, merged, written, freed:
            peak memory about the merged model plus one layer × T); otherwise one model at a time. A
            ``CausalLMPool`` with ``enable_lazy_loading: true`` is read lazily even with ``false``.
        save_path: write the merged model in Hugging Face format here (``{log_dir}``: the run's log
            dir; the log dir itself means ``<log_dir>/merged_model``), sharded safetensors with the pool's
            tokenizer, atomically (temporary directory, then rename). An existing path is replaced only when
            it is an empty directory or one this package wrote; anything else is refused before the merge
            starts. ``None`` (default) saves nothing (FusionBench's ``merged_model_save_path`` still works,
            not atomically).
        max_shard_size: largest safetensors shard of ``save_path`` (``save_pretrained``'s option).
        save_tokenizer: with ``save_path``, also save the pool's tokenizer (when the pool has one).
        num_workers: threads that decompose matrices side by side, each with one BLAS thread (LAPACK's
            eigensolvers and SVDs of these sizes barely use a second BLAS thread; two matrices at once do).
            ``None`` (default): the CPU cores available (divided among Fabric processes) when the math
            runs on the CPU, 1 on a GPU. 0 or 1: one job at a time in the calling thread. Every job runs on
            one torch/BLAS thread whatever this is, so the result does not depend on it (bit for bit).
        allow_missing_keys: accept a checkpoint (fine-tuned or pretrained) that lacks parameters of the
            model it is loaded into; ``from_pretrained`` fills them with random values. ``False`` (default)
            refuses it with an error naming the model and the keys.

    With a Fabric strategy of several processes (e.g. ``fabric.strategy=ddp fabric.devices=2``), the
    parameters are split across the ranks by size, each rank merges its share (reading only those
    layers when lazy) and rank 0 assembles the merged model, bitwise the one a single process makes
    (each job runs on one thread); the other ranks return None.
    """

    def __init__(
        self,
        alpha: Union[float, Sequence[float], None] = 1.0,
        exclude_keys: Optional[Sequence[str]] = DEFAULT_EXCLUDE_KEYS,
        rank: Optional[int] = None,
        device: Optional[str] = None,
        show_pbar: bool = True,
        svd_method: str = "gram",
        lazy_loading: bool = True,
        save_path: Optional[str] = None,
        max_shard_size: Union[str, int] = "5GB",
        save_tokenizer: bool = True,
        num_workers: Optional[int] = None,
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(**validate_options(self, kwargs))

    def _device(self) -> torch.device:
        return torch.device(self.device) if self.device is not None else self.fabric.device

    def layer_ranks(self, shapes: Dict[str, torch.Size], num_tasks: int) -> Dict[str, int]:
        """The per-task rank k of every matrix, validated against its shape."""
        return {key: layer_rank(shape, num_tasks, rank=self.rank, name=key) for key, shape in shapes.items()}

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]) -> Optional[nn.Module]:
        """Merge the fine-tuned models of ``modelpool`` into one model and return it (on rank 0; other
        ranks of a multi-process Fabric run return None)."""
        modelpool = as_modelpool(modelpool, "TSV-M")
        if self.save_path is not None:
            self.output_path()  # refuses a save_path in use before anything is computed
        names = finetuned_model_names(modelpool, "merge")
        num_tasks = len(names)
        task_scales, final_scale = resolve_alpha(self.alpha, num_tasks)
        exclude = list(self.exclude_keys or [])
        device = self._device()

        with self.profile("load pretrained"):
            pretrained = load_pretrained_model(modelpool, self.allow_missing_keys)
            # a pool of in-memory models hands out the caller's own instance: never write into it
            merged = deepcopy(pretrained) if modelpool.has_instance_models else pretrained
        base = state_dict_of(merged)
        check_finite(base, "_pretrained_")
        matrix_keys, other_keys = split_keys(base, exclude)
        ranks = self.layer_ranks({k: base[k].shape for k in matrix_keys}, num_tasks)
        self._log_setup(names, base, matrix_keys, other_keys, ranks, device)

        # tied weights: one storage, merged once; layers split across the ranks of a multi-process run
        keys = unique_storage_keys(base, matrix_keys + other_keys)
        world, rank = self.fabric.world_size, self.fabric.global_rank
        mine = split_by_size({k: base[k].numel() for k in keys}, world)[rank]
        if world > 1:
            log.info(f"TSV-M: rank {rank}/{world} merges {len(mine)} of {len(keys)} parameters")
        layer = _LayerMerge(self, ranks, task_scales, final_scale, num_tasks, device)
        results: Dict[str, Tensor] = {}
        workers = resolve_workers(self.num_workers, device, world)
        if workers > 1:
            log.info(f"TSV-M: {workers} worker threads, one BLAS thread each")

        def keep(key: str, value: Tensor) -> None:
            if rank == 0:
                base[key].copy_(value)
            else:
                results[key] = value

        lazy_states = open_lazy_states(modelpool, base, self.lazy_loading)
        # tensors are read in this thread and decomposed by the workers; merged parameters are written as
        # soon as they are done (each key on its own, so in any order), at most `window` behind the reader
        window, pending = 2 * workers, deque()

        def finish(limit: int) -> None:
            while len(pending) > limit:
                key, future = pending.popleft()
                keep(key, future.result())
            for item in [item for item in pending if item[1].done()]:
                pending.remove(item)
                keep(item[0], item[1].result())

        with LayerExecutor(workers) as pool:
            if lazy_states is not None:
                # layer-outer: θ₀[key] and each task's [key], merged and written before the next layers
                for key, values in iter_layers(lazy_states, mine, desc="TSV-M: layers", show_pbar=self.show_pbar):
                    job, values, cost = _ParameterJob(layer, key, base[key]), iter(values), base[key].nbytes
                    for i in range(num_tasks):
                        pool.room(cost)
                        with self.profile("read tensors"):
                            value = next(values)
                        pool.submit(job.run_part, i, value, cost=cost)
                        del value
                    pending.append((key, job.result))
                    del job
                    finish(window)
            else:
                # model-outer: one fine-tuned model resident at a time, factors and sums kept per layer
                accs: Dict[str, object] = {}
                for i, name, state in iter_finetuned_states(
                    modelpool, base, desc="TSV-M: task vectors", show_pbar=self.show_pbar,
                    profile=self.profile, lazy=self.lazy_loading, allow_missing_keys=self.allow_missing_keys,
                ):
                    parts = {}
                    for key in tqdm(mine, desc=f"  {name}", leave=False, disable=not self.show_pbar):
                        pool.room(base[key].nbytes)
                        with self.profile("read tensors"):
                            value = state[key]  # a SafetensorsState reads the tensor here
                        parts[key] = pool.submit(layer.task_part, key, base[key], value, i, cost=base[key].nbytes)
                        del value
                    for key in mine:  # in task order, so sums are the same whatever the number of workers
                        accs[key] = layer.add(accs.get(key), key, parts.pop(key).result())
                for key in tqdm(mine, desc="TSV-M: merging", disable=not self.show_pbar):
                    pending.append((key, pool.submit(layer.merged, key, base[key], accs.pop(key))))
                    finish(window)
            finish(0)

        if world > 1:
            with self.profile("gather on rank 0"):
                send_to_rank_zero(self.fabric, results, lambda key, value: base[key].copy_(value))
            results.clear()
        self.print_profile_summary("TSV-M profile")
        if rank != 0:
            return None
        if self.save_path is not None:
            with self.profile("save"):
                self.save(merged, modelpool)
        return merged

    def output_path(self) -> Path:
        """The directory ``save_path`` names (``{log_dir}`` alone: ``<log_dir>/merged_model``), refused when
        something there was not written by this package (:func:`~.outputs.output_dir`)."""
        return output_dir(self.save_path, self.log_dir, "merged_model", "TSV-M")

    def save(self, model: nn.Module, modelpool: BaseModelPool) -> str:
        """Write ``model`` (and the pool's tokenizer) in Hugging Face format to ``save_path``, atomically."""
        path = self.output_path()
        tokenizer = None
        if self.save_tokenizer and getattr(modelpool, "tokenizer", None) is not None:
            tokenizer = modelpool.load_tokenizer()
        return str(save_hf_model(model, path, tokenizer=tokenizer, max_shard_size=self.max_shard_size))

    def _log_setup(self, names, base, matrix_keys, other_keys, ranks, device) -> None:
        dtypes = sorted({str(base[k].dtype) for k in matrix_keys + other_keys})
        num_tasks = len(names)
        log.info(
            f"TSV-M: T={num_tasks} tasks {names}; device={device}; dtype={', '.join(dtypes)} "
            f"(computed in {', '.join(sorted({str(compute_dtype(base[k].dtype)) for k in matrix_keys})) or '-'}); "
            f"{len(matrix_keys)} matrices decomposed, {len(other_keys)} other parameters averaged; alpha={self.alpha}"
        )
        by_shape = Counter((tuple(base[k].shape), ranks[k]) for k in matrix_keys)
        for (shape, k), count in sorted(by_shape.items()):
            log.info(f"TSV-M: {count} matrices of shape {shape}: k={k} per task ({num_tasks * k} of rank {min(shape)})")
        low = [k for k in matrix_keys if min(base[k].shape) < num_tasks]
        if low:
            log.warning(
                f"TSV-M: {len(low)} matrices have rank below T={num_tasks} and keep 1 component per task "
                f"(FusionBench's TSVM would zero them): {low}"
            )


class _LayerMerge:
    """TSV-M of one parameter, shared by the model-outer and the layer-outer loop.

    ``task_part`` turns task i's tensor into its contribution (rank-k factors of ``αᵢΔᵢ`` for a matrix,
    ``αᵢΔᵢ`` otherwise), ``add`` accumulates the contributions in task order (a list of factors, a running
    sum), ``merged`` returns ``θ₀ + α·M`` (``M = U⊥ΣV⊥ᵀ``, or the mean of the task vectors) in θ₀'s dtype.
    The result depends only on the parameter's inputs, never on which other parameters (or rank) ran.
    """

    def __init__(self, algorithm: "TSVMergeAlgorithm", ranks, task_scales, final_scale, num_tasks, device):
        self.algorithm, self.ranks, self.device = algorithm, ranks, device
        self.task_scales, self.final_scale, self.num_tasks = task_scales, final_scale, num_tasks
        self.method = algorithm.svd_method
        self._lock = threading.Lock()

    @contextmanager
    def timed(self, action: str):
        """The algorithm's profiler, from any thread (times of concurrent jobs add up)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.algorithm.profiler.recorded_durations[action].append(time.perf_counter() - start)

    def theta0_work(self, key: str, theta0: Tensor) -> Tensor:
        """θ₀[key] on the compute device in the dtype its task updates are computed in."""
        work = compute_dtype(theta0.dtype)
        if key in self.ranks and self.method != "svd":
            # the Gram paths keep the factors in float64: UᵀU is ill-conditioned when Tk ≈ r,
            # and float32 factors would lose cond(U)·eps32 in U (UᵀU)^(-1/2)
            work = torch.float64
        return theta0.to(self.device, work)

    def task_part(self, key: str, theta0: Tensor, value: Tensor, i: int):
        """Task i's contribution; ``theta0`` as it is or already converted by ``theta0_work``."""
        theta0 = self.theta0_work(key, theta0)
        delta = value.to(self.device, theta0.dtype, copy=True).sub_(theta0)
        if self.task_scales[i] != 1.0:
            delta.mul_(self.task_scales[i])
        if key in self.ranks:
            with self.timed("truncated svd"):
                return truncated_svd(delta, self.ranks[key], self.method)
        return delta

    @staticmethod
    def add(acc, key: str, part):
        if isinstance(part, SVDFactors):
            return (acc or []) + [part]
        return part if acc is None else acc.add_(part)

    def merged(self, key: str, theta0: Tensor, acc) -> Tensor:
        with self.timed("merge"):
            if isinstance(acc, list):
                update = tsv_merge_factors(acc, "svd" if self.method == "svd" else "gram")
            else:
                update = acc.div_(self.num_tasks)
            update.mul_(self.final_scale)
            return (theta0.to(self.device, update.dtype) + update).to(theta0.device, theta0.dtype)


class _ParameterJob:
    """The T task parts of one parameter, computed by whichever workers are free and accumulated in task
    order as they arrive (a part that comes early waits for its predecessors, so a sum holds one running
    total, not T tensors); the worker that adds the last part merges. No worker waits for another.
    ``result`` is a future of ``θ₀ + α·M``."""

    def __init__(self, layer: _LayerMerge, key: str, theta0: Tensor):
        self.layer, self.key, self.theta0 = layer, key, theta0
        self.theta0_work = layer.theta0_work(key, theta0)
        self.early: Dict[int, object] = {}  # parts that finished before their predecessors
        self.next, self.acc = 0, None
        self.lock = threading.Lock()
        self.result: Future = Future()

    def run_part(self, i: int, value: Tensor) -> None:
        try:
            part = self.layer.task_part(self.key, self.theta0_work, value, i)
            del value
            with self.lock:
                self.early[i] = part
                while self.next in self.early:
                    self.acc = self.layer.add(self.acc, self.key, self.early.pop(self.next))
                    self.next += 1
                last = self.next == self.layer.num_tasks  # true in exactly one call: each part arrives once
                if last:
                    acc, self.acc, self.theta0_work = self.acc, None, None
            if last:
                self.result.set_result(self.layer.merged(self.key, self.theta0, acc))
        except BaseException as e:
            with self.lock:
                if not self.result.done():
                    self.result.set_exception(e)
