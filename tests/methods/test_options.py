"""Options of TSV-M, TSV-C and STI: unknown options, types and ranges, ``alpha``, and ``save_path`` never
deleting or replacing what this package did not write (the run's log files included)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench import BaseModelPool
from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm, TSVMergeAlgorithm
from fusion_bench_tsv.methods.options import OPTION_CHECKS, option_names
from fusion_bench_tsv.methods.tsv_merge import RANK_REPORT_FILE
from fusion_bench_tsv.io.outputs import MARKER
from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

from support import REPO_ROOT

CLASSES = {"TSV-M": TSVMergeAlgorithm, "TSV-C": TSVCompressAlgorithm, "STI": STIAnalysis}
QUIET = {
    "TSV-M": dict(show_pbar=False, device="cpu"),
    "TSV-C": dict(show_pbar=False, device="cpu", routed_eval=False),
    "STI": dict(show_pbar=False, device="cpu"),
}
DEFAULT_NAMES = {"TSV-M": "merged_model", "TSV-C": "tsv_c", "STI": "sti"}
REPORT_FILES = {"TSV-M": {RANK_REPORT_FILE}}  # files a method writes beside its output directory in the log dir
VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8)


# ------------------------------------------------------------------------------ unknown options
@pytest.mark.parametrize("method, option, suggestion", [
    ("TSV-M", "rnak", "rank"),
    ("TSV-C", "svd_method", None),
    ("TSV-C", "ranks", "rank"),
    ("STI", "output_dir", "save_path"),
    ("STI", "full_rnk", "full_rank"),
])
def test_unknown_option_is_refused_with_the_valid_ones(method, option, suggestion):
    cls = CLASSES[method]
    with pytest.raises(TypeError) as info:
        cls(**{option: 4})
    message = str(info.value)
    assert f"{cls.__name__}: unknown option(s) '{option}'" in message, message
    assert "valid options: " + ", ".join(option_names(cls)) in message, message
    if suggestion:
        assert f"(did you mean '{suggestion}'?)" in message, message


@pytest.mark.parametrize("method", CLASSES)
def test_fusion_bench_keywords_and_the_configs_still_instantiate(method):
    """FusionBench's own keywords pass; the YAML configs instantiate as the CLI does it."""
    from fusion_bench.utils import instantiate

    cls = CLASSES[method]
    algorithm = cls(_usage_="test", _version_=None, _recursive_=False)
    assert algorithm.config["_usage_"] == "test"
    name = {"TSV-M": "tsv_merge", "TSV-C": "tsv_compress", "STI": "sti_analysis"}[method]
    config = OmegaConf.load(REPO_ROOT / "config" / "method" / "tsv" / f"{name}.yaml")
    config.pop("defaults")  # Hydra's defaults list (config/tsv/cli.yaml), consumed by the composition
    assert isinstance(instantiate(config, _recursive_=False), cls)


def test_every_option_is_validated_in_one_place():
    for cls in CLASSES.values():
        missing = [n for n in option_names(cls) if n not in OPTION_CHECKS]
        assert not missing, (cls.__name__, missing)
    for name in ("tsv_merge.py", "tsv_compress.py", "sti.py"):
        source = (REPO_ROOT / "fusion_bench_tsv" / "methods" / name).read_text()
        assert "validate_options(self, kwargs)" in source and "must be" not in source, name


# ------------------------------------------------------------------------------ alpha
@pytest.mark.parametrize("alpha, reason", [
    ("123", "a string"),
    ("0.5", "a string"),
    (float("nan"), "not finite"),
    (float("inf"), "not finite"),
    (-math.inf, "not finite"),
    (["a", 1.0], "entry 0 is 'a'"),
    ([1.0, float("nan")], "entry 1 is nan"),
    ([], "an empty list"),
    (True, None),
    ({"x": 1}, None),
])
def test_alpha_must_be_finite_numbers(alpha, reason):
    with pytest.raises(ValueError) as info:
        TSVMergeAlgorithm(alpha=alpha)
    message = str(info.value)
    assert message.startswith("TSVMergeAlgorithm: option 'alpha' must be a finite number, a list of finite numbers"), message
    assert "e.g. alpha=1.0 in Python, method.alpha=1.0 on the command line" in message, message
    if reason:
        assert reason in message, message


