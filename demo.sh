#!/usr/bin/env bash
# The offline demo: install into ./.venv, make a tiny local CLIP pool, merge it with TSV-M through the
# fusion_bench CLI and print the result beside FusionBench's baselines. Nothing is downloaded but packages.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ ! -x .venv/bin/fusion_bench ] || ! .venv/bin/python -c "import fusion_bench_tsv" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q ".[test]"
fi
DEMO_DIR="${FUSION_BENCH_TSV_DEMO_DIR:-$PWD/outputs/demo}"
.venv/bin/python - "$DEMO_DIR" <<'PY'
import sys
from pathlib import Path
from fusion_bench_tsv.local_data import save_task_dataset
from fusion_bench_tsv.synthetic import random_image_task, write_clip_pool, write_pool_configs
from fusion_bench_tsv.tiny_clip import make_tiny_clip, save_clip

root = Path(sys.argv[1])
if not (root / "config").is_dir():
    pretrained = save_clip(make_tiny_clip(seed=0), root / "models" / "pretrained")
    tasks = [f"task_{i}" for i in range(8)]
    paths = write_clip_pool(root / "models", pretrained, tasks, seed=1)
    for i, task in enumerate(tasks):
        images, labels = random_image_task(num_classes=3, num_images=24, image_size=32, seed=10 + i)
        save_task_dataset(root / "data", task, {"test": (images, labels)}, ["red", "green", "blue"], ["a photo of a {}."])
    write_pool_configs(root / "config", "demo_T8", pretrained, paths, data_root=root / "data")
PY
run() {  # run one fusion_bench method on the demo pool; the report goes to $DEMO_DIR/reports/<label>.json
    local label=$1; shift
    .venv/bin/fusion_bench --config-dir "$DEMO_DIR/config" modelpool=CLIPVisionModelPool/demo_T8 \
        taskpool=CLIPVisionModelTaskPool/demo_T8 fabric.accelerator=cpu print_config=false \
        report_save_path="$DEMO_DIR/reports/$label.json" "$@" >"$DEMO_DIR/$label.log" 2>&1 \
        || { echo "fusion_bench failed for $label, see $DEMO_DIR/$label.log"; exit 1; }
    echo "  done: $label"
}
echo "Merging 8 synthetic tasks of a tiny local CLIP (logs in $DEMO_DIR):"
run zero_shot method=dummy
run simple_average method=simple_average
run task_arithmetic method=task_arithmetic
run fusion_bench_tsvm method=task_singular_vector/TaskSingularVectorMerging
run tsv_merge method=tsv/tsv_merge
.venv/bin/python - "$DEMO_DIR/reports" <<'PY'
import json, sys
from pathlib import Path
rows = [(p.stem, json.loads(p.read_text())["average"]["accuracy"]) for p in sorted(Path(sys.argv[1]).glob("*.json"))]
print("\n| method | average accuracy (%) |\n|---|---|")
for name, acc in rows:
    print(f"| {name} | {100 * acc:.2f} |")
PY
