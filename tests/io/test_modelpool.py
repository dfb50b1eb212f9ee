"""Checks on what the algorithms load: checkpoints lacking parameters, damaged checkpoints, pool entries
that do not exist, the hub while offline, a pool without ``_pretrained_``. Every error names the model
(and the path, the parameter) and says what to do."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm, TSVMergeAlgorithm
from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8)
TASKS = ["task_a", "task_b", "task_c"]
KEY = "vision_model.encoder.layers.0.mlp.fc1.weight"

ALGORITHMS = {
    "TSV-M lazy": lambda **kw: TSVMergeAlgorithm(show_pbar=False, **kw),
    "TSV-M eager": lambda **kw: TSVMergeAlgorithm(show_pbar=False, lazy_loading=False, **kw),
    "TSV-C": lambda **kw: TSVCompressAlgorithm(show_pbar=False, device="cpu", routed_eval=False, **kw),
    "STI": lambda **kw: STIAnalysis(show_pbar=False, device="cpu", **kw),
}


@pytest.fixture(scope="module")
def disk_pool(tmp_path_factory) -> Path:
    """``<root>/{_pretrained_, task_a, task_b, task_c}``: tiny CLIP vision towers saved by ``save_pretrained``."""
    root = tmp_path_factory.mktemp("disk_pool")
    torch.manual_seed(0)
    base = CLIPVisionModel(VISION).eval()
    base.save_pretrained(root / "_pretrained_")
    for i, task in enumerate(TASKS):
        model = CLIPVisionModel(VISION).eval()
        model.load_state_dict(synthetic_task_state(base.state_dict(), seed=i + 1))
        model.save_pretrained(root / task)
    return root


def make_pool(root: Path, **overrides):
    from fusion_bench.modelpool import CLIPVisionModelPool

    models = {name: str(root / name) for name in ["_pretrained_", *TASKS]}
    models.update(overrides)
    return CLIPVisionModelPool(models=models)


def broken_copy(root: Path, name: str, where: Path) -> Path:
    where = where / f"broken_{name}"
    shutil.copytree(root / name, where)
    return where


# ------------------------------------------------------------------------------ missing parameters
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("who", ["task_b", "_pretrained_"])
def test_checkpoint_lacking_a_parameter_is_refused_unless_allowed(disk_pool, tmp_path, caplog, algorithm, who):
    """from_pretrained would fill the parameter with random values and the run would succeed."""
    broken = broken_copy(disk_pool, who, tmp_path)
    state = load_file(broken / "model.safetensors")
    del state[KEY]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    pattern = (rf"model '{who}': the checkpoint {re.escape(str(broken))} lacks 1 parameter\(s\) of CLIPVisionModel: "
               rf"\['{re.escape(KEY)}'\].*allow_missing_keys=true")
    with pytest.raises(ValueError, match=pattern):
        ALGORITHMS[algorithm]().run(make_pool(disk_pool, **{who: str(broken)}))
    with caplog.at_level(logging.WARNING):
        ALGORITHMS[algorithm](allow_missing_keys=True).run(make_pool(disk_pool, **{who: str(broken)}))
    assert any(who in r.getMessage() and KEY in r.getMessage() and "random values" in r.getMessage()
               for r in caplog.records), "no warning names the model and the key"


def test_allow_missing_keys_is_in_the_three_method_configs():
    import yaml

    from support import REPO_ROOT

    for name in ("tsv_merge", "tsv_compress", "sti_analysis"):
        config = yaml.safe_load((REPO_ROOT / "config" / "method" / "tsv" / f"{name}.yaml").read_text())
        assert config["allow_missing_keys"] is False, name


def test_tied_and_prefixed_checkpoints_are_complete():
    """What from_pretrained fills from the file is not missing: tied weights saved once, the base-model prefix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion_bench_tsv.io.keys import missing_checkpoint_keys

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    keys = [k for k in model.state_dict() if k != "lm_head.weight"]
    assert missing_checkpoint_keys(model, keys) == []
    assert missing_checkpoint_keys(model, [k.removeprefix("model.") for k in keys]) == []
    untied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert missing_checkpoint_keys(untied, keys) == ["lm_head.weight"]


