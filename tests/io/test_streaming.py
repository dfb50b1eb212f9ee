"""io/streaming.py: lazy (tensor by tensor) iteration equals loading the models, builds none, and names the
model and key in its errors."""

from __future__ import annotations

from support import local_clip_pool

from copy import deepcopy

import pytest
import torch
from oracles import assert_state_within, oracle_merge_state
from safetensors.torch import load_file, save_file

from fusion_bench_tsv import TSVMergeAlgorithm
from fusion_bench_tsv.io.safetensors_state import SafetensorsState
from fusion_bench_tsv.io.streaming import iter_finetuned_states


def test_lazy_iteration_matches_load_model_and_builds_no_model(tiny_pool, monkeypatch):
    pool = local_clip_pool(tiny_pool)
    reference = pool.load_pretrained_model().state_dict()
    eager = {name: deepcopy(dict(state)) for _, name, state in iter_finetuned_states(pool, reference, show_pbar=False)}
    calls = []
    monkeypatch.setattr(pool, "load_model", lambda name, *a, **k: calls.append(name))
    for _, name, state in iter_finetuned_states(pool, reference, show_pbar=False, lazy=True):
        assert isinstance(state, SafetensorsState)
        assert state.keys() == eager[name].keys()
        for key in state:
            assert torch.equal(state[key], eager[name][key]), (name, key)
    assert calls == []


def test_lazy_merge_equals_eager_merge_and_gram_equals_svd(tiny_pool):
    lazy_gram = TSVMergeAlgorithm(show_pbar=False).run(local_clip_pool(tiny_pool)).state_dict()
    eager_gram = TSVMergeAlgorithm(show_pbar=False, lazy_loading=False).run(local_clip_pool(tiny_pool)).state_dict()
    lazy_svd = TSVMergeAlgorithm(show_pbar=False, svd_method="svd").run(local_clip_pool(tiny_pool)).state_dict()
    for key in lazy_gram:
        assert torch.equal(lazy_gram[key], eager_gram[key]), key
    # float64 Gram paths vs float32 SVDs: each within its derived bound of the float64 oracle
    pool = local_clip_pool(tiny_pool)
    base = pool.load_pretrained_model().state_dict()
    states = [pool.load_model(t).state_dict() for t in tiny_pool["tasks"]]
    expected, bounds64 = oracle_merge_state(base, states, torch.float64, gram=True)
    _, bounds32 = oracle_merge_state(base, states, torch.float32)
    assert_state_within(lazy_gram, expected, bounds64, "gram")
    assert_state_within(lazy_svd, expected, bounds32, "svd")


def test_lazy_errors_name_model_and_key(tiny_pool, tmp_path):
    import shutil

    task = tiny_pool["tasks"][1]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pool["paths"][task], broken)
    state = load_file(str(broken / "model.safetensors"))
    key = next(k for k, v in state.items() if v.dim() == 2 and "fc1" in k)
    state[key][0, 0] = float("inf")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model '{task}': parameter '{key}' contains NaN or Inf"):
        TSVMergeAlgorithm(show_pbar=False).run(local_clip_pool(tiny_pool, **{task: str(broken)}))
    # a checkpoint that lacks a parameter is refused; accepted (allow_missing_keys) it is not read lazily but
    # goes through load_model
    other = {k: v for k, v in state.items() if k != key}
    save_file(other, str(broken / "model.safetensors"), metadata={"format": "pt"})
    pool = local_clip_pool(tiny_pool, **{task: str(broken)})
    reference = pool.load_pretrained_model().state_dict()
    with pytest.raises(ValueError, match=rf"model '{task}': the checkpoint {broken} lacks 1 parameter\(s\).*'{key}'"):
        list(iter_finetuned_states(pool, reference, show_pbar=False, lazy=True))
    kinds = {name: type(state) for _, name, state in iter_finetuned_states(
        pool, reference, show_pbar=False, lazy=True, allow_missing_keys=True)}
    assert kinds[task] is not SafetensorsState
    assert all(kind is SafetensorsState for name, kind in kinds.items() if name != task)
