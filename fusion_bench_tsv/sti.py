R"""
Singular Task Interference (STI) analysis of a modelpool, per layer, before and after TSV-M.

For every weight matrix with task updates ``Δᵢ = θᵢ − θ₀`` it measures
``STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁`` (entrywise L1; Gargiulo et al., "Task Singular Vectors: Reducing
Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081, Eq. 4):

- of the full-rank task matrices (``full_rank: true``),
- of their rank-k truncations (k = floor(min(m, n) / T) or ``rank``), as TSV-M uses them,
- of the same rank-k factors after TSV-M's decorrelation (≈ 0 by construction when T·k ≤ min(m, n)),
- each also normalized by ‖Σ‖₁ (the sum of the singular values) so that layers compare,

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
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config

from .functional import (
    SVDFactors,
    compute_dtype,
    layer_rank,
    mean_pairwise_cosine,
    pairwise_sti_from_factors,
    sti_from_factors,
    task_cosine_similarity,
    truncate_factors,
    truncated_svd,
)
from .atomic import write_atomic
from .options import validate_options
from .outputs import output_dir, write_output_dir
from .parallel import bounded_threads
from .streaming import (
    as_modelpool,
    check_finite,
    DEFAULT_EXCLUDE_KEYS,
    finetuned_model_names,
    iter_finetuned_states,
    load_pretrained_model,
    split_keys,
    state_dict_of,
)

log = logging.getLogger(__name__)

__all__ = ["STIAnalysis"]


CSV_COLUMNS = [
    "layer",
    "shape",
    "k",
    "sti_full",
    "sti_full_normalized",
    "sti",
    "sti_normalized",
    "sti_decorrelated",
    "sti_decorrelated_normalized",
    "cosine_mean",
]


def short_layer_names(keys: Sequence[str]) -> List[str]:
    """Drop the dotted prefix shared by all ``keys`` and a trailing ``.weight``, for plot labels."""
    parts = [k.split(".") for k in keys]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    names = [".".join(p[common:]) for p in parts]
    return [n[: -len(".weight")] if n.endswith(".weight") else n for n in names]


@auto_register_config
class STIAnalysis(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """Per-layer Singular Task Interference before and after TSV-M's decorrelation.

    Args:
        rank: per-task rank k of the truncated analysis; ``None`` (default) is ``floor(min(m, n) / T)``,
            at least 1, as TSV-M uses it.
        full_rank: also measure STI of the full-rank task matrices (and the exact cosine similarity);
            ``False`` keeps only rank-k factors and the cosine is that of the rank-k approximations.
        max_memory_gb: budget for the analysis' tensors: what is kept between model loads (the full task
            matrices, or the rank-k factors, of all T tasks) for a group of layers and one layer's
            decomposition fit three quarters of it (one pass over the modelpool per group); the blocks of
            the interference product the last quarter. A layer larger than that is analysed alone.
        exclude_keys: glob patterns of parameter names not analysed (default as TSV-M).
        device: where the linear algebra runs; ``None`` is the Fabric device.
        save_path: the directory the files go to (``{log_dir}``: the run's log dir); ``None`` (default)
            and the log dir itself mean ``<log_dir>/sti``. Without a log dir (no Fabric logger, e.g. from
            Python) and no ``save_path`` nothing is written; results stay in ``self.results``. An existing
            path is replaced only when it is an empty directory or one this package wrote.
        show_pbar: progress bars.
        allow_missing_keys: accept a checkpoint (fine-tuned or pretrained) that lacks parameters of the
            model it is loaded into; ``from_pretrained`` fills them with random values. ``False`` (default)
            refuses it with an error naming the model and the keys.
    """

    def __init__(
        self,
        rank: Optional[int] = None,
        full_rank: bool = True,
        max_memory_gb: float = 4.0,
        exclude_keys: Optional[Sequence[str]] = DEFAULT_EXCLUDE_KEYS,
        device: Optional[str] = None,
        save_path: Optional[str] = None,
        show_pbar: bool = True,
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(**validate_options(self, kwargs))
        self.results: Optional[dict] = None

    def _device(self) -> torch.device:
        return torch.device(self.device) if self.device is not None else self.fabric.device

    def layer_ranks(self, shapes: Dict[str, torch.Size], num_tasks: int) -> Dict[str, int]:
        """The per-task rank k of every matrix, validated against its shape."""
        return {key: layer_rank(shape, num_tasks, rank=self.rank, name=key) for key, shape in shapes.items()}

    def block_bytes(self) -> int:
        """Budget of the blocks of a layer's interference product: a quarter of ``max_memory_gb``."""
        return int(self.max_memory_gb * 2**30 / 4)

    def layer_groups(self, shapes: Dict[str, torch.Size], ranks: Dict[str, int], num_tasks: int, itemsize: int):
        """Consecutive groups of matrices whose kept tensors (all T tasks) and the decomposition of the
        largest of them fit three quarters of ``max_memory_gb``."""
        budget = 3 * self.block_bytes()
        groups: List[List[str]] = [[]]
        used = work = 0.0
        for key, (m, n) in shapes.items():
            per_task = m * n if self.full_rank else ranks[key] * (m + n + 1)
            size = num_tasks * per_task * itemsize
            # the analysis holds about three factor-sized copies: the factors, their concatenation and
            # one more of that size (the decorrelated factors; W of the full-rank product)
            r = min(m, n) if self.full_rank else ranks[key]
            layer_work = 3 * num_tasks * r * (m + n + 1) * itemsize
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

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]) -> None:
        """Analyse ``modelpool`` and write the results; returns ``None`` (nothing to evaluate)."""
        modelpool = as_modelpool(modelpool, "STI")
        out_dir = self.output_path()  # refuses a save_path in use before anything is computed
        names = finetuned_model_names(modelpool, "STI", minimum=2)
        device = self._device()
        with self.profile("load pretrained"):
            pretrained = load_pretrained_model(modelpool, self.allow_missing_keys)
        base = state_dict_of(pretrained)
        check_finite(base, "_pretrained_")
        matrix_keys, _ = split_keys(base, list(self.exclude_keys or []))
        seen, keys = set(), []
        for key in matrix_keys:  # tied weights: one storage, analysed once
            if base[key].data_ptr() not in seen:
                seen.add(base[key].data_ptr())
                keys.append(key)
        if not keys:
            raise ValueError("the pretrained model has no 2-D parameters to analyse (after 'exclude_keys')")
        shapes = {k: base[k].shape for k in keys}
        ranks = self.layer_ranks(shapes, len(names))
        itemsize = torch.empty(0, dtype=compute_dtype(base[keys[0]].dtype)).element_size()
        groups = self.layer_groups(shapes, ranks, len(names), itemsize)
        log.info(
            f"STI: T={len(names)} tasks {names}; {len(keys)} matrices; full_rank={self.full_rank}; "
            f"device={device}; {len(groups)} pass(es) over the modelpool"
        )

        rows: List[dict] = []
        pairwise = torch.zeros(len(names), len(names), dtype=torch.float64)
        pairwise_normalized = torch.zeros_like(pairwise)
        for g, group in enumerate(groups):
            kept: Dict[str, list] = {k: [] for k in group}
            desc = f"STI: pass {g + 1}/{len(groups)}" if len(groups) > 1 else "STI: task vectors"
            for _, name, state in iter_finetuned_states(
                modelpool, base, desc=desc, show_pbar=self.show_pbar, profile=self.profile,
                allow_missing_keys=self.allow_missing_keys,
            ):
                for key in group:
                    work = compute_dtype(base[key].dtype)
                    with bounded_threads(base[key].numel()):
                        delta = state[key].to(device, work) - base[key].to(device, work)
                        if self.full_rank:
                            kept[key].append(delta.cpu())
                        else:
                            with self.profile("truncated svd"):
                                kept[key].append(SVDFactors(*(t.cpu() for t in truncated_svd(delta, ranks[key]))))
            for key in tqdm(group, desc="STI: layers", leave=False, disable=not self.show_pbar):
                with self.profile("interference"), bounded_threads(len(names) * base[key].numel()):
                    row, pair, pair_norm = self.analyse_layer(key, kept.pop(key), ranks[key], device)
                rows.append(row)
                pairwise += pair
                pairwise_normalized += pair_norm
                self.fabric.log_dict(
                    {f"sti/{c}": row[c] for c in CSV_COLUMNS[3:] if row[c] is not None}, step=len(rows) - 1
                )

        self.results = self.summarize(names, rows, pairwise, pairwise_normalized)
        self.fabric.log_dict({f"sti_total/{k}": v for k, v in self.results["totals"].items()}, step=0)
        log.info("STI totals: " + ", ".join(f"{k}={v:.6g}" for k, v in self.results["totals"].items()))
        if out_dir is None:
            log.warning("STI: no save_path and no Fabric log directory: results are only in self.results")
        else:
            with self.profile("write outputs"):
                self.write_outputs(out_dir, self.results)
            log.info(f"STI: results written to {out_dir}")
        self.print_profile_summary("STI profile")
        return None

    def output_path(self) -> Optional[Path]:
        """Where the files go: ``save_path``, by default ``<log_dir>/sti`` (None without a log dir), refused
        when something there was not written by this package (:func:`~.outputs.output_dir`)."""
        if self.save_path is None and self.log_dir is None:
            return None
        return output_dir(self.save_path or "{log_dir}", self.log_dir, "sti", "STI")

    def analyse_layer(self, key: str, kept: list, k: int, device: torch.device):
        """One layer's CSV row and its T × T pairwise STI (raw and normalized, float64 on CPU).

        ``kept`` (the T task matrices, or their factors) is consumed: each task matrix is released once
        it is decomposed."""
        max_bytes = self.block_bytes()
        if self.full_rank:
            kept = [d.to(device) for d in kept]
            cosine = mean_pairwise_cosine(task_cosine_similarity(kept))
            full = []
            while kept:
                d = kept.pop(0)
                full.append(truncated_svd(d, min(d.shape)))
                del d
            factors = [truncate_factors(f, k) for f in full]
        else:
            full = None
            factors = [SVDFactors(*(t.to(device) for t in f)) for f in kept]
            cosine = mean_pairwise_cosine(task_cosine_similarity(factors))

        def value(t: Tensor) -> float:
            return float(t.double())

        m, n = factors[0].U.shape[0], factors[0].Vh.shape[1]
        row = {"layer": key, "shape": f"{m}x{n}", "k": k}
        sigma_l1 = torch.stack([f.S.abs().sum() for f in factors])  # ‖Σᵢ‖₁ of each task at rank k
        row["sti_full"] = value(sti_from_factors(full, max_bytes=max_bytes)) if full else None
        row["sti_full_normalized"] = (
            row["sti_full"] / value(sum(f.S.abs().sum() for f in full)) if full else None
        )
        row["sti"] = value(sti_from_factors(factors, max_bytes=max_bytes))
        row["sti_normalized"] = row["sti"] / value(sigma_l1.sum())
        row["sti_decorrelated"] = value(sti_from_factors(factors, decorrelate=True, max_bytes=max_bytes))
        row["sti_decorrelated_normalized"] = row["sti_decorrelated"] / value(sigma_l1.sum())
        row["cosine_mean"] = value(cosine)
        # normalized pairwise entry (i, j): STI of {i, j} / (‖Σᵢ‖₁ + ‖Σⱼ‖₁), as pairwise_sti_from_factors does
        pair = pairwise_sti_from_factors(factors).double().cpu()
        pair_sigma = sigma_l1.double().cpu()
        pair_norm = pair / (pair_sigma[:, None] + pair_sigma[None, :])
        return row, pair, pair_norm

    def summarize(self, names: List[str], rows: List[dict], pairwise: Tensor, pairwise_normalized: Tensor) -> dict:
        def total(column: str, reduce) -> Optional[float]:
            values = [r[column] for r in rows if r[column] is not None]
            return reduce(values) if values else None

        mean = lambda v: sum(v) / len(v)  # noqa: E731
        totals = {
            "sti_full_sum": total("sti_full", sum),
            "sti_sum": total("sti", sum),
            "sti_decorrelated_sum": total("sti_decorrelated", sum),
            "sti_full_normalized_mean": total("sti_full_normalized", mean),
            "sti_normalized_mean": total("sti_normalized", mean),
            "sti_decorrelated_normalized_mean": total("sti_decorrelated_normalized", mean),
            "cosine_mean": total("cosine_mean", mean),
        }
        return {
            "tasks": names,
            "rank": self.rank,
            "full_rank": self.full_rank,
            "cosine_of": "full task vectors" if self.full_rank else "rank-k approximations",
            "norm": "entrywise L1: sum of |(U^T U - I) S (V^T V - I)|; normalized = divided by sum of singular values",
            "totals": {k: v for k, v in totals.items() if v is not None},
            "layers": rows,
            "pairwise": {
                "definition": "entry (i, j): STI at rank k of the two-task concatenation {i, j}, summed over layers; "
                "diagonal 0; normalized: per-layer STI / (||S_i||_1 + ||S_j||_1), averaged over layers",
                "sti_sum": pairwise.tolist(),
                "sti_normalized_mean": (pairwise_normalized / len(rows)).tolist(),
            },
        }

    def write_outputs(self, out_dir: Path, results: dict) -> None:
        """``sti.json``, ``sti.csv``, ``sti_per_layer.png`` and ``sti_pairwise.png``, written together as
        one directory (:func:`~.outputs.write_output_dir`)."""
        write_output_dir(out_dir, lambda tmp: self._write_files(tmp, results), "STI")

    def _write_files(self, out_dir: Path, results: dict) -> None:
        from .plots import heatmap, per_layer_bars

        (out_dir / "sti.json").write_text(json.dumps(results, indent=2))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in results["layers"]:
            writer.writerow({c: ("" if row[c] is None else row[c]) for c in CSV_COLUMNS})
        (out_dir / "sti.csv").write_text(buffer.getvalue())

        rows = results["layers"]
        series = {}
        if self.full_rank:
            series["full rank"] = [r["sti_full_normalized"] for r in rows]
        series["rank k (before TSV-M)"] = [r["sti_normalized"] for r in rows]
        series["rank k, decorrelated (after TSV-M)"] = [r["sti_decorrelated_normalized"] for r in rows]
        fig = per_layer_bars(
            short_layer_names([r["layer"] for r in rows]),
            series,
            title=f"Singular task interference per layer, T={len(results['tasks'])} tasks (log scale)",
            ylabel="STI / ||Σ||₁",
            log_scale=True,
        )
        fig.savefig(out_dir / "sti_per_layer.png", format="png", dpi=120)
        pairwise = [
            [float("nan") if i == j else v for j, v in enumerate(row)]
            for i, row in enumerate(results["pairwise"]["sti_sum"])
        ]
        fig = heatmap(
            pairwise,
            results["tasks"],
            title="Pairwise STI at rank k, summed over layers (diagonal: 0)",
            colorbar_label="STI",
        )
        fig.savefig(out_dir / "sti_pairwise.png", format="png", dpi=120)