def test_alpha_as_a_list_from_the_command_line_or_python():
    from_cli = OmegaConf.create({"alpha": [1, 0.5, 2]}).alpha  # a ListConfig, as Hydra passes it
    assert TSVMergeAlgorithm(alpha=from_cli).alpha == [1.0, 0.5, 2.0]
    assert TSVMergeAlgorithm(alpha=(1, 2)).alpha == [1.0, 2.0]
    assert TSVMergeAlgorithm(alpha=2).alpha == 2.0
    assert TSVMergeAlgorithm(alpha=None).alpha is None


# ------------------------------------------------------------------------------ other options
BAD = [
    ("TSV-M", "rank", 0, "a positive integer or null"),
    ("TSV-M", "rank", "4", "a positive integer or null"),
    ("TSV-M", "rank", 2.0, "a positive integer or null"),
    ("TSV-M", "svd_method", "gramm", "did you mean 'gram'?"),
    ("TSV-M", "num_workers", -1, "a non-negative integer or null"),
    ("TSV-M", "device", "gpu", "not a torch device"),
    ("TSV-M", "show_pbar", "false", "true or false"),
    ("TSV-M", "lazy_loading", 1, "true or false"),
    ("TSV-M", "exclude_keys", "*lm_head*", "write ['*lm_head*']"),
    ("TSV-M", "exclude_keys", [1], "a list of glob patterns or null"),
    ("TSV-M", "save_path", "{logdir}/merged", "unknown placeholder(s) ['logdir']"),
    ("TSV-M", "save_path", "", "a directory path or null"),
    ("TSV-M", "max_shard_size", "5 parsecs", "not a size"),
    ("TSV-M", "max_shard_size", 0, "not positive"),
    ("TSV-C", "fraction", 1.5, "outside (0, 1]"),
    ("TSV-C", "energy", float("nan"), "not finite"),
    ("TSV-C", "factor_dtype", "int8", "a floating-point torch dtype name or null"),
    ("TSV-C", "routed_eval", "yes", "true or false"),
    ("STI", "max_memory_gb", 0, "not positive"),
    ("STI", "max_memory_gb", "4", "a string"),
    ("STI", "full_rank", None, "true or false"),
]


@pytest.mark.parametrize("method, option, value, fragment", BAD, ids=[f"{m}-{o}-{v!r}" for m, o, v, _ in BAD])
def test_bad_option_values_name_the_option(method, option, value, fragment):
    cls = CLASSES[method]
    with pytest.raises(ValueError) as info:
        cls(**{option: value})
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}: option '{option}' must be "), message
    assert fragment in message and f"method.{option}=" in message, message


def test_cuda_device_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"option 'device' .* \(no CUDA device is available here"):
        STIAnalysis(device="cuda:0")


def test_valid_values_are_normalized():
    algorithm = TSVCompressAlgorithm(factor_dtype="torch.bfloat16", exclude_keys=OmegaConf.create(["*a*"]),
                                     device=torch.device("cpu"), fraction=1)
    assert (algorithm.factor_dtype, algorithm.exclude_keys, algorithm.device) == ("bfloat16", ["*a*"], "cpu")
    assert TSVMergeAlgorithm(max_shard_size="40KB", save_path=Path("/x/y")).save_path == "/x/y"


# ------------------------------------------------------------------------------ save_path
class CountingPool(BaseModelPool):
    """A pool of tiny CLIP vision towers that records which models were loaded."""

    def __init__(self, models):
        super().__init__(models)
        self.loaded = []

    def load_model(self, name, *args, **kwargs):
        self.loaded.append(name)
        return super().load_model(name, *args, **kwargs)


