"""TSV-M / TSV-C / STI on causal LMs (CausalLMPool): tiny local Llama- and Qwen2-shaped models.

Checks the per-layer formula against an independent float64 oracle, embeddings/lm_head averaged by the
LLM config, lazy == eager (bitwise), tied embeddings, the atomic sharded save (reloads with
``AutoModelForCausalLM.from_pretrained``, tokenizer included), the memory bound of the lazy path, and a
2-process Fabric run (real CLI, ``ddp`` on CPU with ``gloo``) against one process, bitwise.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fusion_bench.modelpool import CausalLMPool
from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm, TSVMergeAlgorithm
from fusion_bench_tsv.io.safetensors_state import SafetensorsState
from fusion_bench_tsv.io.keys import LLM_EXCLUDE_KEYS
from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

from support import run_fusion_bench
from oracles import (assert_state_within, assert_within, eps, max_error, mean_of_updates, oracle_merge_state,
                     oracle_rank_k, rank_k_bound)

REPO = Path(__file__).resolve().parents[1]
TASKS = ("math", "code", "instruction")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "hello", "world", "two", "plus", "three", "def", "return"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def make_llm_pool(root: Path, arch: str) -> dict:
    """A base model and 3 fine-tunes (low-rank synthetic updates), saved sharded with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **common)
    else:
        config = Qwen2Config(tie_word_embeddings=True, **common)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = _tokenizer()
    paths, states = {}, {}
    for i, name in enumerate(("_pretrained_",) + TASKS):
        model = deepcopy(base)
        if i:
            model.load_state_dict(synthetic_task_state(base.state_dict(), seed=100 + i, rank=2, scale=0.05))
        path = root / arch / name
        model.save_pretrained(path, max_shard_size="40KB")  # several shards + model.safetensors.index.json
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return {"paths": paths, "states": states, "tied": config.tie_word_embeddings}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llm(request, tmp_path_factory):
    return make_llm_pool(tmp_path_factory.mktemp("llm"), request.param)


def pool_of(llm, lazy: bool) -> CausalLMPool:
    return CausalLMPool(models=dict(llm["paths"]), tokenizer=llm["paths"]["_pretrained_"], enable_lazy_loading=lazy)


def llm_exclude_keys():
    cfg = OmegaConf.load(REPO / "config/method/tsv/tsv_merge_llm.yaml")
    return list(cfg.exclude_keys)


def oracle(llm, exclude, dtype: torch.dtype, gram: bool = False) -> tuple[dict, dict]:
    """TSV-M from the definition in float64 (U⊥ = PQᵀ from the SVD of the concatenation) and, per parameter,
    the bound on a computation in ``dtype`` (tests/oracles.py)."""
    states = llm["states"]
    return oracle_merge_state(states["_pretrained_"], [states[t] for t in TASKS], dtype, gram=gram, exclude=exclude)


def test_formula_per_layer_and_embeddings_averaged(llm):
    exclude = llm_exclude_keys()
    assert exclude == list(LLM_EXCLUDE_KEYS)
    # the default path (svd_method="gram") is float64 throughout; "svd" runs float32 SVDs: each is held to the
    # float64 oracle within its own derived bound (round-off × the layer's conditioning, + the float32 rounding)
    merged = TSVMergeAlgorithm(show_pbar=False, exclude_keys=exclude).run(pool_of(llm, lazy=True))
    expected, bounds64 = oracle(llm, exclude, torch.float64, gram=True)
    _, bounds32 = oracle(llm, exclude, torch.float32)
    svd = TSVMergeAlgorithm(show_pbar=False, exclude_keys=exclude, svd_method="svd").run(pool_of(llm, lazy=True))
    assert_state_within(svd.state_dict(), expected, bounds32, "svd_method=svd")
    state = merged.state_dict()
    assert_state_within(state, expected, bounds64, "svd_method=gram")
    base = llm["states"]["_pretrained_"]
    mean = mean_of_updates([llm["states"][t] for t in TASKS], base, "model.embed_tokens.weight")
    assert_within(state["model.embed_tokens.weight"], mean, bounds64["model.embed_tokens.weight"], "embedding mean")
    if llm["tied"]:
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    # without the LLM exclusions the embedding is decomposed: a different result, far outside the bound
    decomposed = TSVMergeAlgorithm(show_pbar=False).run(pool_of(llm, lazy=True)).state_dict()
    key = "model.embed_tokens.weight"
    assert max_error(decomposed[key], state[key]) > 1e3 * bounds64[key]


