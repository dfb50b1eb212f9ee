"""The TSV-C checkpoint (one .safetensors file) is verified when loaded: the digests of its metadata, of each
task and of the base model, and every tensor's shape and values. Every damage or edit is refused with an
error naming the file and the entry, task or tensor."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench_tsv import TSVCompressAlgorithm
from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state
from fusion_bench_tsv.io.compressed_checkpoint import TENSOR_FILE, metadata_digest, task_digest

VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8)
Q = "vision_model.encoder.layers.0.self_attn.q_proj.weight"  # 16 x 16, k = 2
FC1 = "vision_model.encoder.layers.1.mlp.fc1.weight"  # 32 x 16
BIAS = "vision_model.post_layernorm.bias"


def _pool(seed: int) -> dict:
    torch.manual_seed(0)
    base = CLIPVisionModel(VISION).eval()
    pool = {"_pretrained_": base}
    for i, name in enumerate(["alpha", "beta"]):
        pool[name] = CLIPVisionModel(VISION).eval()
        pool[name].load_state_dict(synthetic_task_state(base.state_dict(), seed=seed + i))
    return pool


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of the same base model and shapes (rank 2), from different fine-tuned models."""
    root = tmp_path_factory.mktemp("tsv_c")
    pool = _pool(seed=1)
    for name, seed in (("ckpt", 1), ("other", 7)):
        TSVCompressAlgorithm(show_pbar=False, device="cpu", routed_eval=False, rank=2,
                             save_path=str(root / name)).run(_pool(seed))
    return root, pool["_pretrained_"]


def _metadata(d: Path) -> dict:
    with safe_open(str(d / TENSOR_FILE), framework="pt") as f:
        return f.metadata()


def _rewrite(d: Path, edit_tensors=None, edit_metadata=None, fix_digests: bool = False) -> None:
    """Write the file again with its tensors and/or metadata edited; ``fix_digests``: the task digests and the
    metadata digest recomputed (an edit made consistent, reaching the checks behind them)."""
    tensors, metadata = load_file(d / TENSOR_FILE), _metadata(d)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        entries = {k: json.loads(v) for k, v in metadata.items() if k in ("tasks", "matrices", "others")}
        edit_metadata(entries)
        metadata.update({k: json.dumps(v) for k, v in entries.items()})
    if fix_digests:
        names = json.loads(metadata["tasks"])
        metadata["task_sha256"] = json.dumps({
            name: task_digest(name, {k[len(f"t{i}"):]: v for k, v in tensors.items() if k.startswith(f"t{i}/")})
            for i, name in enumerate(names)})
        metadata["sha256"] = metadata_digest(metadata)
    save_file(tensors, str(d / TENSOR_FILE), metadata=metadata)


