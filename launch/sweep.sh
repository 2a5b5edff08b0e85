#!/usr/bin/env bash
# Hydra multirun sweep: one rlloop run per combination of the comma-separated values, run one after the
# other in one driver (Hydra's basic launcher); each run gets <sweep dir>/<job number>/ with its metrics,
# config and checkpoints, and <sweep dir>/multirun.yaml records the sweep.
#
#   bash launch/sweep.sh                                    # w_prm x seed grid below, on this machine
#   bash launch/sweep.sh reward.w_prm=0,0.5 trainer.seed=0,1 model=tiny trainer.total_steps=5
#   bash launch/sweep.sh --address http://head:8265 -- reward.w_prm=0,0.2,0.4 trainer.seed=0,1,2
#                                                           # the whole sweep as ONE job on a Ray cluster
# Env: SWEEP_DIR (default multirun/<time>), PYTHON (default the venv's).
# The default grid is TDRM's w_prm ablation in miniature; with no trained PRM (reward.prm.path) V = 0.5
# everywhere and w_prm only shifts rewards, so give one for a meaningful sweep.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SWEEP_DIR=${SWEEP_DIR:-multirun/$(date +%Y%m%d-%H%M%S)}
DEFAULT_GRID=("reward.w_prm=0,0.2,0.4" "trainer.seed=0,1,2")

if [ "${1:-}" = --address ]; then
  address=${2:?--address needs the cluster dashboard URL}
  shift 2
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || set -- "${DEFAULT_GRID[@]}"
  exec bash "$ROOT/launch/submit.sh" --address "$address" -- -m hydra.sweep.dir="$SWEEP_DIR" "$@"
fi
[ $# -gt 0 ] || set -- "${DEFAULT_GRID[@]}"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
cd "$ROOT"
"$PYTHON" -m rlloop.train -m hydra.sweep.dir="$SWEEP_DIR" "$@"
echo "sweep: $SWEEP_DIR ($(find "$SWEEP_DIR" -mindepth 1 -maxdepth 1 -type d | wc -l) runs)"