def make_pool() -> CountingPool:
    torch.manual_seed(0)
    base = CLIPVisionModel(VISION).eval()
    models = {"_pretrained_": base}
    for i in range(3):
        model = CLIPVisionModel(VISION).eval()
        model.load_state_dict(synthetic_task_state(base.state_dict(), seed=i + 1))
        models[f"task_{i}"] = model
    return CountingPool(models)


def run(method: str, monkeypatch=None, log_dir=None, **options):
    cls = CLASSES[method]
    if monkeypatch is not None:
        monkeypatch.setattr(cls, "log_dir", property(lambda self: None if log_dir is None else str(log_dir)))
    pool = make_pool()
    cls(**QUIET[method], **options).run(pool)
    return pool


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", CLASSES)
def test_directory_of_the_user_is_never_replaced(method, tmp_path):
    target = tmp_path / "thesis"
    (target / "sub").mkdir(parents=True)
    (target / "thesis.tex").write_text("chapter 1")
    (target / "sub" / "data.csv").write_text("1,2")
    before = snapshot(target)
    pool = make_pool()
    with pytest.raises(FileExistsError) as info:
        CLASSES[method](**QUIET[method], save_path=str(target)).run(pool)
    message = str(info.value)
    assert f"{method}: option 'save_path'='{target}'" in message, message
    assert f"did not write (sub/data.csv, thesis.tex)" in message and "nothing there is deleted" in message, message
    assert snapshot(target) == before
    assert [n for n in pool.loaded if n != "_pretrained_"] == [], "refused only after loading fine-tuned models"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"], "a temporary was left behind"