def _swap_two_values_in_place(d: Path) -> None:
    data = bytearray((d / TENSOR_FILE).read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    begin = json.loads(data[8:8 + size])[f"t0/{Q}/U"]["data_offsets"][0] + 8 + size
    data[begin:begin + 4], data[begin + 4:begin + 8] = data[begin + 4:begin + 8], data[begin:begin + 4]
    (d / TENSOR_FILE).write_bytes(bytes(data))


def _transpose_q(t):
    t[f"t0/{Q}/U"], t[f"t0/{Q}/Vh"] = t[f"t0/{Q}/Vh"].T.contiguous(), t[f"t0/{Q}/U"].T.contiguous()


def _transpose_fc1(t):
    t[f"t0/{FC1}/U"], t[f"t0/{FC1}/Vh"] = t[f"t0/{FC1}/Vh"].T.contiguous(), t[f"t0/{FC1}/U"].T.contiguous()


def _nan_in_u(t):
    t[f"t0/{FC1}/U"][3, 1] = float("nan")


def _u_times_10(t):
    t[f"t0/{FC1}/U"] *= 10


def _u_wrong_shape(t):
    t[f"t0/{FC1}/U"] = torch.cat([t[f"t0/{FC1}/U"], torch.zeros(32, 1)], dim=1)


def _bias_half(t):
    t[f"t0/{BIAS}"] = t[f"t0/{BIAS}"].half()


def _swap_task_names(m):
    m["tasks"].reverse()


def _wrong_k(m):
    m["matrices"][FC1]["k"][0] = 1


def _k_zero(m):
    m["matrices"][FC1]["k"][0] = 0


def _digest_of_edited_metadata(d: Path) -> None:
    metadata = _metadata(d)
    metadata["base_model"] = "someone/else"
    save_file(load_file(d / TENSOR_FILE), str(d / TENSOR_FILE), metadata=metadata)


def _old_format(d: Path, root: Path) -> None:
    (d / TENSOR_FILE).rename(d / "task_vectors.safetensors")
    (d / "manifest.json").write_text("{}")


FILE = "{d}/" + TENSOR_FILE
TASK_SUM = FILE + ": the tensors of task 'alpha' \\(prefix 't[01]'\\) do not match its SHA-256"
EDITED = FILE + ": its metadata does not match their SHA-256 \\(metadata entry 'sha256'\\)"
CASES = {
    "two values swapped": (lambda d, root: _swap_two_values_in_place(d), TASK_SUM),
    "q_proj transposed": (lambda d, root: _rewrite(d, _transpose_q), TASK_SUM),
    "fc1 transposed, digests fixed": (
        lambda d, root: _rewrite(d, _transpose_fc1, fix_digests=True),
        FILE + f": task 'alpha': tensor 't0/{FC1}/U' has shape \\[16, 2\\], the metadata says \\[32, 2\\]"),
    "task names swapped in the metadata": (lambda d, root: _rewrite(d, edit_metadata=_swap_task_names), EDITED),
    "task names swapped, metadata digest fixed": (
        lambda d, root: (_rewrite(d, edit_metadata=_swap_task_names), _fix_metadata_digest(d)), TASK_SUM),
    "a metadata value edited": (lambda d, root: _digest_of_edited_metadata(d), EDITED),
    "NaN in U": (lambda d, root: _rewrite(d, _nan_in_u), TASK_SUM),
    "U times 10": (lambda d, root: _rewrite(d, _u_times_10), TASK_SUM),
    "bias stored as float16": (lambda d, root: _rewrite(d, _bias_half), TASK_SUM),
    "U of the wrong shape": (lambda d, root: _rewrite(d, _u_wrong_shape, fix_digests=True),
                             FILE + f": task 'alpha': tensor 't0/{FC1}/U' has shape \\[32, 3\\], the metadata "
                             "says \\[32, 2\\]"),
    "wrong k in the metadata": (lambda d, root: _rewrite(d, edit_metadata=_wrong_k, fix_digests=True),
                                FILE + f": task 'alpha': tensor 't0/{FC1}/U' has shape \\[32, 2\\], the metadata "
                                "says \\[32, 1\\]"),
    "k = 0 in the metadata": (lambda d, root: _rewrite(d, edit_metadata=_k_zero, fix_digests=True),
                              FILE + f": metadata 'matrices' entry '{FC1}' is malformed"),
    "truncated tensor file": (lambda d, root: (d / TENSOR_FILE).write_bytes((d / TENSOR_FILE).read_bytes()[:-100]),
                              FILE + " is not a readable safetensors file \\(.*file not fully covered\\)"),
    "invalid metadata JSON": (
        lambda d, root: (_rewrite(d, edit_metadata=lambda m: m.update(others="{")), _fix_metadata_digest(d)),
        FILE + ": metadata entry 'others' is malformed"),
    "older format": (_old_format, "{d}: a TSV-C checkpoint of the older format \\(manifest.json"),
}


def _fix_metadata_digest(d: Path) -> None:
    metadata = _metadata(d)
    metadata["sha256"] = metadata_digest(metadata)
    save_file(load_file(d / TENSOR_FILE), str(d / TENSOR_FILE), metadata=metadata)


@pytest.mark.parametrize("case", CASES)
def test_damaged_or_edited_checkpoint_is_refused_naming_file_and_task(checkpoints, tmp_path, case):
    from fusion_bench_tsv.io.compressed_checkpoint import load_task_model

    root, base = checkpoints
    d = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", d)
    load_task_model(d, "alpha", base)  # the copy is intact
    d = tmp_path / "tampered" / "ckpt"  # a fresh path: nothing verified before
    shutil.copytree(root / "ckpt", d)
    tamper, pattern = CASES[case]
    tamper(d, root)
    with pytest.raises(ValueError, match=pattern.format(d=re.escape(str(d)))):
        load_task_model(d, "alpha", base)


def test_base_model_off_by_1e4_in_one_value_is_refused(checkpoints):
    from fusion_bench_tsv.io.compressed_checkpoint import load_task_model

    root, base = checkpoints
    shifted = CLIPVisionModel(VISION).eval()
    shifted.load_state_dict(base.state_dict())
    with torch.no_grad():
        shifted.state_dict()[FC1][5, 7] += 1e-4
    with pytest.raises(ValueError, match=rf"parameter '{re.escape(FC1)}' of the base model differs"):
        load_task_model(root / "ckpt", "alpha", shifted)
    half = CLIPVisionModel(VISION).eval().to(torch.float16)
    half.load_state_dict(base.state_dict())
    with pytest.raises(ValueError, match=r"of the base model is float16, the checkpoint was made from float32"):
        load_task_model(root / "ckpt", "alpha", half)


def test_verify_checkpoint_reads_every_task(checkpoints):
    from fusion_bench_tsv.io.compressed_checkpoint import VERSION, verify_checkpoint

    root, _ = checkpoints
    info = verify_checkpoint(root / "ckpt")
    assert info["version"] == VERSION and info["tasks"] == ["alpha", "beta"]
    assert sorted(info["task_sha256"]) == ["alpha", "beta"] and all(len(s) == 64 for s in info["task_sha256"].values())


def test_non_finite_factor_with_matching_checksums_is_refused_naming_file_and_tensor(checkpoints, tmp_path):
    """A NaN written into U with every digest made consistent (task and metadata): refused by the finite check."""
    from fusion_bench_tsv.io.compressed_checkpoint import load_task_model

    root, base = checkpoints
    d = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", d)
    _rewrite(d, _nan_in_u, fix_digests=True)
    with pytest.raises(ValueError, match=re.escape(f"{d / TENSOR_FILE}: task 'alpha': tensor 't0/{FC1}/U' holds NaN")):
        load_task_model(d, "alpha", base)
    load_task_model(d, "beta", base)  # the other task is finite and loads


def test_edit_restoring_size_and_mtime_is_refused_after_a_verified_load(checkpoints, tmp_path):
    """Within one process: load (verified), edit the file in place, put its size and mtime back: refused."""
    from fusion_bench_tsv.io.compressed_checkpoint import load_task_model

    root, base = checkpoints
    d = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", d)
    load_task_model(d, "alpha", base)
    st = (d / TENSOR_FILE).stat()
    _swap_two_values_in_place(d)
    os.utime(d / TENSOR_FILE, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = (d / TENSOR_FILE).stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    with pytest.raises(ValueError, match=re.escape(f"{d / TENSOR_FILE}: the tensors of task 'alpha' (prefix 't0') do")):
        load_task_model(d, "alpha", base)
