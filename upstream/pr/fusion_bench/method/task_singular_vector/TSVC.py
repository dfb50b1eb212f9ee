"""Task Singular Vector Compression (TSV-C): implemented by :mod:`fusion_bench.method.tsv.methods.tsv_compress`.

This module used to hold a stub whose ``run`` raised ``NotImplementedError``; the name is kept for imports.
"""

from ..tsv.methods.tsv_compress import TSVCompressAlgorithm as TaskSingularVectorCompression

__all__ = ["TaskSingularVectorCompression"]
