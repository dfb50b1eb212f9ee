"""Task Singular Vectors (Gargiulo et al., CVPR 2025) for FusionBench: TSV-M, TSV-C and STI.

The algorithms are imported lazily so that :mod:`fusion_bench_tsv.functional` stays importable
without loading FusionBench.
"""

from importlib import import_module
from typing import Any

from .compat import ensure_typing_override
from .benchmark.data_root import register_data_root_resolver

ensure_typing_override()
register_data_root_resolver()  # ${tsv_data_root:} of the offline benchmark's configs, also for OmegaConf.load

__version__ = "0.1.0"

_LAZY = {
    "STIAnalysis": "fusion_bench_tsv.methods.sti",
    "TSVMergeAlgorithm": "fusion_bench_tsv.methods.tsv_merge",
    "TSVCompressAlgorithm": "fusion_bench_tsv.methods.tsv_compress",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusion_bench_tsv' has no attribute {name!r}")
