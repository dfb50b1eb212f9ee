"""The TSV-C checkpoint is verified when loaded: checksums of the file, of each task and of the base model,
and the manifest's shapes, ranks and dtypes against the tensors. Every damage or edit is refused with an
error naming the file and the task or tensor."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench_tsv import TSVCompressAlgorithm
from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8)
TENSOR_FILE, MANIFEST = "task_vectors.safetensors", "manifest.json"
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


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def _write_manifest(d: Path, manifest: dict) -> None:
    (d / MANIFEST).write_text(json.dumps(manifest))


def _fix_file_checksum(d: Path) -> None:
    """Record the tensor file's current size and SHA-256 in the manifest (an edit made consistent at file level)."""
    manifest = _manifest(d)
    data = (d / TENSOR_FILE).read_bytes()
    manifest["files"][TENSOR_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_manifest(d, manifest)


def _rewrite(d: Path, edit, fix_checksum: bool = True) -> None:
    tensors = load_file(d / TENSOR_FILE)
    edit(tensors)
    save_file(tensors, str(d / TENSOR_FILE), metadata={"format": "fusion_bench_tsv/tsv_c"})
    if fix_checksum:
        _fix_file_checksum(d)


def _swap_two_values_in_place(d: Path) -> None:
    data = bytearray((d / TENSOR_FILE).read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    begin = json.loads(data[8:8 + size])[f"t0/{Q}/U"]["data_offsets"][0] + 8 + size
    data[begin:begin + 4], data[begin + 4:begin + 8] = data[begin + 4:begin + 8], data[begin:begin + 4]
    (d / TENSOR_FILE).write_bytes(bytes(data))


def _transpose_q(t):
    t[f"t0/{Q}/U"], t[f"t0/{Q}/Vh"] = t[f"t0/{Q}/Vh"].T.contiguous(), t[f"t0/{Q}/U"].T.contiguous()


def _nan_in_u(t):
    t[f"t0/{FC1}/U"][3, 1] = float("nan")


def _u_times_10(t):
    t[f"t0/{FC1}/U"] *= 10


def _u_wrong_shape(t):
    t[f"t0/{FC1}/U"] = torch.cat([t[f"t0/{FC1}/U"], torch.zeros(32, 1)], dim=1)


def _swap_prefixes(m):
    m["tasks"][0]["prefix"], m["tasks"][1]["prefix"] = m["tasks"][1]["prefix"], m["tasks"][0]["prefix"]


def _wrong_k(m):
    m["matrices"][FC1]["k"][0] = 1


def _wrong_dtype(m):
    m["others"][BIAS]["dtype"] = "float16"


def _old_version(m):
    m["version"] = 1


def _escape_tensor_file(m):
    m["tensor_file"] = "../" + TENSOR_FILE


def _tensor_file_of_another_checkpoint(d: Path, root: Path) -> None:
    other = root / "other"
    shutil.copy(other / TENSOR_FILE, d / "other.safetensors")
    manifest = _manifest(d)
    manifest["tensor_file"] = "other.safetensors"
    manifest["files"] = {"other.safetensors": _manifest(other)["files"][TENSOR_FILE]}
    _write_manifest(d, manifest)


FILE = "{d}/" + TENSOR_FILE
TASK_SUM = FILE + ": the tensors of task 'alpha' \\(prefix 't[01]'\\) do not match its SHA-256 in manifest.json"
CASES = {
    "two values swapped": (lambda d, root: _swap_two_values_in_place(d), FILE + ": its SHA-256 differs from the one in manifest.json"),
    "two values swapped, file checksum updated": (
        lambda d, root: (_swap_two_values_in_place(d), _fix_file_checksum(d)), TASK_SUM),
    "q_proj transposed": (lambda d, root: _rewrite(d, _transpose_q), TASK_SUM),
    "task prefixes swapped in the manifest": (lambda d, root: _write_manifest(d, _swap(_manifest(d), _swap_prefixes)),
                                              TASK_SUM),
    "tensor_file of another checkpoint": (_tensor_file_of_another_checkpoint,
                                          "{d}/other.safetensors: the tensors of task 'alpha'"),
    "NaN in U": (lambda d, root: _rewrite(d, _nan_in_u), TASK_SUM),
    "U times 10": (lambda d, root: _rewrite(d, _u_times_10), TASK_SUM),
    "U of the wrong shape": (lambda d, root: _rewrite(d, _u_wrong_shape),
                             FILE + f": task 'alpha': tensor 't0/{FC1}/U' is F32 \\[32, 3\\], manifest.json describes "
                             "float32 \\[32, 2\\]"),
    "wrong k in the manifest": (lambda d, root: _write_manifest(d, _swap(_manifest(d), _wrong_k)),
                                FILE + f": task 'alpha': tensor 't0/{FC1}/U' is F32 \\[32, 2\\], manifest.json "
                                "describes float32 \\[32, 1\\]"),
    "wrong dtype in the manifest": (lambda d, root: _write_manifest(d, _swap(_manifest(d), _wrong_dtype)),
                                    FILE + f": task 'alpha': tensor 't0/{BIAS}' is F32 \\[16\\], manifest.json "
                                    "describes float16 \\[16\\]"),
    "truncated tensor file": (lambda d, root: (d / TENSOR_FILE).write_bytes((d / TENSOR_FILE).read_bytes()[:-100]),
                              FILE + " has \\d+ bytes, manifest.json records \\d+: the file is truncated"),
    "invalid manifest JSON": (lambda d, root: (d / MANIFEST).write_text((d / MANIFEST).read_text()[:-20]),
                              "{d}/manifest.json is not valid JSON"),
    "older format version": (lambda d, root: _write_manifest(d, _swap(_manifest(d), _old_version)),
                             "{d}/manifest.json: TSV-C checkpoint format version 1, written by an older "
                             "fusion_bench_tsv; .*Create it again"),
    "tensor_file outside the checkpoint": (lambda d, root: _write_manifest(d, _swap(_manifest(d), _escape_tensor_file)),
                                           "'tensor_file': '../task_vectors.safetensors' points outside {d}"),
}


def _swap(manifest: dict, edit) -> dict:
    edit(manifest)
    return manifest


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
    manifest = verify_checkpoint(root / "ckpt")
    assert manifest["version"] == VERSION >= 2
    assert [t["name"] for t in manifest["tasks"]] == ["alpha", "beta"]
    assert all(len(t["sha256"]) == 64 for t in manifest["tasks"])


def test_non_finite_factor_with_matching_checksums_is_refused_naming_file_and_tensor(checkpoints, tmp_path):
    """A NaN written into U with every checksum made consistent (file and task): refused by the finite check."""
    from fusion_bench_tsv.io.compressed_checkpoint import load_task_model, task_digest

    root, base = checkpoints
    d = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", d)
    _rewrite(d, _nan_in_u, fix_checksum=False)
    manifest = _manifest(d)
    tensors = load_file(d / TENSOR_FILE)
    manifest["tasks"][0]["sha256"] = task_digest("alpha", {k[len("t0"):]: v for k, v in tensors.items()
                                                           if k.startswith("t0/")})
    _write_manifest(d, manifest)
    _fix_file_checksum(d)
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
    with pytest.raises(ValueError, match=re.escape(f"{d / TENSOR_FILE}: its SHA-256 differs")):
        load_task_model(d, "alpha", base)
