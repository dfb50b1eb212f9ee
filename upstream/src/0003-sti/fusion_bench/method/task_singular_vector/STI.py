"""Singular Task Interference (STI) of a model pool, per layer: Gargiulo et al., CVPR
2025 (arXiv:2412.00081), Eq. 4. See docs/algorithms/task_singular_vector.md."""

import csv
import json
import logging
import os
from fnmatch import fnmatch
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, auto_register_config

from .utils.interference import layer_interference, task_cosine_similarity, task_factors

log = logging.getLogger(__name__)


@auto_register_config
class SingularTaskInterference(LightningFabricMixin, BaseAlgorithm):
    R"""
    Per-layer STI $\lVert (U^\top U - I) \Sigma (V^\top V - I) \rVert_1$ (entrywise) of
    the task vectors $\Delta_i = \theta_i - \theta_0$ of every 2-D parameter, at rank
    $k$, after TSVM's decorrelation and at full rank, each also divided by the sum of
    the singular values, the mean pairwise cosine of the task vectors and the pairwise
    STI at rank $k$. Writes `sti.json` and `sti.csv`; returns None (nothing to
    evaluate).

    Args:
        rank: per-task rank $k$ (None: $\max(1, \lfloor \min(m, n) / T \rfloor)$).
        full_rank: also the STI at full rank (else only rank-$k$ factors are computed).
        exclude_keys: `fnmatch` patterns of parameters to skip (TSVM's: exact names).
        output_path: directory of the files (None: the log directory, else the cwd).
    """

    def __init__(
        self,
        rank: Optional[int] = None,
        full_rank: bool = True,
        exclude_keys: Optional[List[str]] = None,
        output_path: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]) -> None:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        names = modelpool.model_names
        if len(names) < 2:
            raise ValueError(f"STI needs at least 2 fine-tuned models, got {names}")
        base = modelpool.load_pretrained_model().state_dict()
        keys = [
            key
            for key, value in base.items()
            if value.dim() == 2 and value.is_floating_point()
            if not any(fnmatch(key, p) for p in self.exclude_keys or ())
        ]
        if not keys:
            raise ValueError("no 2-D parameters to analyse (after exclude_keys)")
        for key in keys:
            if self.rank is not None and not 1 <= self.rank <= min(base[key].shape):
                raise ValueError(
                    f"rank={self.rank} is out of range for parameter '{key}' of shape "
                    f"{tuple(base[key].shape)}: choose 1 <= rank <= min(m, n)"
                )
        deltas: Dict[str, List[Tensor]] = {key: [] for key in keys}
        for name in names:  # one fine-tuned model in memory at a time
            state = modelpool.load_model(name).state_dict()
            for key in keys:
                if key not in state or state[key].shape != base[key].shape:
                    raise ValueError(
                        f"model '{name}' has no parameter '{key}' of shape "
                        f"{tuple(base[key].shape)} (the pretrained model's)"
                    )
                deltas[key].append(state[key] - base[key])

        rows, pairwise, pairwise_normalized = [], 0.0, 0.0
        for key in keys:
            tasks = deltas.pop(key)
            m, n = tasks[0].shape
            k = self.rank or max(1, min(m, n) // len(names))
            factors = task_factors(tasks, min(m, n) if self.full_rank else k)
            cosine = task_cosine_similarity(tasks) if self.full_rank else None
            values, pair, pair_normalized = layer_interference(
                factors, k, full_rank=self.full_rank, cosine=cosine
            )
            rows.append({"layer": key, "shape": f"{m}x{n}", "k": k, **values})
            pairwise = pairwise + pair
            pairwise_normalized = pairwise_normalized + pair_normalized / len(keys)
        results = {
            "tasks": names,
            "mean_over_layers": {
                column: sum(r[column] for r in rows) / len(rows)
                for column in list(rows[0])[4:]  # after layer, shape, k, kept
                if rows[0][column] is not None
            },
            "layers": rows,
            "pairwise_sti_sum": pairwise.tolist(),
            "pairwise_sti_normalized_mean": pairwise_normalized.tolist(),
        }
        log.info(f"STI, mean over {len(rows)} layers: {results['mean_over_layers']}")
        self.results = results
        self._save(results)

    def _save(self, results: dict) -> None:
        out_dir = self.output_path or self.log_dir or os.getcwd()
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sti.json.tmp"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(out_dir, "sti.csv.tmp"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results["layers"][0]))
            writer.writeheader()
            for row in results["layers"]:
                writer.writerow({**row, "kept": " ".join(map(str, row["kept"]))})
        for name in ("sti.json", "sti.csv"):  # complete files only
            os.replace(
                os.path.join(out_dir, f"{name}.tmp"), os.path.join(out_dir, name)
            )
        log.info(f"STI: results written to {out_dir}")
