r"""TSV-M of one parameter, and the two loops that run it over a model with a worker pool.

:class:`ParameterMerge` holds what a parameter's merge needs as plain values (ranks, α, device, SVD
method) and a ``timer(action, seconds)`` callback; it never sees the algorithm. :func:`merge_parameters`
runs it over the parameters either layer by layer (lazily read checkpoints: θ₀[key] and each task's
[key] read, merged, written, freed) or model by model (one fine-tuned model resident at a time). The
result of a parameter depends only on its inputs, never on the loop, the workers or the rank.

With rank revealing (``theta_rms`` given) task i keeps :math:`k_i = \min(k, \mathrm{rank}_\tau(\alpha_i\Delta_i))`
triplets (:mod:`~fusion_bench_tsv.functional.rank`: round-off floor, and the storage-noise floor of the
coarsest of θ₀'s dtype and the dtype task i's checkpoint stores the parameter in); :attr:`ParameterMerge.kept`
records, per matrix, how many triplets of each task entered the merge.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..functional import (
    SVDFactors,
    compute_dtype,
    merge_dtype,
    rank_options,
    truncated_svd,
    tsv_merge_factors,
)
from ..io.streaming import iter_layers, stored_dtype
from .parallel import LayerExecutor
from .timing import Timer, timed

__all__ = ["ParameterJob", "ParameterMerge", "add_scaled", "merge_parameters"]

class ParameterMerge:
    """TSV-M of one parameter, shared by the layer-outer and the model-outer loop.

    ``task_part`` turns task i's tensor into its contribution (rank-k factors of ``αᵢΔᵢ`` for a matrix,
    ``αᵢΔᵢ`` otherwise), ``add`` accumulates the contributions in task order (a list of factors, a running
    sum), ``merged`` returns ``θ₀ + α·M`` (``M = U⊥ΣV⊥ᵀ``, or the mean of the task vectors) in θ₀'s dtype.

    Args:
        ranks: per-task rank k of every matrix key (keys not in it are averaged).
        task_scales: the factor αᵢ applied to each task vector before the SVD.
        final_scale: the factor α applied to the merged update.
        device: where the linear algebra runs.
        svd_method: one of :data:`~fusion_bench_tsv.functional.SVD_METHODS`.
        timer: receives the time of each ``"truncated svd"`` and ``"merge"``.
        theta_rms: θ̄ (RMS of θ₀) of every matrix key: rank revealing with the storage-noise floor
            (:func:`~fusion_bench_tsv.functional.rank_options`); None: the plain top-k.
    """

    def __init__(
        self,
        ranks: Mapping[str, int],
        task_scales: Sequence[float],
        final_scale: float,
        device: torch.device,
        svd_method: str,
        timer: Optional[Timer] = None,
        theta_rms: Optional[Mapping[str, float]] = None,
    ):
        self.ranks, self.task_scales, self.final_scale = ranks, list(task_scales), final_scale
        self.num_tasks, self.device, self.method, self.timer = len(self.task_scales), device, svd_method, timer
        self.theta_rms = theta_rms
        #: matrix key -> the number of task i's triplets that entered the merge (σ ≠ 0), for each task i
        self.kept: Dict[str, List[int]] = {}
        self._kept_lock = threading.Lock()

    def theta0_work(self, key: str, theta0: Tensor) -> Tensor:
        """θ₀[key] on the compute device in the dtype its task updates are computed in."""
        work = merge_dtype(theta0.dtype, self.method) if key in self.ranks else compute_dtype(theta0.dtype)
        return theta0.to(self.device, work)

    def task_part(self, key: str, theta0: Tensor, value: Tensor, i: int, storage_dtypes: Sequence[torch.dtype]):
        """Task i's contribution; ``theta0`` as it is or already converted by ``theta0_work``;
        ``storage_dtypes``: θ₀'s dtype and the dtype task i's checkpoint stores ``key`` in (rank revealing)."""
        theta0 = self.theta0_work(key, theta0)
        delta = value.to(self.device, theta0.dtype, copy=True).sub_(theta0)
        if self.task_scales[i] != 1.0:
            delta.mul_(self.task_scales[i])
        if key not in self.ranks:
            return delta
        # the storage noise of αᵢΔᵢ is |αᵢ| times that of Δᵢ: the floor scales with θ̄
        rms = None if self.theta_rms is None else abs(self.task_scales[i]) * self.theta_rms[key]
        with timed(self.timer, "truncated svd"):
            factors = truncated_svd(delta, self.ranks[key], self.method,
                                    **rank_options(rms, storage_dtypes))
        with self._kept_lock:
            self.kept.setdefault(key, [0] * self.num_tasks)[i] = int((factors.S != 0).sum())
        return factors

    @staticmethod
    def add(acc, part):
        """``acc`` with ``part`` added: factors appended to a list, a tensor summed in place."""
        if isinstance(part, SVDFactors):
            return (acc or []) + [part]
        return part if acc is None else acc.add_(part)

    def update(self, acc) -> Tensor:
        """The merged update ``M`` (``U⊥ΣV⊥ᵀ``, or the mean of the task vectors) in the compute dtype, on the
        compute device, from the accumulated parts ``acc`` of all T tasks (consumed)."""
        if isinstance(acc, list):
            return tsv_merge_factors(acc, self.method)
        return acc.div_(self.num_tasks)

    def merged(self, theta0: Tensor, acc) -> Tensor:
        """``θ₀ + α·M`` in θ₀'s dtype and device, from the accumulated parts ``acc`` of all T tasks."""
        with timed(self.timer, "merge"):
            return add_scaled(theta0, self.update(acc), self.final_scale)


