"""Save a merged Hugging Face model (sharded safetensors, config, tokenizer) atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

from torch import nn

from .outputs import write_output_dir

log = logging.getLogger(__name__)

__all__ = ["save_hf_model"]


def save_hf_model(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    tokenizer=None,
    max_shard_size: Union[str, int] = "5GB",
) -> Path:
    """``model.save_pretrained(path, max_shard_size=...)`` (safetensors; sharded with a
    ``model.safetensors.index.json`` above ``max_shard_size``) and ``tokenizer.save_pretrained(path)``,
    written into a temporary directory next to ``path`` and renamed into place
    (:func:`~.outputs.write_output_dir`: an existing ``path`` is replaced only when empty or an unchanged
    TSV-M output). ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load it.
    Not FusionBench's ``modelpool.save_model``: it writes into ``path`` in place, over whatever is there.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"cannot save a {type(model).__name__} in Hugging Face format: it has no save_pretrained")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    out = write_output_dir(path, write, "TSV-M")
    log.info(f"merged model written to {out} (max_shard_size={max_shard_size}, tokenizer={'yes' if tokenizer is not None else 'no'})")
    return out
