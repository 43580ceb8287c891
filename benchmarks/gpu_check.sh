#!/usr/bin/env bash
# Every GPU check in one call, for a machine that is lent for minutes. Each step runs under
# its own time limit and status; a failing step does not skip the others, and a summary ends the run.
#   1. environment (nvidia-smi, torch and CUDA versions)
#   2. the CUDA tests (pytest -m cuda)
#   3. benchmarks/throughput.py at batches 131072 and 1048576, fp32 (TF32 matmuls) and AMP (fp16 + loss scaling),
#      then at 1048576 with --compile (ncf.py --compile: torch.compile's training and scoring)
#   4. a short AMP training run on synthetic data with --full_ranking, then --resume of it for one more epoch
#   5. a resume under the default O2 (fp16, loss scaling on) of a last.pth written by an O0 run (scaler off)
#   6. inference.py benchmark on the device (torch eager)
#   7. three training steps and one evaluation under torch.cuda.set_sync_debug_mode("warn"): any host sync
# Outputs go to $OUT (default ./gpu_out): environment.txt, pytest_cuda.txt, throughput.txt/.jsonl,
# throughput_compile.txt/.jsonl,
# train.txt/.jsonl, resume.txt, resume_o0.txt, inference.txt, sync.txt, summary.txt.
#   OUT=/tmp/gpu benchmarks/gpu_check.sh
#   DEVICE=cpu benchmarks/gpu_check.sh     the same steps on the CPU at tiny sizes (how this script is tested)
# OUT must be a new or empty folder, or one this script wrote before (its marker file .written-by-gpu_check):
# every output there is replaced. Exit status: 0 when every step passed, 1 when one failed, 2 when the
# interpreter has no torch, DEVICE=cuda finds no CUDA device or OUT holds other files (one line, nothing run
# or written). In the CPU dry run the CUDA tests skip themselves: the summary says
# "skipped: no CUDA" for them, and "no sync detection" for step 7, never "ok"; on a CUDA machine a CUDA
# test step in which every test skipped is a failure.
# PYTHON picks the interpreter (default: the project's .venv when present, else python3).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-./gpu_out}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ] && [ -x "$here/.venv/bin/python" ]; then
  python="$here/.venv/bin/python"
else
  python=${PYTHON:-python3}
fi
case "$device" in
  cuda|cpu) ;;
  *) echo "gpu_check.sh: error: DEVICE=$device: choose cuda (the default) or cpu (the dry run)" >&2; exit 2 ;;
esac
probe=$("$python" -c "import torch; print(f'torch {torch.__version__} (CUDA build {torch.version.cuda})', \
torch.cuda.is_available())" 2>&1 | tail -n 1)
case "$probe" in
  torch*) ;;
  *) echo "gpu_check.sh: error: $python cannot import torch ($probe): nothing was run; install the project's requirements, or name an interpreter with PYTHON=" >&2
     exit 2 ;;
esac
if [ "$device" = cuda ] && [ "${probe##* }" != True ]; then
  echo "gpu_check.sh: error: no CUDA device (${probe% *}, $python): nothing was run; run it on a CUDA machine, or DEVICE=cpu for the dry run on the CPU" >&2
  exit 2
fi
# Every file here is replaced: only a new or empty folder, or one this script wrote (its marker), is used.
marker=.written-by-gpu_check
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] && [ ! -f "$out/$marker" ]; then
  echo "gpu_check.sh: error: OUT=$out holds files this script did not write, which it would replace: choose a new or empty folder" >&2
  exit 2
fi
mkdir -p "$out" && touch "$out/$marker" || exit 1
out=$(cd "$out" && pwd)
cd "$here" || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$device" = cuda ]; then
  shape=()                                  # ml-20m shape, all 138,493 eval users
  batches=(131072 1048576)
  compiled=(--precision fp32 amp)           # compiled: the largest batch only
  synthetic=()                              # the default synthetic preset
  train=(-e 3 -b 1048576)                   # the recipe's O2 default: fp16 autocast + loss scaling
  bench=(--batch_sizes 1024 65536 1048576 --precision fp32 amp)
  sync=()                                   # sync_check's default batch: 65,536
else
  shape=(--users 2000 --items 500 --positives 20000 --eval_users 200 --steps 2 --warmup 1)
  batches=(8192)
  compiled=(--precision fp32)               # a compile takes tens of seconds on a CPU: one
  synthetic=(--users 300 --items 200)
  train=(-e 1 -b 8192 --opt_level O0)
  bench=(--batch_sizes 1024 --precision fp32 --users 300 --items 200 --iterations 3 --warmup 1)
  sync=(--batch_size 4096)                  # 4 steps at least in the tiny epoch
