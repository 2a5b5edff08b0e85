#!/usr/bin/env bash
# Submit one rlloop run (or a Hydra multirun sweep) to an EXISTING Ray cluster with `ray job submit`.
#
#   bash launch/submit.sh [options] [--] [hydra overrides...]
#
#   --address URL       the cluster's dashboard, e.g. http://head-node:8265 (default: $RAY_ADDRESS)
#   --working-dir DIR   code shipped to the cluster (default: this checkout; .venv, .git, outputs excluded)
#   --env NAME[=VALUE]  environment variable for the driver and every actor (repeatable); NAME alone copies
#                       this shell's value, e.g. --env WANDB_API_KEY --env WANDB_MODE=online
#   --exclude PATTERN   one more path the working dir leaves behind (repeatable)
#   --id ID             submission id (default rlloop-<time>-<pid>)
#   --no-wait           return after submitting (the default follows the logs and fails when the job fails)
#
# Examples:
#   bash launch/submit.sh --address http://10.0.0.1:8265 -- cluster=gpu_colocated model=smollm2 \
#       learner.world_size=8 rollout.num_workers=8 hydra.run.dir=/shared/runs/grpo-1
#   bash launch/submit.sh --address http://10.0.0.1:8265 -- -m reward.w_prm=0,0.2 trainer.seed=0,1,2
# The run folder is relative to the job's working dir on the head node (a temporary copy) unless
# hydra.run.dir / hydra.sweep.dir (multirun) / output_dir point at storage every node shares.
# Env: PYTHON (python of the cluster's nodes; default "python"), RAY (ray CLI here; default the venv's or PATH).
# Token auth (Ray >= 2.59): export RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or
# ~/.ray/auth_token) before calling; the local head of launch/local_job.sh runs without one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

ADDRESS=${RAY_ADDRESS:-}
WORKDIR=$ROOT
SID="rlloop-$(date +%Y%m%d-%H%M%S)-$$"
WAIT=1
ENVS=()
EXCLUDES=(".venv" ".venv-*" ".git" "outputs" "multirun" "wandb" "*.png" ".pytest_cache" ".hypothesis" ".ruff_cache")
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS=${2:?--address needs a URL}; shift 2 ;;
    --working-dir) WORKDIR=${2:?--working-dir needs a folder}; shift 2 ;;
    --env) ENVS+=("${2:?--env needs NAME or NAME=VALUE}"); shift 2 ;;
    --exclude) EXCLUDES+=("${2:?--exclude needs a pattern}"); shift 2 ;;
    --id) SID=${2:?--id needs a submission id}; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # the first Hydra override (or -m) starts the run's arguments
  esac
done
if [ -z "$ADDRESS" ]; then
  echo "error: no Ray cluster to submit to: pass --address http://<head>:8265 or set RAY_ADDRESS" >&2
  exit 2
fi
if [ ! -d "$WORKDIR" ]; then
  echo "error: --working-dir $WORKDIR is not a folder" >&2
  exit 2
fi
if [ -x "$ROOT/.venv/bin/ray" ]; then DEFAULT_RAY=$ROOT/.venv/bin/ray; else DEFAULT_RAY=ray; fi
RAY=${RAY:-$DEFAULT_RAY}
PYTHON=${PYTHON:-python}

# The runtime env as JSON, built by Python so that values with quotes or spaces survive.
RUNTIME_ENV=$(python3 - "${#ENVS[@]}" "${ENVS[@]}" "${EXCLUDES[@]}" <<'PY'
import json, os, sys
n = int(sys.argv[1]); envs, excludes = sys.argv[2:2 + n], sys.argv[2 + n:]
env_vars = {}
for item in envs:
    name, eq, value = item.partition("=")
    if not name.isidentifier():
        sys.exit(f"error: --env {item!r}: {name!r} is not a variable name")
    if not eq:
        if name not in os.environ:
            sys.exit(f"error: --env {name}: not set in this shell (pass --env {name}=VALUE)")
        value = os.environ[name]
    env_vars[name] = value
print(json.dumps({"env_vars": env_vars, "excludes": excludes}))
PY
)

# Right after `ray start` the head's job agent may not be registered yet ("No available agent to submit
# job"): retry only that error.
for attempt in $(seq 1 30); do
  if OUT=$("$RAY" job submit --no-wait --submission-id "$SID" --address "$ADDRESS" --working-dir "$WORKDIR" \
      --runtime-env-json "$RUNTIME_ENV" -- "$PYTHON" -m rlloop.train "$@" 2>&1); then
    break
  fi
  if ! grep -q "No available agent" <<<"$OUT" || [ "$attempt" = 30 ]; then
    echo "$OUT" >&2
    echo "error: ray job submit to $ADDRESS failed (attempt $attempt)" >&2
    exit 1
  fi
  sleep 2
done
echo "submitted $SID to $ADDRESS (attempt $attempt)"
if [ "$WAIT" = 0 ]; then
  echo "follow: $RAY job logs --follow --address $ADDRESS $SID"
  exit 0
fi
"$RAY" job logs --follow --address "$ADDRESS" "$SID"
STATUS=$("$RAY" job status --address "$ADDRESS" "$SID" 2>&1)
if ! grep -q "Job '$SID' succeeded" <<<"$STATUS"; then
  echo "$STATUS" | tail -n 5 >&2
  echo "error: job $SID did not succeed" >&2
  exit 1
fi
echo "job $SID succeeded"
