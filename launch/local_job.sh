#!/usr/bin/env bash
# Start a local Ray head bound to 127.0.0.1, submit one rlloop run to it with launch/submit.sh (`ray job
# submit`), stop the head.
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

# A private temp dir and a session of its own mark this head's processes: at exit exactly they are stopped
# (`ray stop` would kill every Ray cluster on the machine, other users' and test sessions' included; a
# pattern on the temp dir alone misses the agents, whose command lines do not name it).
RAY_TMP=$(mktemp -d /tmp/rlloop-ray-XXXXXX)
RAY_SID=""
stop_head() {
  local own_sid
  own_sid=$(ps -o sid= -p $$ | tr -d ' ')
  [ -n "$RAY_SID" ] && [ "$RAY_SID" != "$own_sid" ] && pkill -TERM -s "$RAY_SID" 2>/dev/null
  pkill -TERM -f -- "$RAY_TMP" 2>/dev/null || true
  sleep 2
  [ -n "$RAY_SID" ] && [ "$RAY_SID" != "$own_sid" ] && pkill -KILL -s "$RAY_SID" 2>/dev/null
  pkill -KILL -f -- "$RAY_TMP" 2>/dev/null || true
  rm -rf "$RAY_TMP"
}
trap stop_head EXIT
# Every other port the head opens is a free one too: the defaults (client server 10001, agent 52365) are
# fixed, so a second Ray on the machine (a test session's, a leftover) would leave this head without a
# job agent ("No available agent to submit job").
read -r CLIENT_PORT AGENT_PORT AGENT_GRPC ENV_AGENT METRICS < <("$PYTHON" - <<'PY'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
setsid "$RAY" start --head --node-ip-address=127.0.0.1 --num-cpus="${NUM_CPUS:-2}" --port="$PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --disable-usage-stats --temp-dir="$RAY_TMP" \
  --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
  --dashboard-agent-grpc-port="$AGENT_GRPC" --runtime-env-agent-port="$ENV_AGENT" \
  --metrics-export-port="$METRICS" >/dev/null
RAY_SID=$(ps -o sid= -p "$(pgrep -f -- "$RAY_TMP" | head -n 1)" | tr -d ' ')

# Submit through launch/submit.sh (the same script as for a remote cluster): ships the working dir,
# retries while the fresh head's job agent registers, follows the logs, fails when the job fails.
echo "outputs: $OUT_DIR"
PYTHON="$PYTHON" RAY="$RAY" bash "$ROOT/launch/submit.sh" --address "http://127.0.0.1:$DASH" \
  --working-dir "$ROOT" -- hydra.run.dir="$OUT_DIR" "$@"
