"""io/safetensors_state.py: the lazy reader reads, casts and checks tensors, and follows only index entries
inside the checkpoint."""

from __future__ import annotations

import json
import re


import pytest
import torch
from safetensors.torch import save_file

from fusion_bench_tsv.io.safetensors_state import SafetensorsState


# ------------------------------------------------------------------------------ lazy safetensors I/O
def test_safetensors_state_reads_casts_and_checks(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2, 2).half()}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ref = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64), "h": torch.zeros(2, 2)}
    state = SafetensorsState(tmp_path / "m.safetensors", "task_x", ref)
    assert set(state) == {"a", "b", "h"} and len(state) == 3 and state.shape_of("a") == (3, 4)
    assert torch.equal(state["a"], tensors["a"]) and torch.equal(state["b"], tensors["b"])
    assert state["h"].dtype == torch.float32 and torch.equal(state["h"], tensors["h"].float())
    bad = dict(tensors, a=torch.tensor([[1.0, float("nan")]]))
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="model 'task_y': parameter 'a' contains NaN or Inf"):
        SafetensorsState(tmp_path / "bad.safetensors", "task_y")["a"]


def _shards(tmp_path, weight_map: dict):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../outside.safetensors"])
def test_lazy_reader_refuses_weight_map_entries_outside_the_checkpoint(tmp_path, entry):
    from fusion_bench_tsv.io.safetensors_state import SafetensorsState

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"b": torch.zeros(3)}, str(tmp_path / "outside.safetensors"))
    _shards(ckpt, {"a": "model-00001.safetensors", "b": entry})
    with pytest.raises(ValueError, match=rf"model 'task_x': weight_map entry 'b' of .*: '{re.escape(entry)}' points outside {ckpt}"):
        SafetensorsState(ckpt, "task_x")


def test_lazy_reader_follows_weight_map_entries_inside_the_checkpoint(tmp_path):
    from fusion_bench_tsv.io.safetensors_state import SafetensorsState

    _shards(tmp_path, {"a": "./model-00001.safetensors"})
    assert torch.equal(SafetensorsState(tmp_path, "task_x")["a"], torch.ones(2))


def test_header_gives_dtypes_and_shapes_of_any_safetensors_dtype(tmp_path):
    tensors = {
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
        "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
        "mask": torch.tensor([True, False]),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    state = SafetensorsState(tmp_path / "m.safetensors", "task_x")
    assert {k: state.stored_dtype(k) for k in state} == {k: v.dtype for k, v in tensors.items()}
    assert {k: state.shape_of(k) for k in state} == {k: v.shape for k, v in tensors.items()}
    for key, value in tensors.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key].float(), value.float()), key
