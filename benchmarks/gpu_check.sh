#!/usr/bin/env bash
# Every GPU check in one call, for a machine that is lent for minutes (spec §8):
#   1. the CUDA tests (pytest -m cuda),
#   2. benchmarks/throughput.py at batch 2^20, fp32 (TF32 matmuls) and AMP (fp16 autocast + loss scaling),
#   3. a short training run on the synthetic dataset (generated here), AMP, data resident on the GPU.
# Everything is tee'd into $OUT (default ./gpu_out): pytest_cuda.txt, throughput.txt/.jsonl, train.txt/.jsonl.
#   OUT=/tmp/gpu benchmarks/gpu_check.sh
#   DEVICE=cpu benchmarks/gpu_check.sh     the same steps on the CPU at tiny sizes (how this script is tested)
# PYTHON picks the interpreter (default: the project's .venv when present, else python3).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-./gpu_out}
device=${DEVICE:-cuda}
if [ -z "${PYTHON:-}" ] && [ -x "$here/.venv/bin/python" ]; then
  python="$here/.venv/bin/python"
else
  python=${PYTHON:-python3}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"

if [ "$device" = cuda ]; then
  shape=()                                  # ml-20m shape, all 138,493 eval users
  batch=1048576
  synthetic=()                              # the default synthetic preset
  train=(-e 5 -b 1048576 --opt_level O2)
else
  shape=(--users 2000 --items 500 --positives 20000 --eval_users 200 --steps 2 --warmup 1)
  batch=8192
  synthetic=(--users 300 --items 200)
  train=(-e 1 -b 8192 --opt_level O0)
fi

{ nvidia-smi || echo "no nvidia-smi"; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"; } \
  2>&1 | tee "$out/environment.txt"

echo "== 1. CUDA tests (they skip without CUDA)"
set +e
"$python" -m pytest -q tests -m cuda 2>&1 | tee "$out/pytest_cuda.txt"
tests_status=${PIPESTATUS[0]}
set -e
# 5: nothing collected, or all deselected; anything else but 0 is a failure, reported at the end.

echo "== 2. throughput at batch $batch, fp32 and AMP, on $device"
rm -f "$out/throughput.jsonl"
"$python" benchmarks/throughput.py --device "$device" --batch_size "$batch" --precision fp32 amp "${shape[@]}" \
  --json_out "$out/throughput.jsonl" 2>&1 | tee "$out/throughput.txt"

echo "== 3. short synthetic training run on $device"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" synthetic.py --output "$work/ratings.csv" "${synthetic[@]}"
"$python" convert.py --path "$work/ratings.csv" --output "$work/cache"
"$python" ncf.py --data "$work/cache" --device "$device" "${train[@]}" --checkpoint_dir "$work/ckpt" \
  --log_path "$out/train.jsonl" --no_progress 2>&1 | tee "$out/train.txt"

if [ "$tests_status" -ne 0 ] && [ "$tests_status" -ne 5 ]; then
  echo "gpu_check.sh: the CUDA tests failed (pytest exit $tests_status): see $out/pytest_cuda.txt" >&2
  exit 1
fi
echo "gpu_check.sh: done; results in $out"
