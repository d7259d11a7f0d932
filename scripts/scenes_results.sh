#!/usr/bin/env bash
# The digit-scenes comparison of docs/results.md: a segmentation model (LR-ASPP MobileNetV3-Large)
# and a detector (Faster R-CNN MobileNetV3-Large 320 FPN), each converted with the default pool
# (gfgp) and with --pool skip (the original architecture), trained the same way on --data scenes
# from scratch, evaluated with gfgp eval; 2 seeds (the conversion's initial weights and the run's
# data order). Writes OUT/<task>-<pool>-s<seed>/ (run folders), OUT/results.jsonl (one line per
# run: the gfgp eval --json output plus its seconds) and prints the table.
#
#   scripts/scenes_results.sh [OUT]          (default: scenes-results)
#   TASKS="seg" SEEDS="0" scripts/scenes_results.sh /tmp/quick
#
# Sizes are environment variables (defaults: what docs/results.md ran on 2 CPU cores). The
# segmentation runs set --bn-momentum 0.1: LR-ASPP's MobileNetV3 backbone has torchvision's 0.01,
# which leaves its BatchNorm running statistics near their initial values after a few hundred
# steps (every validation pixel then scores background). The detector keeps torchvision's
# defaults except fewer training proposals and sampled boxes (--kwarg, 300 and 64 instead of
# 2000 and 512), which makes a step about twice as fast on a CPU.
set -euo pipefail

OUT=${1:-scenes-results}
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-"seg det"}
POOLS=${POOLS:-"gfgp skip"}
SEEDS=${SEEDS:-"0 1"}
THREADS=${THREADS:-1}
SEG_SIZE=${SEG_SIZE:-64} SEG_DATA=${SEG_DATA:-scenes:0:train=600:val=200} SEG_EPOCHS=${SEG_EPOCHS:-8}
SEG_LR=${SEG_LR:-2e-3} SEG_BN_MOMENTUM=${SEG_BN_MOMENTUM:-0.1}
DET_SIZE=${DET_SIZE:-96} DET_DATA=${DET_DATA:-scenes:0:train=400:val=80} DET_EPOCHS=${DET_EPOCHS:-8}
DET_LR=${DET_LR:-1e-3}

mkdir -p "$OUT"
: > "$OUT/results.jsonl"
gfgp() { OMP_NUM_THREADS=$THREADS "$PY" -m gfgp_cli "$@"; }

for task in $TASKS; do
  for pool in $POOLS; do
    for seed in $SEEDS; do
      run="$OUT/$task-$pool-s$seed"
      if [ "$task" = seg ]; then
        gfgp convert lraspp_mobilenet_v3_large --num-classes 11 --image-size "$SEG_SIZE" --pool "$pool" \
          --seed "$seed" --out "$run.pt" > "$run.convert.txt"
        start=$(date +%s)
        gfgp train "$run.pt" --data "$SEG_DATA" --out "$run" --force --epochs "$SEG_EPOCHS" --batch-size 16 \
          --opt adamw --lr "$SEG_LR" --sched cosine --bn-momentum "$SEG_BN_MOMENTUM" --seed "$seed" --threads "$THREADS" \
          2> "$run.train.log" > /dev/null
        data=$SEG_DATA
      else
        gfgp convert fasterrcnn_mobilenet_v3_large_320_fpn --num-classes 11 --kwarg min_size="$DET_SIZE" \
          --kwarg max_size="$DET_SIZE" --kwarg rpn_pre_nms_top_n_train=300 --kwarg rpn_post_nms_top_n_train=300 \
          --kwarg box_batch_size_per_image=64 --image-size "$DET_SIZE" --pool "$pool" --seed "$seed" --out "$run.pt" \
          > "$run.convert.txt"
        start=$(date +%s)
        gfgp train "$run.pt" --data "$DET_DATA" --out "$run" --force --epochs "$DET_EPOCHS" --batch-size 8 \
          --opt adamw --lr "$DET_LR" --sched cosine --clip-grad-norm 10 --seed "$seed" --threads "$THREADS" \
          2> "$run.train.log" > /dev/null
        data=$DET_DATA
      fi
      trained=$(date +%s)
      gfgp eval "$run/last.pt" --data "$data" --json > "$run.eval.json"
      "$PY" - "$run.eval.json" "$task" "$pool" "$seed" "$((trained - start))" "$run" >> "$OUT/results.jsonl" <<'EOF'
import json, sys
path, task, pool, seed, seconds, run = sys.argv[1:]
last = json.loads(open(f"{run}/metrics.jsonl").read().splitlines()[-1])  # the last epoch's row
train = {k: v for k, v in last.items() if k.startswith("train_")}
print(json.dumps({**json.load(open(path)), "model": task, "pool": pool, "seed": int(seed), "train_s": int(seconds),
                  **train}))
EOF
      tail -1 "$OUT/results.jsonl"
    done
  done
done

"$PY" - "$OUT/results.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
keys = {"seg": ("miou", "pixel_acc"), "det": ("map", "map50")}
print(f"{'model':5} {'pool':5} {'seeds':>5} {'metric 1 (mean, each)':>28} {'metric 2 (mean, each)':>28} {'train s':>8}")
for task in dict.fromkeys(r["model"] for r in rows):
    for pool in dict.fromkeys(r["pool"] for r in rows if r["model"] == task):
        group = [r for r in rows if r["model"] == task and r["pool"] == pool]
        cells = []
        for key in keys[task]:
            values = [r[key] for r in group]
            cells.append(f"{key} {statistics.mean(values):6.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        seconds = statistics.mean(r["train_s"] for r in group)
        print(f"{task:5} {pool:5} {len(group):5d} {cells[0]:>28} {cells[1]:>28} {seconds:8.0f}")
EOF
