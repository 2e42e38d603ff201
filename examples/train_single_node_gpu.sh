#!/usr/bin/env bash
# One node of 8 GPUs: SGLang on GPUs 6-7 (TP 2, routed experts on, this machine only), the
# trainer on GPUs 0-5 (PP 3 x EP 2, DP 2). The first launch converts MODEL_HF into a
# megatron checkpoint in INIT; RL starts from it, and after every step the new weights go
# to SGLang over NCCL (--rl-weight-sync distributed).
#
# Memory: Qwen3-30B-A3B's weights, gradients and Adam state alone take about 88 GiB per
# trainer GPU here (DRY_RUN=1 prints the estimate), so this needs GPUs of 141 GB (H200,
# B200); on 80 GB GPUs use the multi-node recipe (examples/slurm/qwen3_30b_a3b.sbatch).
#
# Environment: MODEL_HF (HF checkpoint of the policy; tokenizer too), PROMPTS (.jsonl of
# {"prompt", "answer"}, or a reasoning-gym name), RUN, INIT, PORT=30000, REWARD
# (module:function), DRY_RUN=1 (print the plan; starts nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=examples/lib/rl_launch.sh
source examples/lib/rl_launch.sh

MODEL_HF=${MODEL_HF:?path to a Hugging Face Qwen3-MoE checkpoint}
PROMPTS=${PROMPTS:?a .jsonl file of prompts and answers (or a reasoning-gym dataset name)}
RUN=${RUN:-runs/single_node}
INIT=${INIT:-runs/qwen3_30b_a3b_init}
PRESET=qwen3-30b-a3b
PORT=${PORT:-30000}
WORLD=6  # read by rl_launch.sh

PARALLEL=(--pipeline-model-parallel-size 3 --expert-model-parallel-size 2)
TRAIN=(
    --model-preset "$PRESET" --tokenizer "$MODEL_HF" --bf16
    "${PARALLEL[@]}" --moe-token-dispatcher-type alltoall
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --use-distributed-optimizer
    --save "$RUN" --save-interval 20
    --rl-task "$PROMPTS"
    --rl-rollout-url "http://127.0.0.1:$PORT" --rl-rollout-startup-timeout 1800
    --rl-weight-sync distributed
    --rl-objective minirl --routing-replay r3 --rl-is-cap 5
    --rl-clip-low 0.2 --rl-clip-high 0.27
    --rl-group-size 16 --global-batch-size 1024 --rl-mini-batch-size 512
    --micro-batch-size 1 --rl-sequence-packing --seq-length 16384
    --rl-max-new-tokens 8192 --rl-temperature 1.0
    # Megatron-LM's defaults are not RL's: a constant 1e-6, Adam beta2 0.98.
    --lr 1e-6 --min-lr 1e-6 --lr-decay-style constant --lr-warmup-iters 0
    --adam-beta1 0.9 --adam-beta2 0.98 --weight-decay 0.1 --clip-grad 1.0
    --train-iters 200 --eval-interval 10 --log-interval 1
    --tensorboard-dir "$RUN/tensorboard"
)
if [[ -n "${REWARD:-}" ]]; then
  TRAIN+=(--rl-reward-function "$REWARD")
fi
LAUNCH=(torchrun --standalone --nproc-per-node "$WORLD")

if ! is_dry_run; then
  # Loads while the checkpoint converts; the trainer waits for /health before it starts.
  CUDA_VISIBLE_DEVICES=6,7 TP=2 examples/sglang_server.sh "$MODEL_HF" "$PORT" &
  SGLANG_PID=$!
  trap 'kill "$SGLANG_PID" 2>/dev/null || true' EXIT
  export CUDA_VISIBLE_DEVICES=0,1,2,3,4,5
fi
convert_if_needed "${LAUNCH[@]}"
train "${LAUNCH[@]}"
