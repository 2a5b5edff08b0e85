#!/usr/bin/env bash
# Start a local Ray head bound to 127.0.0.1, submit one rlloop run with `ray job submit`, stop the head.
#   bash launch/local_job.sh [hydra overrides...]      e.g.  bash launch/local_job.sh model=tiny trainer.total_steps=1
# Env: NUM_CPUS (2), RAY_PORT (6390), RAY_DASHBOARD_PORT (8266), OUT_DIR (outputs/ray_job/<time>), PYTHON (.venv's).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
RAY=${RAY:-$(dirname "$PYTHON")/ray}
PORT=${RAY_PORT:-6390}
DASH=${RAY_DASHBOARD_PORT:-8266}
OUT_DIR=${OUT_DIR:-$ROOT/outputs/ray_job/$(date +%Y%m%d-%H%M%S)}
# Ray 2.60 binds to eth0 and enables token auth by default; a laptop head stays on loopback without a token.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

# A private temp dir marks this head's processes: at exit only they are stopped. (`ray stop` would kill
# every Ray cluster on the machine, other users' and test sessions' included.)
RAY_TMP=$(mktemp -d /tmp/rlloop-ray-XXXXXX)
stop_head() {
  pkill -TERM -f -- "$RAY_TMP" 2>/dev/null || true
  sleep 2
  pkill -KILL -f -- "$RAY_TMP" 2>/dev/null || true
  rm -rf "$RAY_TMP"
}
trap stop_head EXIT
"$RAY" start --head --node-ip-address=127.0.0.1 --num-cpus="${NUM_CPUS:-2}" --port="$PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --disable-usage-stats --temp-dir="$RAY_TMP" >/dev/null

# The working dir travels to the cluster; the venv, outputs and git history do not.
"$RAY" job submit --address "http://127.0.0.1:$DASH" --working-dir "$ROOT" \
  --runtime-env-json '{"excludes": [".venv", ".git", "outputs", "multirun", "wandb", "*.png", ".pytest_cache"]}' \
  -- "$PYTHON" -m rlloop.train hydra.run.dir="$OUT_DIR" "$@"
echo "outputs: $OUT_DIR"
