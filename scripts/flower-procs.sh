# Sourced by the loopback scripts: the venv's bin on PATH, and the stopping of every process they start.
# The SuperLink and SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp children in
# new sessions; the whole tree is collected (by parent PID) before anything is signalled, so that no
# child is orphaned and missed. Callers append the PIDs they start to PIDS.
BIN="$(realpath "$(dirname "${PY:-.venv/bin/python}")")"
export PATH="$BIN:$PATH"  # the SuperLink and SuperNodes start flower-superexec / flwr-clientapp from PATH
PIDS=()
tree() { local p; for p in "$@"; do echo "$p"; tree $(ps -o pid= --ppid "$p" 2>/dev/null); done; }
cleanup() {
  local all; all=$(tree "${PIDS[@]}" | sort -u)
  [[ -n "$all" ]] && kill -TERM $all 2>/dev/null || true
  sleep 1
  [[ -n "$all" ]] && kill -KILL $all 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
# Wait (at most $2 s, default 90) until something listens on 127.0.0.1:$1: a fixed sleep races a
# SuperLink that starts slowly on a busy machine, and `flwr` commands do not retry a refused connection.
wait_for_port() {
  local deadline=$((SECONDS + ${2:-90}))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    (( SECONDS < deadline )) || { echo "nothing listens on 127.0.0.1:$1 after ${2:-90} s" >&2; return 1; }
    sleep 0.5
  done
}
