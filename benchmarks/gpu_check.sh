#!/usr/bin/env bash
# One-shot GPU figures for rlloop (issue 23): one `gpu_check: ...` line per figure, in about 5 minutes.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine, from the repository root
#
# Figures, for a SmolLM2-135M-shaped and a Qwen2.5-0.5B-shaped random-init model (benchmarks/gpu_check.py):
#   learner_step  one GRPO update on CUDA (PolicyLearner, DeepSpeed ZeRO-2 world size 1, bf16), per
#                 learner.batching arm (padded | sorted | packed), 32 rows with RL-like response lengths,
#                 4 prompts x 8 responses (packed computes each prompt once)
#   hf_engine     HFEngine.generate tokens/s (bf16, 32 prompts x 4 samples x 128 new tokens)
#   prm_scoring   PRMScorer.score trajectories/s and tokens/s (256 trajectories of 8 steps)
#   transport     the weights as one bucket to 2 receiver processes: shm, collective over gloo, collective
#                 over NCCL (one GPU: NCCL refuses two ranks on one device; reported as unavailable with
#                 its reason), CUDA IPC
#
# The GPU machine has torch and transformers but not DeepSpeed, Hydra/OmegaConf or Ray. Their wheels
# (about 5 MiB, pure Python but pydantic-core, cp312) travel in .whl/, made on this machine with:
#   pip wheel --no-deps -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5
# and are installed into /tmp/site (nothing else is installed). No Ray there, so no figure uses it.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-290}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "gpu_check: setup status=FAILED what=wheels"
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
$PY - <<'EOF' || echo "gpu_check: setup status=FAILED what=imports"
import torch, transformers
print(f"gpu_check: setup torch={torch.__version__} transformers={transformers.__version__} "
      f"cuda={torch.cuda.is_available()} device={torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
import deepspeed, hydra, omegaconf  # noqa: F401  (the learner's imports)
EOF

run() {  # run <timeout s> <figure> <model> [gpu_check.py options]: one figure, bounded, skipped past the budget
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 20 )); then echo "gpu_check: $2 model=$3 status=skipped_budget"; return; fi
    local limit=$(( $1 < left ? $1 : left ))
    timeout "$limit" $PY benchmarks/gpu_check.py "$2" --model "$3" --device "$DEVICE" "${@:4}" 2>/tmp/gpu_check_$2_$3.err \
        | grep -E '^(gpu_check:|#)' || echo "gpu_check: $2 model=$3 status=FAILED_or_timeout_${limit}s"
    [ "${PIPESTATUS[0]}" = 0 ] || tail -3 /tmp/gpu_check_$2_$3.err | sed 's/^/#   /'
}

DEVICE=${GPU_CHECK_DEVICE:-cuda}  # cpu + GPU_CHECK_MODELS=tiny: a smoke test of this script on a CPU machine
for model in ${GPU_CHECK_MODELS:-smollm2-shape qwen0.5b-shape}; do
    run 60 build "$model"  # random init + save, once (cached in /tmp/rlloop_gpu_check)
    run 70 learner "$model" --group 8  # GRPO groups: 4 prompts x 8 responses (packed shares each prompt)
    run 45 engine "$model"
    run 45 prm "$model"
    run 70 transports "$model"
done
echo "# gpu_check done in $(( $(date +%s) - START )) s"