# ------------------------------------------------------------------------------ damaged checkpoints
def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _corrupt_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32  # not UTF-8: the JSON header cannot be decoded
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("damage", [_truncate, _corrupt_header], ids=["truncated", "header"])
@pytest.mark.parametrize("who", ["task_b", "_pretrained_"])
def test_damaged_checkpoint_error_names_model_and_path(disk_pool, tmp_path, algorithm, damage, who):
    broken = broken_copy(disk_pool, who, tmp_path)
    damage(broken / "model.safetensors")
    with pytest.raises(ValueError) as info:
        ALGORITHMS[algorithm]().run(make_pool(disk_pool, **{who: str(broken)}))
    message = str(info.value)
    assert f"model '{who}'" in message and str(broken / "model.safetensors") in message, message
    assert "is not a readable safetensors file" in message and "save or download it again" in message, message


def test_other_load_failures_name_the_model_and_keep_the_cause(disk_pool, tmp_path):
    broken = broken_copy(disk_pool, "task_c", tmp_path)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"model 'task_c': cannot load {re.escape(str(broken))}: ") as info:
        TSVMergeAlgorithm(show_pbar=False, lazy_loading=False).run(make_pool(disk_pool, task_c=str(broken)))
    assert info.value.__cause__ is not None


# ------------------------------------------------------------------------------ pool entries
@pytest.mark.parametrize("algorithm", ["TSV-M lazy", "TSV-C", "STI"])
@pytest.mark.parametrize("entry", ["/no/such/dir", "./no/such/dir", "models/no/such", "~/no_such_dir_h4"])
def test_local_path_that_does_not_exist(disk_pool, tmp_path, monkeypatch, algorithm, entry):
    monkeypatch.chdir(tmp_path)
    pool = make_pool(disk_pool, task_a=entry)
    with pytest.raises(FileNotFoundError, match=rf"model 'task_a': local path {re.escape(entry)} does not exist"):
        ALGORITHMS[algorithm]().run(pool)


