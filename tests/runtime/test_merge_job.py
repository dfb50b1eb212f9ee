"""runtime/merge_job.py: the per-parameter TSV-M job takes plain arguments and a timing callback; its
result does not depend on the order the task parts arrive in, and matches the float64 formula."""

from __future__ import annotations

from collections import defaultdict

import torch
from oracles import assert_within, merge_bound, oracle_tsv_merge, roundoff_bound

from fusion_bench_tsv.runtime.merge_job import ParameterJob, ParameterMerge


def _task_values(num_tasks: int, shape, seed: int):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    values = [theta0 + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(num_tasks)]
    return theta0, values


def test_parts_in_any_order_give_the_formula_and_report_their_times():
    theta0, values = _task_values(4, (24, 16), seed=0)
    times = defaultdict(list)
    merge = ParameterMerge({"w": 4}, [1.0] * 4, 0.5, torch.device("cpu"), "gram",
                           timer=lambda action, seconds: times[action].append(seconds))
    in_order, reversed_order = ParameterJob(merge, "w", theta0), ParameterJob(merge, "w", theta0)
    for i, value in enumerate(values):
        in_order.run_part(i, value)
    for i in reversed(range(4)):
        reversed_order.run_part(i, values[i])
    got = in_order.result.result()
    assert torch.equal(got, reversed_order.result.result()), "the result depends on the order of the parts"
    deltas = [v - theta0 for v in values]
    expected = theta0 + 0.5 * oracle_tsv_merge(deltas, 4)
    # the Gram path in float64: merge_bound (c·√n·ε₆₄·σ₁·κ) on M, halved by α = 0.5, plus θ₀'s addition
    bound = 0.5 * merge_bound(deltas, 4, torch.float64, gram=True) + roundoff_bound(torch.float64, 1, theta0.abs().max().item())
    assert_within(got, expected, bound, "ParameterJob")
    assert len(times["truncated svd"]) == 8 and len(times["merge"]) == 2, dict(times)
    assert all(s >= 0 for values_ in times.values() for s in values_)


def test_other_parameters_are_the_scaled_mean_and_no_timer_is_needed():
    theta0, values = _task_values(3, (7,), seed=1)
    merge = ParameterMerge({}, [1.0, 2.0, 1.0], 1.5, torch.device("cpu"), "svd")  # no timer
    job = ParameterJob(merge, "bias", theta0)
    for i, value in enumerate(values):
        job.run_part(i, value)
    expected = theta0 + 1.5 * ((values[0] - theta0) + 2.0 * (values[1] - theta0) + (values[2] - theta0)) / 3
    # a few float64 additions and scalings of entries of size |θ|: c·√n·ε₆₄·max|θ| with n = 8 operations
    assert_within(job.result.result(), expected, roundoff_bound(torch.float64, 8, max(v.abs().max().item() for v in values)),
                  "mean of the task vectors")


def test_an_error_in_a_part_reaches_the_result():
    theta0, values = _task_values(2, (6, 5), seed=2)
    merge = ParameterMerge({"w": 9}, [1.0, 1.0], 1.0, torch.device("cpu"), "gram")  # k = 9 > min(6, 5)
    job = ParameterJob(merge, "w", theta0)
    job.run_part(0, values[0])
    error = job.result.exception()
    assert isinstance(error, ValueError) and "rank k=9 is out of range" in str(error), error
