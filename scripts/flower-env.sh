# Source this before any Flower command: it keeps Flower offline and quiet.
#   FLWR_HOME              Flower's own state and the `flwr` CLI's connections (config.toml)
#   FLWR_TELEMETRY_ENABLED no telemetry events
#   FLWR_DISABLE_UPDATE_CHECK
#   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
#                          without it `flwr run` runs `uv sync` on the nodes, which would fetch a CUDA torch
#   RAY_USAGE_STATS_ENABLED (the Ray simulation)
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0
mkdir -p "$FLWR_HOME"