def add_scaled(theta0: Tensor, update: Tensor, scale: float) -> Tensor:
    """``θ₀ + scale·update`` computed in ``update``'s dtype and device, returned in θ₀'s dtype and device."""
    return (theta0.to(update.device, update.dtype) + update * scale).to(theta0.device, theta0.dtype)


class ParameterJob:
    """The T task parts of one parameter, computed by whichever workers are free and accumulated in task
    order as they arrive (a part that comes early waits for its predecessors, so a sum holds one running
    total, not T tensors); the worker that adds the last part merges. No worker waits for another.
    ``result`` is a future of ``θ₀ + α·M``."""

    def __init__(self, merge: ParameterMerge, key: str, theta0: Tensor):
        self.merge, self.key, self.theta0 = merge, key, theta0
        self.theta0_work = merge.theta0_work(key, theta0)
        self.early: Dict[int, object] = {}  # parts that finished before their predecessors
        self.next, self.acc = 0, None
        self.lock = threading.Lock()
        self.result: Future = Future()

    def run_part(self, i: int, value: Tensor, stored: Optional[torch.dtype] = None) -> None:
        """Compute task i's part of the parameter from its tensor ``value`` (stored in dtype ``stored``,
        default θ₀'s); merge when it is the last."""
        try:
            dtypes = (self.theta0.dtype, stored or self.theta0.dtype)
            part = self.merge.task_part(self.key, self.theta0_work, value, i, dtypes)
            del value
            with self.lock:
                self.early[i] = part
                while self.next in self.early:
                    self.acc = self.merge.add(self.acc, self.early.pop(self.next))
                    self.next += 1
                last = self.next == self.merge.num_tasks  # true in exactly one call: each part arrives once
                if last:
                    acc, self.acc, self.theta0_work = self.acc, None, None
            if last:
                self.result.set_result(self.merge.merged(self.theta0, acc))
        except BaseException as e:
            with self.lock:
                if not self.result.done():
                    self.result.set_exception(e)


class _Writer:
    """Merged parameters handed to ``write`` as soon as they are done (each key on its own, so in any
    order), at most ``window`` behind the reader."""

    def __init__(self, write: Callable[[str, Tensor], None], window: int):
        self.write, self.window = write, window
        self.pending: Deque[Tuple[str, Future]] = deque()

    def add(self, key: str, future: Future) -> None:
        self.pending.append((key, future))
        self.flush(self.window)

    def flush(self, limit: int = 0) -> None:
        while len(self.pending) > limit:
            key, future = self.pending.popleft()
            self.write(key, future.result())
        for item in [item for item in self.pending if item[1].done()]:
            self.pending.remove(item)
            self.write(item[0], item[1].result())


def merge_parameters(
    merge: ParameterMerge,
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    write: Callable[[str, Tensor], None],
    *,
    workers: int,
    lazy_states: Optional[Sequence[Tuple[str, Mapping[str, Tensor]]]] = None,
    finetuned: Optional[Iterable[Tuple[int, str, Mapping[str, Tensor]]]] = None,
    show_pbar: bool = True,
) -> None:
    """Merge the parameters ``keys`` of θ₀ (``base``) and hand each result to ``write(key, value)``.

    Args:
        merge: the per-parameter merge.
        base: θ₀'s state dict.
        keys: the parameters to merge (this rank's share).
        write: receives each merged parameter, in the calling thread.
        workers: threads that run the parts (:class:`~.parallel.LayerExecutor`).
        lazy_states: ``[(name, lazily read state)]`` of every task: the layer-outer loop.
        finetuned: ``(index, name, state)`` of each task in turn (used without ``lazy_states``): the
            model-outer loop, which keeps every parameter's factors or sums between models.
        show_pbar: progress bars.
    """
    writer = _Writer(write, 2 * workers)
    with LayerExecutor(workers) as pool:
        if lazy_states is not None:
            _layer_outer(merge, base, keys, writer, pool, lazy_states, show_pbar)
        else:
            _model_outer(merge, base, keys, writer, pool, finetuned, show_pbar)
        writer.flush(0)


def _layer_outer(merge, base, keys, writer: _Writer, pool: LayerExecutor, lazy_states, show_pbar: bool) -> None:
    """θ₀[key] and each task's [key] read, merged and written before the next layers."""
    for key, values in iter_layers(lazy_states, keys, desc="TSV-M: layers", show_pbar=show_pbar):
        job, values, cost = ParameterJob(merge, key, base[key]), iter(values), base[key].nbytes
        for i in range(merge.num_tasks):
            pool.room(cost)
            with timed(merge.timer, "read tensors"):
                value = next(values)
            pool.submit(job.run_part, i, value, stored_dtype(lazy_states[i][1], key), cost=cost)
            del value
        writer.add(key, job.result)
        del job


def _model_outer(merge, base, keys, writer: _Writer, pool: LayerExecutor, finetuned, show_pbar: bool) -> None:
    """One fine-tuned model resident at a time; every parameter's factors or running sum kept between models."""
    accs: Dict[str, object] = {}
    for i, name, state in finetuned:
        parts: Dict[str, Future] = {}
        for key in tqdm(keys, desc=f"  {name}", leave=False, disable=not show_pbar):
            pool.room(base[key].nbytes)
            with timed(merge.timer, "read tensors"):
                value = state[key]  # a SafetensorsState reads the tensor here
            dtypes = (base[key].dtype, stored_dtype(state, key))
            parts[key] = pool.submit(merge.task_part, key, base[key], value, i, dtypes, cost=base[key].nbytes)
            del value
        for key in keys:  # in task order, so sums are the same whatever the number of workers
            accs[key] = merge.add(accs.get(key), parts.pop(key).result())
    for key in tqdm(keys, desc="TSV-M: merging", disable=not show_pbar):
        writer.add(key, pool.submit(merge.merged, base[key], accs.pop(key)))
