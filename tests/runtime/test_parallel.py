"""runtime/parallel.py: worker threads (one BLAS thread each) never change the result, errors reach the caller,
the reader's look-ahead is bounded, and small work runs on one thread."""

from __future__ import annotations

from support import local_clip_pool

from copy import deepcopy

import pytest
import torch

from fusion_bench_tsv import TSVMergeAlgorithm


@pytest.mark.parametrize("lazy", [True, False], ids=["layer-outer", "model-outer"])
@pytest.mark.parametrize("svd_method", ["svd", "gram"])
def test_num_workers_does_not_change_the_merge(tiny_pool, svd_method, lazy):
    """Every job runs on one torch/BLAS thread whatever ``num_workers`` is (BLAS results depend on the
    thread count), and sums are taken in task order: 0, 1 and 2 workers agree bit for bit on both loops,
    also when the caller runs torch and BLAS with several threads (as by default; the suite may run with 1)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2):
            runs = {
                w: TSVMergeAlgorithm(show_pbar=False, num_workers=w, svd_method=svd_method, lazy_loading=lazy)
                .run(local_clip_pool(tiny_pool))
                .state_dict()
                for w in (0, 1, 2)
            }
    finally:
        torch.set_num_threads(threads)
    for key, value in runs[2].items():
        for w in (0, 1):
            err = (value.double() - runs[w][key].double()).abs().max().item()
            assert torch.equal(value, runs[w][key]), f"{key}: num_workers={w} vs 2 differ by {err:.3g} (bound: 0)"


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_num_workers_option_is_validated(bad):
    with pytest.raises(ValueError, match="option 'num_workers'"):
        TSVMergeAlgorithm(num_workers=bad)


def test_worker_errors_reach_the_caller_with_the_key():
    from fusion_bench_tsv.runtime.parallel import LayerExecutor

    def fail(key):
        raise ValueError(f"parameter '{key}' is broken")

    with LayerExecutor(2) as pool:
        future = pool.submit(fail, "layers.0.weight")
        with pytest.raises(ValueError, match="layers.0.weight"):
            future.result()
    assert torch.get_num_threads() >= 1  # the executor restored torch's threads


def test_reader_look_ahead_is_bounded_by_count_and_bytes():
    """room() holds the reader while the pending jobs' tensors exceed the byte budget (one job is always let
    through, however large), and while max_pending jobs are unfinished."""
    import threading

    from fusion_bench_tsv.runtime.parallel import LayerExecutor

    gate = threading.Event()
    with LayerExecutor(2, max_pending=3, max_bytes=100) as pool:
        first = pool.submit(gate.wait, cost=500)  # larger than the budget: admitted alone
        let_in = threading.Event()
        reader = threading.Thread(target=lambda: (pool.room(10), let_in.set()))
        reader.start()
        assert not let_in.wait(0.3)  # 500 + 10 bytes would exceed the budget
        gate.set()
        assert let_in.wait(10)
        reader.join()
        assert first.result() is True
        gate.clear()
        small = [pool.submit(gate.wait, cost=10) for _ in range(3)]  # max_pending = 3
        let_in.clear()
        reader = threading.Thread(target=lambda: (pool.room(10), let_in.set()))
        reader.start()
        assert not let_in.wait(0.3)
        gate.set()
        assert let_in.wait(10)
        reader.join()
        assert all(f.result() for f in small)


@pytest.fixture
def two_threads():
    """torch (this thread) and the BLAS libraries on 2 threads, as by default on 2 cores (the suite may run with 1)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2):
            yield
    finally:
        torch.set_num_threads(threads)


def _threads_now() -> tuple[int, int]:
    """(torch's threads in this thread, the most threads of any BLAS/OpenMP library threadpoolctl sees)."""
    from threadpoolctl import threadpool_info

    return torch.get_num_threads(), max(lib["num_threads"] for lib in threadpool_info())


def test_bounded_threads_bounds_small_work_only(two_threads):
    from fusion_bench_tsv.runtime.parallel import SMALL_WORK_NUMEL, bounded_threads

    assert _threads_now() == (2, 2)
    with bounded_threads(SMALL_WORK_NUMEL - 1):
        assert _threads_now() == (1, 1)
    assert _threads_now() == (2, 2)  # restored
    with bounded_threads(SMALL_WORK_NUMEL):
        assert _threads_now() == (2, 2)


def test_tsv_c_and_sti_decompose_small_matrices_on_one_thread(two_threads, monkeypatch):
    """Small SVDs with several OpenMP threads crawl when other processes keep the cores busy (issue 11)."""
    import fusion_bench_tsv.methods.sti as sti_module
    import fusion_bench_tsv.methods.tsv_compress as tsvc_module
    from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm

    seen = []

    def recorded(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append((name, *_threads_now()))
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    recorded(tsvc_module, "compress_matrix")
    recorded(sti_module, "truncated_svd")
    recorded(sti_module, "layer_interference")
    torch.manual_seed(0)
    pool = {"_pretrained_": torch.nn.Linear(16, 12)}
    for i in range(3):
        pool[f"task_{i}"] = deepcopy(pool["_pretrained_"])
        pool[f"task_{i}"].weight.data += 0.1 * torch.randn(12, 16)
    TSVCompressAlgorithm(device="cpu", show_pbar=False).compress(pool)
    STIAnalysis(device="cpu", show_pbar=False).run(pool)
    STIAnalysis(device="cpu", show_pbar=False, full_rank=False).run(pool)
    assert {name for name, *_ in seen} == {"compress_matrix", "truncated_svd", "layer_interference"}
    assert all(entry[1:] == (1, 1) for entry in seen), f"threads (torch, BLAS) seen: {sorted(set(seen))}"
    assert _threads_now() == (2, 2)  # restored
