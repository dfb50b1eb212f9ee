"""TSVMergeAlgorithm against FusionBench's built-in TSVM and the formula, plus streaming and errors."""

from __future__ import annotations

import gc
import weakref
import inspect
from copy import deepcopy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench import BaseModelPool
from fusion_bench.method import TaskSingularVectorMerging
from fusion_bench_tsv import TSVMergeAlgorithm
from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

from oracles import assert_state_within, oracle_merge_state

VISION = CLIPVisionConfig(
    hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)


def make_model(state=None, config=VISION) -> CLIPVisionModel:
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def make_pool_models(num_tasks: int, config=VISION) -> dict:
    base = make_model(config=config)
    models = {"_pretrained_": base}
    for i in range(num_tasks):
        models[f"task{i}"] = make_model(synthetic_task_state(base.state_dict(), seed=i + 1, rank=3), config)
    return models


def copy_pool(models: dict) -> BaseModelPool:
    return BaseModelPool({k: deepcopy(v) for k, v in models.items()})


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, skip=()) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa if k not in skip)


def pool_states(models: dict) -> tuple[dict, list]:
    """θ₀'s state and the fine-tuned states, in task order."""
    return models["_pretrained_"].state_dict(), [m.state_dict() for n, m in models.items() if n != "_pretrained_"]


def check_merge(models: dict, ours: torch.nn.Module, ref: torch.nn.Module, svd_method: str, alpha=1.0, skip=()) -> None:
    """Ours against FusionBench's TSVM ``ref`` and the float64 oracle, each within its derived bound.

    ``svd``: the same float32 SVDs of the same float32 Δᵢ as FusionBench, so only the orthogonalization and
    products differ (bound without the truncation's amplification); ``gram``: float64 throughout, held to the
    float64 oracle, and FusionBench (float32) to the oracle with the float32 bound."""
    base, states = pool_states(models)
    keys = [k for k in base if k not in skip]
    got = ours.state_dict()
    if svd_method == "svd":
        _, bounds = oracle_merge_state(base, states, torch.float32, truncation=False, alpha=alpha)
        assert_state_within(got, ref.state_dict(), bounds, "ours vs FusionBench", keys)
    else:
        expected, bounds = oracle_merge_state(base, states, torch.float64, gram=True, alpha=alpha)
        assert_state_within(got, expected, bounds, "ours vs float64 oracle", keys)
        _, bounds32 = oracle_merge_state(base, states, torch.float32, alpha=alpha)
        assert_state_within(ref.state_dict(), expected, bounds32, "FusionBench vs float64 oracle", keys)


@pytest.mark.parametrize("svd_method", ["svd", "gram"])
@pytest.mark.parametrize("num_tasks", [8, 12])
def test_equals_fusion_bench_tsvm_in_memory(num_tasks, svd_method):
    models = make_pool_models(num_tasks)
    ours = TSVMergeAlgorithm(alpha=1.0, show_pbar=False, device="cpu", svd_method=svd_method).run(copy_pool(models))
    ref = TaskSingularVectorMerging(alpha=1.0).run(copy_pool(models))
    # matrices: 32×32 attention, 80×32 / 32×80 MLP (rectangular), 17×32 position embedding;
    # with T=12, k = floor(r/T) leaves r − Tk components unused (T does not divide r)
    check_merge(models, ours, ref, svd_method)
    assert max_abs_diff(ours, models["_pretrained_"]) > 0  # the merge did something (its size: check_merge)


@pytest.mark.parametrize("svd_method", ["svd", "gram"])
def test_equals_fusion_bench_tsvm_on_local_disk_pool(tiny_pool, svd_method):
    """The on-disk local pool of 8 tasks, loaded through FusionBench's CLIPVisionModelPool."""
    from fusion_bench.modelpool import CLIPVisionModelPool

    models = {"_pretrained_": str(tiny_pool["pretrained"]), **{t: str(p) for t, p in tiny_pool["paths"].items()}}
    pool = lambda: CLIPVisionModelPool(models=models, processor=str(tiny_pool["pretrained"]))  # noqa: E731
    ours = TSVMergeAlgorithm(show_pbar=False, svd_method=svd_method).run(pool())
    ref = TaskSingularVectorMerging(alpha=1.0).run(pool())
    assert len(tiny_pool["tasks"]) >= 8
    p = pool()
    check_merge({n: p.load_model(n) for n in ["_pretrained_", *tiny_pool["tasks"]]}, ours, ref, svd_method)