@pytest.mark.parametrize("method", CLASSES)
def test_existing_file_is_never_replaced(method, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(target))} exists and is not a directory"):
        run(method, save_path=str(target))
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("method", CLASSES)
@pytest.mark.parametrize("save_path", ["{log_dir}", "literal", None])
def test_run_log_dir_is_never_touched(method, save_path, tmp_path, monkeypatch):
    """``{log_dir}`` (or the log dir's path) means a subdirectory of it; for STI also the default."""
    if save_path is None and method != "STI":
        pytest.skip("TSV-M and TSV-C save nothing without save_path")
    log_dir = tmp_path / "outputs" / "run"
    (log_dir / ".hydra").mkdir(parents=True)
    for name in ("cli.log", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"):
        (log_dir / name).write_text(f"log {name}")
    before = snapshot(log_dir)
    given = str(log_dir) if save_path == "literal" else save_path
    run(method, monkeypatch, log_dir, save_path=given)
    after = snapshot(log_dir)
    assert {k: v for k, v in after.items() if k in before} == before
    written = log_dir / DEFAULT_NAMES[method]
    new = sorted(k for k in after if k not in before and k not in REPORT_FILES.get(method, ()))
    assert new and all(k.startswith(f"{written.name}/") for k in new), new
    marker = json.loads((written / MARKER).read_text())
    assert marker["method"] == method and sorted(marker["files"]) == sorted(
        k.removeprefix(f"{written.name}/") for k in new if not k.endswith(MARKER)
    )


@pytest.mark.parametrize("method", CLASSES)
def test_own_output_and_empty_directory_are_replaced_but_not_with_foreign_files(method, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    run(method, save_path=str(target))  # an empty directory
    first = snapshot(target)
    assert MARKER in first
    run(method, save_path=str(target))  # ours: replaced
    assert set(snapshot(target)) == set(first)
    (target / "my_notes.txt").write_text("added by the user")
    with pytest.raises(FileExistsError, match=r"did not write \(my_notes.txt\)"):
        run(method, save_path=str(target))
    assert (target / "my_notes.txt").read_text() == "added by the user"


# ------------------------------------------------------------------------------ command-line mistakes
@pytest.mark.cli
@pytest.mark.parametrize("typo, meant", [("tsv/tsv_merg", "tsv/tsv_merge"), ("tsv_compress", "tsv/tsv_compress")])
def test_config_typo_suggests_and_lists_our_methods(typo, meant, tmp_path):
    """Hydra itself lists only the configs directly in method/, never method/tsv/*."""
    from support import run_fusion_bench

    proc = run_fusion_bench([f"method={typo}", "modelpool=dummy", "taskpool=dummy"], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = output[output.index(f"Could not find 'method/{typo}'"):].splitlines()
    assert lines[1].startswith(f"Did you mean 'method={meant}'"), lines[:3]
    assert lines[2] == ("Options of fusion_bench_tsv for 'method': "
                        "tsv/sti_analysis, tsv/tsv_compress, tsv/tsv_merge, tsv/tsv_merge_llm"), lines[:3]


@pytest.mark.cli
def test_offline_benchmark_not_built_says_how_to_build_it(tmp_path, monkeypatch):
    from support import run_fusion_bench

    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(tmp_path / "data"))
    proc = run_fusion_bench(["method=tsv/tsv_merge", "modelpool=CLIPVisionModelPool/tiny_clip_8",
                             "taskpool=CLIPVisionModelTaskPool/tiny_clip_8", "print_config=false"], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    suite = tmp_path / "data" / "tiny_clip"
    assert (f"FileNotFoundError: model '_pretrained_': local path {suite}/pretrained does not exist; the offline "
            f"benchmark at {suite} is not built: run `fusion-bench-tsv-build --num-tasks 8`") in output, output[-2000:]


def _suite_pool(num_tasks: int):
    """The CLIPVisionModelPool that config/modelpool/CLIPVisionModelPool/tiny_clip_<N>.yaml makes."""
    from fusion_bench.modelpool import CLIPVisionModelPool

    config = OmegaConf.load(REPO_ROOT / "config" / "modelpool" / "CLIPVisionModelPool" / f"tiny_clip_{num_tasks}.yaml")
    return CLIPVisionModelPool(models=OmegaConf.to_container(config, resolve=True)["models"])


@pytest.mark.parametrize("method", CLASSES)
def test_suite_larger_than_the_one_built(method, tmp_path, monkeypatch):
    """A build of 8 tasks, used with the 14-task pool: the 9th task is missing."""
    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(tmp_path))
    built, wanted = _suite_pool(8), _suite_pool(14)
    suite = tmp_path / "tiny_clip"
    for name in built.model_names + ["_pretrained_"]:
        Path(built.get_model_path(name)).mkdir(parents=True)
    (suite / "build.json").write_text("{}")
    ninth = [n for n in wanted.model_names if n not in built.model_names][0]
    with pytest.raises(FileNotFoundError) as info:
        CLASSES[method](**QUIET[method]).run(wanted)
    assert (f"model '{ninth}': local path {suite}/models/{ninth} does not exist; the offline benchmark at {suite} "
            f"was built with fewer than 14 tasks: run `fusion-bench-tsv-build --num-tasks 14`") in str(info.value)


def test_benchmark_elsewhere_than_the_default_root_gets_root_in_the_command(tmp_path, monkeypatch):
    from fusion_bench_tsv.io.modelpool import offline_benchmark_hint

    monkeypatch.setenv("FUSION_BENCH_TSV_DATA", str(tmp_path / "default"))
    hint = offline_benchmark_hint(str(tmp_path / "other" / "tiny_clip" / "openclip" / "zeroshot.safetensors"), 20)
    assert hint.endswith(f"run `fusion-bench-tsv-build --num-tasks 20 --root {tmp_path / 'other'}`"), hint
    assert offline_benchmark_hint("/data/models/task_a", 8) == ""
    hint = offline_benchmark_hint(str(tmp_path / "other" / "small_clip" / "models" / "shapes"), 8)
    assert hint.endswith(f"run `fusion-bench-tsv-build --num-tasks 8 --suite small_clip --root {tmp_path / 'other'}`"), hint
