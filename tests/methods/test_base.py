"""methods/base.py: the one opening sequence and pool coercion that the three algorithms share."""

from __future__ import annotations

import logging

import pytest
import torch
from support import REPO_ROOT
from torch import nn

from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm, TSVMergeAlgorithm
from fusion_bench_tsv.methods.base import TSVAlgorithmBase


def test_one_modelpool_coercion_for_the_three_algorithms():
    """The pool is coerced and checked in methods/base.py only, which every algorithm inherits."""
    methods = REPO_ROOT / "fusion_bench_tsv" / "methods"
    callers = [p.name for p in sorted(methods.glob("*.py")) if "as_modelpool(" in p.read_text()
               or "BaseModelPool(" in p.read_text()]
    assert callers == ["base.py"], callers
    for cls in (TSVMergeAlgorithm, TSVCompressAlgorithm, STIAnalysis):
        assert issubclass(cls, TSVAlgorithmBase), cls


def _instance_pool():
    torch.manual_seed(0)
    pool = {"_pretrained_": nn.Linear(16, 12)}
    for name in ("a", "b"):
        pool[name] = nn.Linear(16, 12)
    return pool


@pytest.mark.parametrize("cls", [TSVMergeAlgorithm, TSVCompressAlgorithm, STIAnalysis])
def test_opening_copies_the_callers_model_splits_keys_and_logs_ranks(cls, caplog):
    pool = _instance_pool()
    algorithm = cls(device="cpu", show_pbar=False, rank=3)
    with caplog.at_level(logging.INFO):
        opening = algorithm.open_pool(algorithm.coerce_pool(pool), "test", minimum=2)
    assert opening.pretrained is not pool["_pretrained_"], "the caller's own instance was handed out"
    assert torch.equal(opening.base["weight"], pool["_pretrained_"].weight)
    assert (opening.names, opening.matrix_keys, opening.other_keys) == (["a", "b"], ["weight"], ["bias"])
    assert opening.ranks == {"weight": 3} and opening.device == torch.device("cpu")
    expected = f"{algorithm.method_name}: k per task of the matrices: 1 × (12, 16): 3 (6 of rank 12)"
    assert expected in caplog.messages, caplog.messages


def test_opening_refuses_a_pool_without_pretrained_naming_the_method():
    with pytest.raises(ValueError, match="^TSV-C needs the pretrained model under the key '_pretrained_'"):
        TSVCompressAlgorithm(device="cpu").coerce_pool({"a": nn.Linear(2, 2)})
