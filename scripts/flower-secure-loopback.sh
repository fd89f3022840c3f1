#!/usr/bin/env bash
# The loopback federation over TLS with SuperNode authentication, using only Flower's own mechanisms:
# a self-signed CA and a server certificate for 127.0.0.1 (openssl), ECDSA P-384 node keys
# (ssh-keygen), `flower-superlink --ssl-* --enable-supernode-auth`, `flwr supernode register`, and
# `flower-supernode --root-certificates --auth-supernode-private-key`. One node is registered and
# trains; a second, unregistered node is started too and must be refused.
#
#   scripts/flower-secure-loopback.sh OUTPUT_DIR [-- FLWR_RUN_CONFIG...]
# Environment: PY (default .venv/bin/python), FLEXLORA_BASE_PORT (default 19490), TIMEOUT (default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/flower-env.sh
source scripts/flower-procs.sh
BASE="${FLEXLORA_BASE_PORT:-19490}"
TIMEOUT="${TIMEOUT:-600}"
OUT="$(realpath -m "$1")"; shift
[[ $# -gt 0 && "$1" == "--" ]] && shift
EXTRA=("$@")
LOGS="$OUT.logs"; KEYS="$OUT.keys"; mkdir -p "$LOGS" "$KEYS"

# Certificates (valid 2 days) and node keys, made fresh for this run.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$KEYS/ca.key" -out "$KEYS/ca.crt" -days 2 \
  -subj "/CN=flexlora-loopback-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$KEYS/server.key" -out "$KEYS/server.csr" -subj "/CN=127.0.0.1" 2>/dev/null
printf "subjectAltName=IP:127.0.0.1,DNS:localhost\n" > "$KEYS/san.cnf"
openssl x509 -req -in "$KEYS/server.csr" -CA "$KEYS/ca.crt" -CAkey "$KEYS/ca.key" -CAcreateserial \
  -out "$KEYS/server.pem" -days 2 -extfile "$KEYS/san.cnf" 2>/dev/null
for n in registered intruder; do rm -f "$KEYS/$n" "$KEYS/$n.pub"; ssh-keygen -q -t ecdsa -b 384 -N "" -f "$KEYS/$n"; done

cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "secure"

[superlink.secure]
address = "127.0.0.1:$BASE"
root-certificates = "$KEYS/ca.crt"

[superlink.plaintext]
address = "127.0.0.1:$BASE"
insecure = true
TOML

"$BIN/flower-superlink" --host 127.0.0.1 --port "$BASE" --ssl-ca-certfile "$KEYS/ca.crt" \
  --ssl-certfile "$KEYS/server.pem" --ssl-keyfile "$KEYS/server.key" --enable-supernode-auth \
  > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
wait_for_port "$BASE"
"$BIN/flwr" supernode register "$KEYS/registered.pub" secure > "$LOGS/register.log" 2>&1
"$BIN/flower-supernode" --superlink "127.0.0.1:$BASE" --root-certificates "$KEYS/ca.crt" \
  --auth-supernode-private-key "$KEYS/registered" --host 127.0.0.1 --port "$((BASE + 1))" \
  --node-config "partition-id=0" > "$LOGS/supernode-registered.log" 2>&1 &
PIDS+=($!)
"$BIN/flower-supernode" --superlink "127.0.0.1:$BASE" --root-certificates "$KEYS/ca.crt" \
  --auth-supernode-private-key "$KEYS/intruder" --host 127.0.0.1 --port "$((BASE + 2))" \
  --node-config "partition-id=1" > "$LOGS/supernode-intruder.log" 2>&1 &
PIDS+=($!)
sleep 3
RUNCFG=(--run-config "output='$OUT'")
for e in "${EXTRA[@]}"; do RUNCFG+=(--run-config "$e"); done
timeout "$TIMEOUT" "$BIN/flwr" run . secure "${RUNCFG[@]}" --stream 2>&1 | tee "$LOGS/flwr-run.log"
"$BIN/flwr" supernode list secure --format json > "$LOGS/supernodes.json" 2>&1 || true
# The SuperLink speaks TLS only: a plaintext client must fail (its exit status is recorded).
set +e; timeout 60 "$BIN/flwr" supernode list plaintext > "$LOGS/plaintext.log" 2>&1; echo "exit $?" >> "$LOGS/plaintext.log"; set -e
test -f "$OUT/adapter/adapter_model.safetensors" || { echo "no adapter in $OUT; logs in $LOGS" >&2; exit 1; }
echo "run directory: $OUT (logs: $LOGS)"
