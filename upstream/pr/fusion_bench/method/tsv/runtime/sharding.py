"""Split layers across the processes of a Lightning Fabric run and collect the results on rank 0.

The per-layer computation is independent of the split (each layer sees the same inputs in the same
order whichever rank computes it), so rank 0 assembles the same model a single process would make.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping

from torch import Tensor

__all__ = ["split_by_size", "send_to_rank_zero"]


def split_by_size(sizes: Mapping[str, int], world_size: int) -> List[List[str]]:
    """Assign keys to ``world_size`` ranks balancing the total size (largest first, to the least loaded
    rank; ties to the lowest rank). Deterministic; each rank's keys keep the order of ``sizes``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = {key: i for i, key in enumerate(sizes)}
    loads = [0] * world_size
    owner: Dict[str, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], order[k])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[key] = rank
        loads[rank] += sizes[key]
    return [[k for k in sizes if owner[k] == r] for r in range(world_size)]


def send_to_rank_zero(fabric, values: Dict[str, Tensor], write: Callable[[str, Tensor], None]) -> None:
    """Every rank's ``values`` reach rank 0, which calls ``write(key, value)`` for those of ranks ≥ 1.

    One ``fabric.broadcast`` per sending rank (Fabric's own collective; ``gloo`` on CPU, NCCL on GPUs,
    tensors travel on the CPU). Every rank must call this, in the same order.
    """
    for src in range(1, fabric.world_size):
        payload = {k: v.cpu() for k, v in values.items()} if fabric.global_rank == src else None
        received = fabric.broadcast(payload, src=src)
        if fabric.global_rank == 0:
            for key, value in received.items():
                write(key, value)
        del received, payload
