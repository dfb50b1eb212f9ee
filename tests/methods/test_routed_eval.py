"""Routed evaluation of TSV-C: the printed summary (the evaluation itself: tests/methods/test_tsv_compress.py)."""

from __future__ import annotations

def test_tsv_c_summary_is_a_rounded_table():
    """Percentages with one decimal, '-' where a value is undefined; fine-tuned/normalized columns only if measured."""
    from fusion_bench_tsv.methods.routed_eval import format_summary

    report = {"tasks": {"shapes": {"accuracy": 0.88, "loss": 0.31, "finetuned_accuracy": 0.85,
                                   "normalized_accuracy": 0.88 / 0.85},  # 1.0352941176470587
                        "colors": {"accuracy": 0.5, "finetuned_accuracy": 0.0, "normalized_accuracy": None}},
              "average": {"accuracy": 0.69, "finetuned_accuracy": 0.425}}
    assert format_summary(report, "title:") == "\n".join([
        "title:",
        "task       accuracy  fine-tuned  normalized",
        "shapes        88.0%       85.0%      103.5%",
        "colors        50.0%        0.0%           -",
        "average       69.0%       42.5%           -",
    ])
    only_accuracy = {"tasks": {"a": {"accuracy": 0.123456, "loss": 1.0}}, "average": {"accuracy": 0.123456}}
    assert format_summary(only_accuracy, "t") == "\n".join([
        "t",
        "task       accuracy",
        "a             12.3%",
        "average       12.3%",
    ])
