#!/usr/bin/env bash
# GPU checks in one call, for a machine with a CUDA GPU (tests here never need one).
#
# Runs the gpu-marked tests (Triton kernels against the reference on CUDA, AMP, DDP/NCCL,
# SyncBatchNorm, ONNX on the CUDA provider), then the GPU benchmarks,
# each as JSON beside a log: bench pool in float32 and bfloat16 (maxent_pool2d's Triton
# path against F.max_pool2d and the plain PyTorch composite, the reference path), and bench model
# resnet50 at batch 64. Every step runs even if an earlier one fails; the exit status is the
# number of failed steps.
#
# Usage: scripts/gpu_check.sh [OUT_DIR]     (default gpu-out; PYTHON picks the interpreter,
#        default python3, which must have torch with CUDA, triton, onnx, onnxruntime, click, rich,
#        pytest and hypothesis; gfgp itself is taken from this checkout through PYTHONPATH).
set -uo pipefail
OUT_DIR="$(realpath -m "${1:-gpu-out}")"  # relative to the caller's directory
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, stdout in OUT_DIR/NAME.out, stderr in NAME.err
  local name="$1" limit="$2"; shift 2
  echo "== $name: $*" >&2
  if ! timeout "$limit" "$@" >"$OUT_DIR/$name.out" 2>"$OUT_DIR/$name.err"; then
    echo "== $name FAILED (see $OUT_DIR/$name.err)" >&2
    failed=$((failed + 1))
  fi
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  || { echo "gpu_check: no CUDA device visible to $PY" >&2; exit 2; }
# Limits (seconds) keep the whole script inside one 10-minute device call even if a step hangs.
step pytest-gpu 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider
step bench-pool-fp32 90 "$PY" -m gfgp_cli bench pool --device cuda --json
step bench-pool-bf16 90 "$PY" -m gfgp_cli bench pool --device cuda --dtype bfloat16 --json
step bench-model-resnet50 120 "$PY" -m gfgp_cli bench model resnet50 --device cuda --batch-size 64 --json
tail -n 3 "$OUT_DIR/pytest-gpu.out" >&2
exit "$failed"