fi

summary=()
record() {
  summary+=("$(printf '%-32s %s' "$1" "$2")")
}
# step NAME LIMIT_S LOG CMD...: run CMD with its output tee'd to LOG; its status is left in $status.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  [ "$status" -eq 124 ] && echo "gpu_check.sh: $name ran past ${limit}s" | tee -a "$log"
  record "$name" "$([ "$status" -eq 0 ] && echo ok || echo "FAILED (exit $status)")"
}

step environment 60 "$out/environment.txt" bash -c \
  "nvidia-smi || echo 'no nvidia-smi'; '$python' -c \"import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())\""

# Without CUDA every CUDA test skips itself (exit 0) or none is collected (exit 5): no test passed, so
# the summary must not say ok.
step "cuda tests" 600 "$out/pytest_cuda.txt" "$python" -m pytest -q tests -m cuda --timeout 300
if { [ "$status" -eq 0 ] || [ "$status" -eq 5 ]; } && ! grep -Eq '[0-9]+ passed' "$out/pytest_cuda.txt"; then
  unset 'summary[-1]'
  if [ "$device" = cuda ]; then
    record "cuda tests" "FAILED (every CUDA test skipped on a CUDA machine)"
  else
    record "cuda tests" "skipped: no CUDA"
  fi
fi

rm -f "$out/throughput.jsonl"
step throughput 900 "$out/throughput.txt" "$python" benchmarks/throughput.py --device "$device" \
  --batch_size "${batches[@]}" --precision fp32 amp "${shape[@]}" --json_out "$out/throughput.jsonl"
rm -f "$out/throughput_compile.jsonl"
step "throughput --compile" 600 "$out/throughput_compile.txt" "$python" benchmarks/throughput.py --device "$device" \
  --batch_size "${batches[-1]}" "${compiled[@]}" "${shape[@]}" --compile --no_floor \
  --json_out "$out/throughput_compile.jsonl"

"$python" synthetic.py --output "$work/ratings.csv" "${synthetic[@]}" >/dev/null \
  && "$python" convert.py --path "$work/ratings.csv" --output "$work/cache" --no_progress >/dev/null
step "train + full ranking" 600 "$out/train.txt" "$python" ncf.py --data "$work/cache" --device "$device" \
  "${train[@]}" --full_ranking --checkpoint_dir "$work/ckpt" --log_path "$out/train.jsonl" --no_progress
epochs=$(grep -c '"event": "epoch"' "$out/train.jsonl" 2>/dev/null || echo 0)
step "resume" 300 "$out/resume.txt" "$python" ncf.py --data "$work/cache" --device "$device" \
  "${train[@]}" -e $((epochs + 1)) --checkpoint_dir "$work/ckpt" --resume --no_progress

# An O0 last.pth holds an empty (disabled) loss-scaler state; the O2 resume must start a fresh scaler.
step "resume of an O0 last.pth" 300 "$out/resume_o0.txt" bash -c \
  "'$python' ncf.py --data '$work/cache' --device '$device' -e 1 -b 8192 --opt_level O0 \
     --checkpoint_dir '$work/ck_o0' --no_progress && \
   '$python' ncf.py --data '$work/cache' --device '$device' -e 2 -b 8192 --opt_level O2 \
     --checkpoint_dir '$work/ck_o0' --resume --no_progress"

step "inference benchmark" 300 "$out/inference.txt" "$python" inference.py benchmark --device "$device" \
  --backend torch "${bench[@]}"

step "host syncs" 300 "$out/sync.txt" \
  "$python" benchmarks/sync_check.py --data "$work/cache" --device "$device" "${sync[@]}"
if [ "$device" = cpu ] && [ "$status" -eq 0 ]; then  # it ran, but nothing was detected: never "ok"
  unset 'summary[-1]'
  record "host syncs" "ran: no sync detection on a CPU"
fi

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
if grep -q FAILED "$out/summary.txt"; then
  echo "gpu_check.sh: some steps failed; results in $out" >&2
  exit 1
fi
if [ "$device" = cpu ]; then
  echo "gpu_check.sh: CPU dry run done (no CUDA test ran, no host sync was detected: these are no GPU results); results in $out"
else
  echo "gpu_check.sh: done; results in $out"
fi