#: FusionBench's TaskSingularVectorMerging in this TSV-M's options (the table in docs/math.md)
FUSION_BENCH_SETTINGS = {"svd_method": "svd", "rank_revealing": False, "exclude_keys": None}


class Projection(torch.nn.Module):
    """A layer and a matrix named like CLIP's ``text_projection`` (which the default ``exclude_keys`` averages)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(24, 16)
        self.text_projection = torch.nn.Linear(16, 12, bias=False)


def test_fusion_bench_settings_equal_fusion_bench_tsvm_where_every_default_differs():
    """Rank-2 task matrices (plus the float32 rounding of θᵢ − θ₀), T = 4: k = 4 (fc) and 3 (text_projection)
    keep round-off directions, which enter the orthogonalization (rank_revealing=false) as FusionBench's float32
    SVD picks them (svd_method=svd); text_projection is decomposed (exclude_keys=null). min(m, n) ≥ T."""
    torch.manual_seed(0)
    base = Projection()
    models = {"_pretrained_": base}
    for i in range(4):
        models[f"task{i}"] = task = deepcopy(base)
        with torch.no_grad():
            for p in task.parameters():
                rank_two = p.dim() == 2
                update = torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]) if rank_two else torch.randn_like(p)
                p.add_(0.02 * update)
    ref = TaskSingularVectorMerging(alpha=1.0).run(copy_pool(models))
    ours = TSVMergeAlgorithm(show_pbar=False, device="cpu", **FUSION_BENCH_SETTINGS).run(copy_pool(models))
    check_merge(models, ours, ref, "svd")  # the bound of the same float32 factors, orthogonalized apart
    defaults = inspect.signature(TSVMergeAlgorithm).parameters
    for option in FUSION_BENCH_SETTINGS:  # each default alone: another model (by about 0.1 here)
        settings = {**FUSION_BENCH_SETTINGS, option: defaults[option].default}
        ours = TSVMergeAlgorithm(show_pbar=False, device="cpu", **settings).run(copy_pool(models))
        with pytest.raises(AssertionError, match="exceeds the bound"):
            check_merge(models, ours, ref, "svd")


def test_rank_below_num_tasks_not_zeroed_unlike_fusion_bench():
    models = make_pool_models(20)  # the 17×32 position embedding has rank 17 < T = 20
    key = "vision_model.embeddings.position_embedding.weight"
    ours = TSVMergeAlgorithm(show_pbar=False, device="cpu").run(copy_pool(models))
    ref = TaskSingularVectorMerging(alpha=1.0).run(copy_pool(models))
    base = models["_pretrained_"].state_dict()[key]
    assert torch.equal(ref.state_dict()[key], base)  # FusionBench's TSVM drops the layer's update
    # T·k = 20 > r = 17: U is a rank-deficient 17 × 20 concatenation; the oracle's U⊥ = PQᵀ from its SVD
    check_merge(models, ours, ref, "gram", skip={key})  # the default svd_method
    expected, bounds = oracle_merge_state(*pool_states(models), torch.float64, gram=True)
    assert_state_within(ours.state_dict(), expected, bounds, "T·k > r", keys=[key])


@pytest.mark.parametrize("svd_method", ["svd", "gram"])
def test_alpha_float_and_list_match_fusion_bench(svd_method):
    models = make_pool_models(8)
    ours = TSVMergeAlgorithm(alpha=0.6, show_pbar=False, svd_method=svd_method).run(copy_pool(models))
    ref = TaskSingularVectorMerging(alpha=0.6).run(copy_pool(models))
    check_merge(models, ours, ref, svd_method, alpha=0.6)
    alphas = [0.5, 1.0, 1.5, 0.2, 0.9, 1.1, 0.7, 1.3]
    ours = TSVMergeAlgorithm(alpha=alphas, show_pbar=False, svd_method=svd_method).run(copy_pool(models))
    ref = TaskSingularVectorMerging(alpha=alphas).run(copy_pool(models))
    check_merge(models, ours, ref, svd_method, alpha=alphas)
    assert max_abs_diff(ours, models["_pretrained_"]) > 0  # the merge did something (its size: check_merge)


def test_formula_per_layer_and_exclude_keys_glob():
    models = make_pool_models(5)
    alpha = 0.8
    merged = TSVMergeAlgorithm(alpha=alpha, exclude_keys=["*mlp.fc1.*"], show_pbar=False).run(copy_pool(models))
    # the default svd_method is float64 throughout: the float64 bounds (plus the float32 rounding of θ)
    expected, bounds = oracle_merge_state(*pool_states(models), torch.float64, gram=True, alpha=alpha,
                                          exclude=["*mlp.fc1.*"])
    assert_state_within(merged.state_dict(), expected, bounds, "merged")


def test_inputs_are_not_modified():
    models = make_pool_models(4)
    before = {name: deepcopy(m.state_dict()) for name, m in models.items()}
    pool = BaseModelPool(models)
    merged = TSVMergeAlgorithm(show_pbar=False).run(pool)
    assert merged is not models["_pretrained_"]
    for name, m in models.items():
        for key, value in m.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


class CountingPool(BaseModelPool):
    """Makes each fine-tuned model on demand (as a disk pool would) and tracks which are still alive."""

    def __init__(self, num_tasks: int):
        self.base_state = make_model().state_dict()
        super().__init__({"_pretrained_": None, **{f"task{i}": None for i in range(num_tasks)}})
        self.alive = []
        self.max_alive = 0

    def load_model(self, name, *args, **kwargs):
        if name == "_pretrained_":
            return make_model(self.base_state)
        gc.collect()
        self.max_alive = max(self.max_alive, sum(ref() is not None for ref in self.alive) + 1)
        model = make_model(synthetic_task_state(self.base_state, seed=int(name[4:]) + 1))
        self.alive.append(weakref.ref(model))
        return model


def test_streams_one_finetuned_model_at_a_time():
    pool = CountingPool(num_tasks=10)
    TSVMergeAlgorithm(show_pbar=False).run(pool)
    assert len(pool.alive) == 10
    assert pool.max_alive == 1


def test_error_models_with_different_parameters():
    models = make_pool_models(3)
    models["task1"] = make_model(config=CLIPVisionConfig(**{**VISION.to_dict(), "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"model 'task1'.*unexpected keys.*layers\.2\."):
        TSVMergeAlgorithm(show_pbar=False).run(BaseModelPool(models))
    models = make_pool_models(3)
    models["task2"] = make_model(config=CLIPVisionConfig(**{**VISION.to_dict(), "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"model 'task2': parameter 'vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has shape"):
        TSVMergeAlgorithm(show_pbar=False).run(BaseModelPool(models))


def test_error_nan_or_inf_names_the_model():
    models = make_pool_models(3)
    with torch.no_grad():
        models["task2"].vision_model.post_layernorm.bias[0] = float("nan")
    before = models["task2"].vision_model.post_layernorm.bias.clone()
    with pytest.raises(ValueError, match=r"model 'task2': parameter 'vision_model\.post_layernorm\.bias' contains NaN"):
        TSVMergeAlgorithm(show_pbar=False).run(BaseModelPool(models))
    torch.testing.assert_close(models["task2"].vision_model.post_layernorm.bias, before, rtol=0, atol=0, equal_nan=True)
    models = make_pool_models(3)
    with torch.no_grad():
        models["_pretrained_"].vision_model.pre_layrnorm.weight[1] = float("inf")
    with pytest.raises(ValueError, match=r"model '_pretrained_'.*pre_layrnorm\.weight"):
        TSVMergeAlgorithm(show_pbar=False).run(BaseModelPool(models))


def test_error_alpha_list_length_and_empty_pool_and_rank():
    models = make_pool_models(3)
    with pytest.raises(ValueError, match=r"option 'alpha' has 2 values but the modelpool has 3"):
        TSVMergeAlgorithm(alpha=[1.0, 2.0], show_pbar=False).run(BaseModelPool(models))
    with pytest.raises(ValueError, match="no fine-tuned models"):
        TSVMergeAlgorithm(show_pbar=False).run(BaseModelPool({"_pretrained_": models["_pretrained_"]}))
    with pytest.raises(ValueError, match=r"option 'rank'=20 exceeds the rank of parameter 'vision_model\.embeddings\.position_embedding\.weight'"):
        TSVMergeAlgorithm(rank=20, show_pbar=False).run(BaseModelPool(models))
    with pytest.raises(ValueError, match="option 'rank'"):
        TSVMergeAlgorithm(rank=0)
