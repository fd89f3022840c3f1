#!/usr/bin/env bash
# The GPU check, sized for a short loan of one GPU (under 10 minutes on one H100): the CUDA tests,
# benchmarks/aggregation.py on CUDA, one demo round on CUDA, and one row of the quick grid. Every
# step is bounded by its own timeout and recorded in OUT/steps.tsv (step, exit code, seconds); a
# failing step does not stop the others, and the script exits non-zero if any failed. All figures
# land under OUT (default $OUT, else runs/gpu-check).
#
# Usage:
#   scripts/gpu-check.sh [OUT]             on a machine with a CUDA GPU (the device tool's run)
#   DRY_RUN=1 scripts/gpu-check.sh OUT     every step on the CPU at toy size (tests/scripts runs it)
#
# Environment: PY (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DEST="${1:-${OUT:-runs/gpu-check}}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
STEPS="$DEST/steps.tsv"
printf 'step\trc\tseconds\n' > "$STEPS"
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run it, its output into DEST/NAME.txt
  local name="$1" limit="$2"
  shift 2
  local t0 rc
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$DEST/$name.txt" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  echo "gpu-check: $name: exit $rc in $(( $(date +%s) - t0 ))s (output: $DEST/$name.txt)"
  [ "$rc" -eq 0 ] || failed=1
}

if [ "${DRY_RUN:-0}" = "1" ]; then
  DEVICE=cpu
  AGG=(--tiny --repeats 1)
  DEMO=(--set model=builtin:tiny-llama --set num_clients=3 --set clients_per_round=2 --set local_steps=2
        --set data_options.max_per_task=4 --set train.cutoff_len=64 --set eval.max_tasks=2
        --set eval.max_examples_per_task=1 --set eval.max_new_tokens=4 --set "lora.types=[[2, 4], [4, 8]]")
  GRID=(--preset smoke --only demo/FedIT/homo)
else
  DEVICE=cuda
  AGG=(--repeats 1)
  DEMO=()
  GRID=(--preset quick --only ni/FedIT/homo)
fi

step environment 60 "$PY" -c "
import torch, flexlora, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'flexlora', flexlora.__version__)
print('cuda available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, round(p.total_memory / 2**30, 1), 'GiB')
"
if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1 || true
fi
# The tests that need CUDA (they skip on a CPU, which the dry run records as such).
step cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/core/aggregators/test_flexlora.py -k cuda
step aggregation 240 "$PY" benchmarks/aggregation.py --device "$DEVICE" "${AGG[@]}" --json "$DEST/aggregation.json"
rm -rf "$DEST/demo"
step demo-round 150 "$PY" -m flexlora.cli.main run --no-progress --output "$DEST/demo" --set rounds=1 \
  --set device="$DEVICE" "${DEMO[@]}"
step grid-slice 180 "$PY" -m flexlora.cli.main bench quality "${GRID[@]}" --set device="$DEVICE" --output "$DEST/grid"
echo "gpu-check: done; figures under $DEST (steps.tsv, aggregation.json, demo/metrics.jsonl, grid/results.md)"
exit "$failed"