def test_hub_offline_error_names_model_and_repo_and_points_to_the_offline_benchmark(disk_pool, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = make_pool(disk_pool, task_b="openai/clip-vit-base-patch32")
    with pytest.raises(ConnectionError) as info:
        TSVMergeAlgorithm(show_pbar=False).run(pool)
    message = str(info.value)
    for part in ("model 'task_b'", "'openai/clip-vit-base-patch32'", "offline or unreachable", "HF_HUB_OFFLINE=1",
                 "fusion-bench-tsv-build --num-tasks 8",
                 "modelpool=CLIPVisionModelPool/tiny_clip_8 taskpool=CLIPVisionModelTaskPool/tiny_clip_8"):
        assert part in message, (part, message)
    assert "Cause: FileNotFoundError: Could not resolve checkpoint" in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__, "the hub's exception chain is kept"


@pytest.mark.cli
def test_hub_offline_through_the_cli_is_short(tmp_path):
    from support import run_fusion_bench

    proc = run_fusion_bench(
        ["method=tsv/tsv_merge", "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only",
         "taskpool=dummy", "print_config=false"],
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "cannot load 'openai/clip-vit-base-patch32' from the Hugging Face hub" in output, output[-3000:]
    assert "fusion-bench-tsv-build --num-tasks 8" in output
    # Hydra prints the last traceback: ours alone (no chain of hub exceptions), its message the last line
    traceback = [line for line in output[output.rindex("Error executing job"):].splitlines() if line.strip()]
    assert len(traceback) < 40, "\n".join(traceback)
    assert traceback[-1].startswith("Set the environment variable HYDRA_FULL_ERROR")
    assert traceback[-2].startswith("fusion_bench_tsv.io.modelpool.HubUnreachableError: model '_pretrained_'"), traceback[-2]


@pytest.mark.parametrize("algorithm", ["TSV-M lazy", "TSV-C", "STI"])
def test_pool_without_pretrained_says_what_is_expected(algorithm):
    models = {f"t{i}": CLIPVisionModel(VISION) for i in range(2)}
    with pytest.raises(ValueError, match=r"needs the pretrained model under the key '_pretrained_'.*\{'_pretrained_': "
                                         r"pretrained_model, 'task_a': finetuned_a.*the modelpool has \['t0', 't1'\]"):
        ALGORITHMS[algorithm]().run(models)


# ------------------------------------------------------------------------------ errors that keep their point
def test_shape_mismatch_in_eager_loading_names_the_parameter_both_shapes_and_the_model():
    """A loader that fails inside ``load_state_dict``: torch's first line alone ("Error(s) in loading state_dict
    for Linear:") says nothing; the error names the model, the class, the parameter and both shapes."""
    from fusion_bench import BaseModelPool

    class WrongShapePool(BaseModelPool):
        def load_model(self, name, *args, **kwargs):
            if name == "task_b":
                model = torch.nn.Linear(4, 2)
                model.load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)})
            return super().load_model(name, *args, **kwargs)

    pool = WrongShapePool({"_pretrained_": torch.nn.Linear(4, 2), "task_a": torch.nn.Linear(4, 2),
                           "task_b": torch.nn.Linear(4, 2)})
    with pytest.raises(ValueError) as info:
        TSVMergeAlgorithm(show_pbar=False, lazy_loading=False).run(pool)
    message = str(info.value)
    for part in ("model 'task_b'", "does not fit the model Linear",
                 "parameter 'weight' has shape (3, 4) in the checkpoint, (2, 4) in the model",
                 "parameter 'bias' has shape (3,) in the checkpoint, (2,) in the model"):
        assert part in message, (part, message)
    assert isinstance(info.value.__cause__, RuntimeError)


def _compose(name: str):
    from fusion_bench_tsv.methods.alpha_grid import _compose_taskpool

    return _compose_taskpool(name)


def test_unbuilt_offline_validation_pool_says_how_to_build_it(disk_pool, tmp_path, monkeypatch):
    """The tiny_clip _val pool over a data root never built: the build command with that root, before merging
    (not transformers' "Can't load image processor ... huggingface.co" once the pool is set up)."""
    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(tmp_path / "never_built"))
    algorithm = TSVMergeAlgorithm(show_pbar=False, alpha_grid=[0.5, 1.0],
                                  validation_taskpool="CLIPVisionModelTaskPool/tiny_clip_8_val")
    with pytest.raises(FileNotFoundError) as info:
        algorithm.run(make_pool(disk_pool))
    message = str(info.value)
    assert "option 'validation_taskpool'" in message and str(tmp_path / "never_built" / "tiny_clip") in message
    # the root is FUSION_BENCH_TSV_DATA, which the build command reads too: no --root
    assert "is not built: run `fusion-bench-tsv-build --num-tasks 8`" in message, message


@pytest.mark.parametrize("algorithm", ["TSV-M lazy", "TSV-C"])
def test_unbuilt_offline_test_pool_of_the_program_says_how_to_build_it(disk_pool, tmp_path, monkeypatch, algorithm):
    from types import SimpleNamespace

    from fusion_bench import instantiate

    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(tmp_path / "never_built"))
    method = ALGORITHMS[algorithm]()
    method._program = SimpleNamespace(taskpool=instantiate(_compose("CLIPVisionModelTaskPool/small_clip_14"),
                                                           _recursive_=False))
    with pytest.raises(FileNotFoundError, match=r"the program's taskpool: local path .*never_built/small_clip.* does "
                                                r"not exist; the offline benchmark at .* is not built: run "
                                                r"`fusion-bench-tsv-build --num-tasks 14 --suite small_clip`"):
        method.run(make_pool(disk_pool))
