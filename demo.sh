#!/usr/bin/env bash
# The README's demo: install into ./.venv (.ci/install, as .ci/run does), build or reuse the offline 8-task
# tiny-CLIP benchmark, merge it with TSV-M through the fusion_bench CLI, evaluate it, and print the result beside
# FusionBench's baselines measured on the same benchmark (benchmarks/results/tiny_clip.json) with
# fusion-bench-tsv-compare.
# The build goes to $FUSION_BENCH_TSV_DATA/tiny_clip (default ~/.cache/fusion_bench_tsv/tiny_clip).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
bash .ci/install
. .venv/bin/activate

echo "== 1/3 build (or reuse) the 8-task benchmark"
suite="$(fusion-bench-tsv-build --num-tasks 8 | tail -n 1)"

echo "== 2/3 merge with TSV-M and evaluate (fusion_bench CLI)"
out="$PWD/outputs/demo/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
# run outside the repository root so that the installed package (not ./config) provides the configs;
# path.log_dir: FusionBench's run directory (config, logs, report) is $out itself
(cd "$out" && fusion_bench method=tsv/tsv_merge \
    modelpool=CLIPVisionModelPool/tiny_clip_8 taskpool=CLIPVisionModelTaskPool/tiny_clip_8 \
    path.log_dir="$out" report_save_path="$out/program_report.json" print_config=false)

echo "== 3/3 TSV-M beside the baselines (8 tasks; the stored table's rows, this build's and this run's)"
fusion-bench-tsv-compare "$out" --results benchmarks/results/tiny_clip.json --fine-tuned "$suite/build.json" \
    --out "$out/compare" --title "TSV-M (this run) beside the stored baselines, 8 tasks"
echo "this run's results: $out (program_report.json, FusionBench's config and log; the comparison in compare/)"
