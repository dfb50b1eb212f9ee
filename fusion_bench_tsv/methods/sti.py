R"""
Singular Task Interference (STI) analysis of a modelpool, per layer, before and after TSV-M.

For every weight matrix with task updates ``Δᵢ = θᵢ − θ₀`` it measures
``STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁`` (entrywise L1; Gargiulo et al., "Task Singular Vectors: Reducing
Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081, Eq. 4):

- of the full-rank task matrices (``full_rank: true``),
- of their rank-k truncations (k = floor(min(m, n) / T) or ``rank``), as TSV-M uses them,
- of the same rank-k factors after TSV-M's decorrelation (≈ 0 by construction when T·k ≤ min(m, n)),
- each also normalized by ‖Σ‖₁ (the sum of the singular values) so that layers compare,
- with rank revealing (``rank_revealing: true``, default) each task keeps at most the numerical rank of its
  update (the row's ``kept``: kᵢ per task), so null-space vectors of rank-deficient (LoRA) updates, whose
  basis is arbitrary, do not enter the interference,

plus the mean pairwise cosine similarity of the task vectors (the coarse baseline) and the T × T
pairwise STI at rank k, summed over layers. Nothing is returned to evaluate; it writes ``sti.json``,
``sti.csv`` (one row per layer), ``sti_per_layer.png`` and ``sti_pairwise.png`` into ``<log_dir>/sti``
(option ``save_path``) and logs the per-layer values to the Fabric logger (TensorBoard), step = layer index.

Example (8 CLIP ViT-B/32 tasks)::

    fusion_bench method=tsv/sti_analysis \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only

Memory: the fine-tuned models are streamed one at a time. Between loads the analysis keeps, per task
and matrix, the full task matrix (``full_rank: true``) or its rank-k factors (``full_rank: false``).
Keeping all layers' full matrices is T models' worth, so layers are analysed in groups that fit
``max_memory_gb``, one pass over the modelpool per group. The ``Tk × Tk`` interference product of a
layer is never formed: it is summed in blocks of rows within a quarter of the budget, and the pairwise
STI and cosines are computed one pair of tasks at a time, so the peak stays within the budget for any T.

The options, their defaults and meaning: ``config/method/tsv/sti_analysis.yaml``; the output files:
:mod:`.sti_report`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseModelPool
from fusion_bench.mixins import auto_register_config

from ..functional import SVDFactors, compute_dtype, task_cosine_similarity, truncated_svd
from ..functional.interference import layer_interference
from ..io.keys import DEFAULT_EXCLUDE_KEYS, unique_storage_keys
from ..io.outputs import write_output_dir
from ..io.streaming import iter_finetuned_states
from ..runtime.parallel import bounded_threads
from .base import TSVAlgorithmBase, task_update
from .options import validate_options
from .sti_report import VALUE_COLUMNS, summarize, write_files

log = logging.getLogger(__name__)

__all__ = ["STIAnalysis", "analyse_layer", "layer_groups"]


def layer_groups(
    shapes: Mapping[str, torch.Size], ranks: Mapping[str, int], num_tasks: int, itemsize: int, budget: float,
    full_rank: bool,
) -> List[List[str]]:
    """Consecutive groups of matrices whose kept tensors (all T tasks: full matrices with ``full_rank``,
    else rank-k factors, ``itemsize`` bytes a number) and the decomposition of the largest of them fit
    ``budget`` bytes; a matrix larger than that is a group of its own (with a warning)."""
    groups: List[List[str]] = [[]]
    used = work = 0.0
    for key, (m, n) in shapes.items():
        size = num_tasks * (m * n if full_rank else ranks[key] * (m + n + 1)) * itemsize
        # the analysis holds about three factor-sized copies: the factors, their concatenation and
        # one more of that size (the decorrelated factors; W of the full-rank product)
        layer_work = 3 * num_tasks * (min(m, n) if full_rank else ranks[key]) * (m + n + 1) * itemsize
        if groups[-1] and used + size + max(work, layer_work) > budget:
            groups.append([])
            used = work = 0.0
        if size + layer_work > budget:
            log.warning(
                f"STI: parameter '{key}' needs {(size + layer_work) / 2**20:.1f} MiB, more than three quarters "
                "of max_memory_gb; analysed alone"
            )
        groups[-1].append(key)
        used += size
        work = max(work, layer_work)
    return groups


def analyse_layer(
    key: str, kept: list, k: int, device: torch.device, full_rank: bool, max_bytes: int,
    options: Sequence[Dict[str, Any]] = (),
) -> Tuple[dict, Tensor, Tensor]:
    """One layer's CSV row and its T × T pairwise STI (raw and normalized, float64 on CPU).

    ``kept`` (the T task matrices with ``full_rank``, else their rank-``k`` factors) is consumed: each task
    matrix is released once it is decomposed. ``max_bytes`` bounds the blocks of the interference product.
    ``options``: each task's rank-revealing keywords of the full-rank SVD (:func:`~fusion_bench_tsv.functional.rank_options`;
    none: all triplets)."""
    cosine = None
    if full_rank:
        kept = [d.to(device) for d in kept]
        cosine = task_cosine_similarity(kept)  # of the task matrices, exact
        factors = []
        for i in range(len(kept)):
            d = kept.pop(0)
            factors.append(truncated_svd(d, min(d.shape), **(options[i] if options else {})))
            del d
    else:
        factors = [SVDFactors(*(t.to(device) for t in f)) for f in kept]
    m, n = factors[0].U.shape[0], factors[0].Vh.shape[1]
    values, pair, pair_normalized = layer_interference(
        factors, k, full_rank=full_rank, cosine=cosine, max_bytes=max_bytes
    )
    return {"layer": key, "shape": f"{m}x{n}", "k": k, **values}, pair, pair_normalized


def keep_task(state: Mapping[str, Tensor], base: Mapping[str, Tensor], ranks: Mapping[str, int],
              kept: Dict[str, list], device: torch.device, full_rank: bool, profile,
              theta_rms: Optional[Mapping[str, float]] = None, options: Optional[Dict[str, list]] = None) -> None:
    """Append one task's full matrix (``full_rank``) or rank-k factors of every key of ``kept`` to it, on the CPU.

    ``profile`` is a context-manager factory timing ``"truncated svd"``. ``theta_rms``: θ̄ of every matrix, for
    rank revealing (None: the plain top-k); the task's rank-revealing keywords are used for its factors and,
    with ``full_rank``, appended to ``options[key]`` for :func:`analyse_layer`."""
    for key in kept:
        with bounded_threads(base[key].numel()):
            delta, task_options = task_update(state, base, key, device, theta_rms)
            if full_rank:
                kept[key].append(delta.cpu())
                if options is not None:
                    options.setdefault(key, []).append(task_options)
            else:
                with profile("truncated svd"):
                    factors = truncated_svd(delta, ranks[key], **task_options)
                kept[key].append(SVDFactors(*(t.cpu() for t in factors)))


@auto_register_config
class STIAnalysis(TSVAlgorithmBase):
    """Per-layer Singular Task Interference before and after TSV-M's decorrelation.

    Every option is documented, with its default, in ``config/method/tsv/sti_analysis.yaml``.

    Args:
        rank: per-task rank k of the truncated analysis (None: floor(min(m, n) / T), at least 1).
        full_rank: also measure STI of the full-rank task matrices.
        max_memory_gb: memory budget (GiB) of the analysis' tensors.
        exclude_keys: glob patterns of parameters not analysed.
        device: where the linear algebra runs (None: the Fabric device).
        save_path: directory of the output files (None: ``<log_dir>/sti``).
        show_pbar: show progress bars.
        print_profile: print the profiler's table of where the time went.
        allow_missing_keys: accept checkpoints that lack parameters of the model (filled at random).
        rank_revealing: per task keep at most the numerical rank of Δᵢ of the top-k (and full-rank) triplets.

    Without a log dir and without ``save_path`` nothing is written; the results stay in ``self.results``.
    """

    method_name = "STI"
    output_name = "sti"
    default_save_path = "{log_dir}"
    evaluated = False

    def __init__(
        self,
        rank: Optional[int] = None,
        full_rank: bool = True,
        max_memory_gb: float = 4.0,
        exclude_keys: Optional[Sequence[str]] = DEFAULT_EXCLUDE_KEYS,
        device: Optional[str] = None,
        save_path: Optional[str] = None,
        show_pbar: bool = True,
        print_profile: bool = False,
        allow_missing_keys: bool = False,
        rank_revealing: bool = True,
        **kwargs,
    ):
        super().__init__(**validate_options(self, kwargs))
        self.results: Optional[dict] = None

    def block_bytes(self) -> int:
        """Budget of the blocks of a layer's interference product: a quarter of ``max_memory_gb``."""
        return int(self.max_memory_gb * 2**30 / 4)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]) -> None:
        """Analyse ``modelpool`` and write the results; returns ``None`` (nothing to evaluate)."""
        self.start_run()
        modelpool = self.coerce_pool(modelpool)
        out_dir = self.output_path()  # refuses a save_path in use before anything is computed
        opening = self.open_pool(modelpool, "STI", minimum=2)
        base, names, ranks, device = opening.base, opening.names, opening.ranks, opening.device
        keys = unique_storage_keys(base, opening.matrix_keys)  # tied weights: one storage, analysed once
        if not keys:
            raise ValueError("the pretrained model has no 2-D parameters to analyse (after 'exclude_keys')")
        itemsize = torch.empty(0, dtype=compute_dtype(base[keys[0]].dtype)).element_size()
        groups = layer_groups({k: base[k].shape for k in keys}, ranks, len(names), itemsize, 3 * self.block_bytes(),
                              self.full_rank)
        log.info(f"STI: T={len(names)} tasks {names}; {len(keys)} matrices; full_rank={self.full_rank}; "
                 f"device={device}; {len(groups)} pass(es) over the modelpool")
        rows: List[dict] = []
        pairwise, pairwise_normalized = torch.zeros(2, len(names), len(names), dtype=torch.float64)
        for g, group in enumerate(groups):
            kept: Dict[str, list] = {k: [] for k in group}
            options: Dict[str, list] = {}
            for _, _, state in iter_finetuned_states(
                modelpool, base, desc=f"STI: pass {g + 1}/{len(groups)}", show_pbar=self.show_pbar,
                profile=self.profile, allow_missing_keys=self.allow_missing_keys,
            ):
                keep_task(state, base, ranks, kept, device, self.full_rank, self.profile, opening.theta_rms, options)
            for key in tqdm(group, desc="STI: layers", leave=False, disable=not self.show_pbar):
                with self.profile("interference"), bounded_threads(len(names) * base[key].numel()):
                    row, pair, pair_norm = analyse_layer(key, kept.pop(key), ranks[key], device, self.full_rank,
                                                         self.block_bytes(), options.pop(key, ()))
                rows.append(row)
                pairwise += pair
                pairwise_normalized += pair_norm
                self.fabric.log_dict({f"sti/{c}": row[c] for c in VALUE_COLUMNS if row[c] is not None}, step=len(rows) - 1)
        self.results = summarize(names, rows, pairwise, pairwise_normalized, self.rank, self.full_rank)
        self.fabric.log_dict({f"sti_total/{k}": v for k, v in self.results["totals"].items()}, step=0)
        log.info("STI totals: " + ", ".join(f"{k}={v:.6g}" for k, v in self.results["totals"].items()))
        self.write_outputs(out_dir, self.results)
        totals = self.results["totals"]
        shown = {"sti_normalized_mean": "STI / ||Σ||₁ at rank k, mean over layers",
                 "sti_decorrelated_normalized_mean": "after TSV-M's decorrelation",
                 "sti_full_normalized_mean": "at full rank", "cosine_mean": "mean pairwise cosine of the task vectors"}
        self.finish_run("STI profile", {"k": self.k_option(ranks), "T": len(names), "full_rank": self.full_rank},
                        results={label: f"{totals[key]:.4g}" for key, label in shown.items() if key in totals},
                        outputs={"results (sti.json, sti.csv, figures)": out_dir})

    def write_outputs(self, out_dir: Optional[Path], results: dict) -> None:
        """The output files (:func:`~.sti_report.write_files`), written together as one directory
        (:func:`~fusion_bench_tsv.io.outputs.write_output_dir`); only a warning when ``out_dir`` is None."""
        if out_dir is None:
            log.warning("STI: no save_path and no Fabric log directory: results are only in self.results")
            return
        with self.profile("write outputs"):
            write_output_dir(out_dir, lambda tmp: write_files(tmp, results), "STI")
        log.info(f"STI: results written to {out_dir}")
