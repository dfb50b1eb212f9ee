"""Task Singular Vectors (Gargiulo et al., CVPR 2025, arXiv:2412.00081): TSV-M, TSV-C and STI.

Streaming implementations: one fine-tuned model (or one layer) in memory at a time.
"""

# flake8: noqa F401
from .methods.sti import STIAnalysis
from .methods.tsv_compress import TSVCompressAlgorithm
from .methods.tsv_merge import TSVMergeAlgorithm
