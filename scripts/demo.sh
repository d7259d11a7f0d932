#!/usr/bin/env bash
# make demo: convert -> train -> eval -> plot -> export on real data, on the CPU, in a few minutes.
#
# The data are the 1,797 handwritten digits bundled with scikit-learn (8x8 pixels, 10 classes; no
# download), upsampled to 16x16 with a fixed 80/20 train/val split. The model is torchvision's
# ResNet-18 converted to GFGP pooling in the paper's layout (five GFGP layers), trained from
# scratch with the paper's ResNet recipe (SGD, momentum 0.9, wd 1e-4) shortened to a few epochs:
# batch 64 instead of 256 scales the learning rate linearly to 0.025, and the first /10 step
# (epoch 30) is never reached. eval reports best.pt (the epoch with the best val top-1).
#
# Usage: scripts/demo.sh [VENV]   (default .venv; `make demo` runs it after installing the venv)
# Environment: DEMO_OUT (default demo-out), DEMO_EPOCHS (default 8).
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
OUT="${DEMO_OUT:-demo-out}"
EPOCHS="${DEMO_EPOCHS:-8}"
cd "$(dirname "$0")/.."

gfgp() {
  echo "+ gfgp $*" >&2
  "$PY" -m gfgp_cli "$@"
}

start=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT"

gfgp convert resnet18 --num-classes 10 --image-size 16 --out "$OUT/resnet18-gfgp.pt"
gfgp train "$OUT/resnet18-gfgp.pt" --data digits --out "$OUT/run" --recipe paper-resnet --epochs "$EPOCHS" --batch-size 64
gfgp eval "$OUT/run/best.pt" --data digits --json > "$OUT/eval.json"
gfgp plot "$OUT/run" --data digits
gfgp export "$OUT/run/best.pt" --onnx "$OUT/resnet18-gfgp.onnx" --force

"$PY" - "$OUT/eval.json" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"\nfinal accuracy: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  "
      f"on the {m['images']} held-out digits ({m['checkpoint']}); demo took {sys.argv[2]} s")
PYEOF
