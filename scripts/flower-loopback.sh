#!/usr/bin/env bash
# A real Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes (their own processes, each
# with its partition and client type in --node-config), and `flwr run .` of the FlexLoRA app.
# Every process started here is stopped by PID on exit, also when something fails.
#
#   scripts/flower-loopback.sh OUTPUT_DIR "NODE_CONFIG_0" "NODE_CONFIG_1" ... [-- FLWR_RUN_CONFIG...]
#
# Example (what `make flower-demo` runs):
#   scripts/flower-loopback.sh runs/flower-demo "partition-id=0 client-type='type1'" \
#       "partition-id=1 client-type='type2'" "partition-id=2 client-type='type3'" \
#       -- "set='model=\"builtin:tiny-llama\";rounds=2'"
# Environment: PY (default .venv/bin/python), FLEXLORA_BASE_PORT (default 19090), TIMEOUT (s, default 600),
# RESUME_ON_FAILURE=1: when the run ends without an adapter (e.g. its ServerApp was killed), start it
# once more with resume=true on the same SuperLink and SuperNodes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/flower-env.sh
source scripts/flower-procs.sh
BASE="${FLEXLORA_BASE_PORT:-19090}"
TIMEOUT="${TIMEOUT:-600}"
OUT="$(realpath -m "$1")"; shift
NODES=(); while [[ $# -gt 0 && "$1" != "--" ]]; do NODES+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
EXTRA=("$@")
LOGS="$OUT.logs"; mkdir -p "$LOGS"

cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$BASE"
insecure = true
TOML

# Flower 1.42 serves the Fleet, Control and ServerAppIo APIs on one HTTP port.
"$BIN/flower-superlink" --insecure --host 127.0.0.1 --port "$BASE" > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
i=0
for nc in "${NODES[@]}"; do
  "$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$BASE" --host 127.0.0.1 --port "$((BASE + 1 + i))" \
    --node-config "$nc" > "$LOGS/supernode$i.log" 2>&1 &
  PIDS+=($!)
  i=$((i + 1))
done
echo "${PIDS[@]}" > "$LOGS/pids"  # superlink, then one per SuperNode in order (for fault-injection tests)
wait_for_port "$BASE"
sleep 2  # the SuperNodes register on their own (they retry); this only gives them a head start
RUNCFG=(--run-config "output='$OUT'")
for e in "${EXTRA[@]}"; do RUNCFG+=(--run-config "$e"); done
timeout "$TIMEOUT" "$BIN/flwr" run . loopback "${RUNCFG[@]}" --stream 2>&1 | tee "$LOGS/flwr-run.log" || true
if [[ "${RESUME_ON_FAILURE:-0}" == 1 && ! -f "$OUT/adapter/adapter_model.safetensors" ]]; then
  echo "the run stopped without an adapter; resuming it from its checkpoint" | tee -a "$LOGS/flwr-run.log"
  timeout "$TIMEOUT" "$BIN/flwr" run . loopback --run-config "output='$OUT' resume=true" --stream 2>&1 \
    | tee "$LOGS/flwr-resume.log" || true
fi
test -f "$OUT/adapter/adapter_model.safetensors" || { echo "no adapter in $OUT; logs in $LOGS" >&2; exit 1; }
echo "run directory: $OUT (logs: $LOGS)"