def test_lazy_equals_eager_bitwise(llm):
    lazy = TSVMergeAlgorithm(show_pbar=False, exclude_keys=LLM_EXCLUDE_KEYS).run(pool_of(llm, lazy=True))
    eager = TSVMergeAlgorithm(show_pbar=False, exclude_keys=LLM_EXCLUDE_KEYS, lazy_loading=False).run(
        pool_of(llm, lazy=False))
    for key, value in lazy.state_dict().items():
        assert torch.equal(value, eager.state_dict()[key]), key
    # non-persistent buffers (rotary inv_freq) of the lazily materialized model are the real ones
    for (name, a), (_, b) in zip(lazy.named_buffers(), eager.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("num_workers", [1, 2])
def test_lazy_path_builds_no_finetuned_model_and_keeps_one_layer_per_task(llm, monkeypatch, num_workers):
    """No fine-tuned model is ever loaded, and few tensors read from the checkpoints are alive at once: at
    most T serially, at most 2·workers (the reader's look-ahead) + 1 with worker threads."""
    def refuse(*args, **kwargs):
        raise AssertionError("a fine-tuned model was built")

    original_load = CausalLMPool.load_model
    monkeypatch.setattr(CausalLMPool, "load_model", lambda self, name, *a, **k: refuse() if name in TASKS
                        else original_load(self, name, *a, **k))
    alive = {"now": 0, "peak": 0, "bytes": 0, "peak_bytes": 0}
    original_get = SafetensorsState.__getitem__

    lock = threading.Lock()  # tensors are freed by the worker threads

    def counted(self, key):
        value = original_get(self, key)
        if self.model_name in TASKS:
            with lock:
                alive["now"] += 1
                alive["bytes"] += value.nbytes
                alive["peak"] = max(alive["peak"], alive["now"])
                alive["peak_bytes"] = max(alive["peak_bytes"], alive["bytes"])
            nbytes = value.nbytes

            def release():
                with lock:
                    alive["now"] -= 1
                    alive["bytes"] -= nbytes

            weakref.finalize(value, release)
        return value

    monkeypatch.setattr(SafetensorsState, "__getitem__", counted)
    algorithm = TSVMergeAlgorithm(show_pbar=False, exclude_keys=LLM_EXCLUDE_KEYS, num_workers=num_workers)
    merged = algorithm.run(pool_of(llm, lazy=True))
    largest = max(v.nbytes for v in merged.state_dict().values())
    model_bytes = sum(v.nbytes for v in llm["states"]["math"].values())
    bound = len(TASKS) if num_workers == 1 else 2 * num_workers + 1
    assert 0 < alive["peak"] <= bound
    assert alive["peak_bytes"] <= bound * largest
    assert alive["peak_bytes"] < model_bytes


def test_save_sharded_atomic_reloads_with_tokenizer(llm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion_bench_tsv.io.outputs import write_output_dir

    target = tmp_path / "merged"  # an older output of this package, with a file the new one does not have
    write_output_dir(target, lambda tmp: (tmp / "stale.txt").write_text("an older checkpoint"), "TSV-M")
    merged = TSVMergeAlgorithm(
        show_pbar=False, exclude_keys=LLM_EXCLUDE_KEYS, save_path=str(target), max_shard_size="40KB"
    ).run(pool_of(llm, lazy=True))
    assert not (target / "stale.txt").exists()  # replaced as a whole
    assert (target / "model.safetensors.index.json").is_file()
    assert len(list(target.glob("model-*.safetensors"))) > 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    for key, value in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.config.tie_word_embeddings == llm["tied"]
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer("hello world")["input_ids"] == [2, 3]
    # the sharded checkpoint reads lazily as it was written
    lazy = SafetensorsState(target, "merged")
    assert torch.equal(lazy["model.norm.weight"], merged.model.norm.weight)


def test_tsv_c_and_sti_run_on_lazy_llm_pool(llm, tmp_path):
    pool = pool_of(llm, lazy=True)
    algo = TSVCompressAlgorithm(show_pbar=False, exclude_keys=LLM_EXCLUDE_KEYS, routed_eval=False)
    models = algo.run(pool)
    assert set(models) == set(TASKS)
    base = llm["states"]["_pretrained_"]
    key = "model.layers.0.mlp.down_proj.weight"
    delta = llm["states"]["math"][key].double() - base[key].double()
    k = min(delta.shape) // len(TASKS)
    approx, _ = oracle_rank_k(delta, k)
    expected = base[key].double() + torch.from_numpy(approx)
    # the factors are kept and multiplied in float32 (the models' dtype): the float32 bound, + θ's rounding
    bound = rank_k_bound(delta, k, torch.float32) + eps(torch.float32) * expected.abs().max().item()
    assert bound < torch.from_numpy(approx).abs().max().item()  # else dropping the update would pass
    assert_within(models["math"].state_dict()[key], expected, bound, key)
    # embeddings are kept in full per task with the LLM exclusions
    assert torch.equal(models["code"].model.embed_tokens.weight, llm["states"]["code"]["model.embed_tokens.weight"])

    sti = STIAnalysis(show_pbar=False, exclude_keys=LLM_EXCLUDE_KEYS, save_path=str(tmp_path / "sti"))
    sti.run(pool)
    layers = [row["layer"] for row in sti.results["layers"]]
    assert key in layers and not any("embed_tokens" in k or "lm_head" in k for k in layers)
    assert all(row["sti"] > 0 for row in sti.results["layers"])


def test_two_processes_equal_one_bitwise(tmp_path, tmp_path_factory):
    """The real CLI with fabric.strategy=ddp on 2 CPU processes (gloo) == one in-process run, bitwise."""
    llm = make_llm_pool(tmp_path_factory.mktemp("ddp"), "qwen2")
    paths = llm["paths"]
    env_keys = {"TSV_LLM_BASE": "_pretrained_", "TSV_LLM_MATH": "math", "TSV_LLM_CODE": "code",
                "TSV_LLM_INSTRUCT": "instruction"}
    out = tmp_path / "merged_ddp"
    old = {k: os.environ.get(k) for k in (*env_keys, "OMP_NUM_THREADS")}
    os.environ.update({k: paths[v] for k, v in env_keys.items()}, OMP_NUM_THREADS="1")
    try:
        proc = run_fusion_bench(
            [
                "method=tsv/tsv_merge_llm",
                "modelpool=CausalLMPool/qwen2.5_math_code_instruct",
                "modelpool.model_kwargs.torch_dtype=float32",
                "taskpool=dummy",
                f"method.save_path={out}",
                "method.max_shard_size=40KB",
                "method.show_pbar=false",
                "fabric.accelerator=cpu",
                "fabric.devices=2",
                "fabric.strategy=ddp",
            ],
            cwd=tmp_path,
            timeout=300,
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 1/2 merges" in proc.stdout + proc.stderr
    two = SafetensorsState(out, "ddp")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = CausalLMPool(models={"_pretrained_": paths["_pretrained_"], **{t: paths[t] for t in TASKS}},
                            tokenizer=paths["_pretrained_"], enable_lazy_loading=True)
        one = TSVMergeAlgorithm(show_pbar=False, exclude_keys=LLM_EXCLUDE_KEYS).run(pool).state_dict()
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(saved) == set(one) - {"lm_head.weight"}  # tied: saved once
    for key in saved:
        assert torch.equal(two[key], one[key]), key
