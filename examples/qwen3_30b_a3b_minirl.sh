#!/usr/bin/env bash
# The paper's setting for Qwen3-30B-A3B (arXiv 2512.01374): MiniRL, B = 64 prompts x
# G = 16 responses per mini-batch (1,024 responses), N = global / mini-batch gradient
# updates per rollout batch (N in {1, 2, 4, 8}), eps_low 0.2 / eps_high 0.27, IS cap 5,
# bf16 training, up to 32,768 generated tokens. R2 for N = 2, R3 for N >= 4 (paper).
#
# The trainer side, on NNODES nodes of 8 GPUs (default 4: TP 2 x PP 2 x EP 8, DP 8). Run
# on every trainer node (examples/slurm/qwen3_30b_a3b.sbatch does, with srun). It starts
# from MODEL_HF: the first launch converts it into a megatron checkpoint in INIT (once,
# at this layout), every launch after that starts from INIT or resumes RUN.
#
# Environment (paths first):
#   MODEL_HF             HF checkpoint of the cold-started policy (also the tokenizer, and
#                        what the rollout servers serve at the start)
#   PROMPTS              .jsonl of {"prompt": ..., "answer": ...} (or a reasoning-gym name)
#   RUN, INIT            checkpoints of this run / the conversion of MODEL_HF
#   ROLLOUT_URL          the sglang-router, or the SGLang servers (space-separated)
#   ROLLOUT_WORKER_URLS  the SGLang servers behind the router, space-separated: weight
#                        updates and health checks go to each (the router forwards neither);
#                        /generate goes to the router with r2/none, to them with r3
#   ROLLOUT_API_KEY      the servers' API key, if they have one (handed to the trainer as
#                        MEGATRON_RL_ROLLOUT_API_KEY, never on its command line)
#   N=4, REPLAY          off-policiness and routing replay (default r3 for N >= 4, else r2)
#   REWARD               module:function(response, item) -> float (default: the task's
#                        own scorer; a JSONL task scores exact matches)
#   WEIGHT_SYNC          distributed (NCCL from trainer rank 0; the default) or disk
#   NNODES=4, CP=1, MASTER_ADDR, MASTER_PORT=29500
#   DRY_RUN=1            print the plan (one CPU process: no GPU, no server contacted)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=examples/lib/rl_launch.sh
source examples/lib/rl_launch.sh

N=${N:-4}
REPLAY=${REPLAY:-$([ "$N" -ge 4 ] && echo r3 || echo r2)}
MODEL_HF=${MODEL_HF:?HF checkpoint dir of the cold-started policy (tokenizer too)}
PROMPTS=${PROMPTS:?a .jsonl file of prompts and answers (or a reasoning-gym dataset name)}
ROLLOUT_URL=${ROLLOUT_URL:?the sglang-router URL, e.g. http://rollout-0:30100, or the servers}
read -r -a WORKER_URLS <<< "${ROLLOUT_WORKER_URLS:-}"
RUN=${RUN:-runs/qwen3_30b_a3b_N${N}_${REPLAY}}
INIT=${INIT:-runs/qwen3_30b_a3b_init}
PRESET=qwen3-30b-a3b
NNODES=${NNODES:-4}
WORLD=$((NNODES * 8))  # read by rl_launch.sh
MASTER_PORT=${MASTER_PORT:-29500}

PARALLEL=(--tensor-model-parallel-size 2 --sequence-parallel
          --pipeline-model-parallel-size 2 --expert-model-parallel-size 8
          --context-parallel-size "${CP:-1}")
TRAIN=(
    --model-preset "$PRESET" --tokenizer "$MODEL_HF" --bf16
    "${PARALLEL[@]}" --moe-token-dispatcher-type alltoall
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --use-distributed-optimizer
    --save "$RUN" --save-interval 10
    --rl-task "$PROMPTS"
    --rl-rollout-concurrency 1024
    --rl-rollout-startup-timeout 1800
    --rl-weight-sync "${WEIGHT_SYNC:-distributed}"
    --rl-objective minirl --routing-replay "$REPLAY" --rl-is-cap 5
    --rl-clip-low 0.2 --rl-clip-high 0.27
    --rl-group-size 16 --rl-mini-batch-size 1024 --global-batch-size $((1024 * N))
    --micro-batch-size 1 --rl-sequence-packing --seq-length 34816
    --rl-max-new-tokens 32768 --rl-temperature 1.0
    # Megatron-LM's defaults are not RL's: a constant 1e-6, Adam beta2 0.98.
    --lr 1e-6 --min-lr 1e-6 --lr-decay-style constant --lr-warmup-iters 0
    --adam-beta1 0.9 --adam-beta2 0.98 --weight-decay 0.1 --clip-grad 1.0
    --train-iters 500 --eval-interval 10 --log-interval 1
    --tensorboard-dir "$RUN/tensorboard" --wandb-project megatron_rl
    --wandb-exp-name "qwen3-30b-a3b-minirl-N${N}-${REPLAY}"
)
# sglang-router 0.3.2 drops return_routed_experts from the requests it forwards, so R3 (and
# the trainer-inference router agreement metric) cannot go through it: with r3 the trainer
# sends /generate to the servers itself and balances them; r2 and none use the router.
if [[ ${#WORKER_URLS[@]} -eq 0 ]]; then
  read -r -a GENERATE_URLS <<< "$ROLLOUT_URL"
  TRAIN+=(--rl-rollout-url "${GENERATE_URLS[@]}")
elif [[ "$REPLAY" == r3 ]]; then
  TRAIN+=(--rl-rollout-url "${WORKER_URLS[@]}")
else
  TRAIN+=(--rl-rollout-url "$ROLLOUT_URL" --rl-rollout-worker-urls "${WORKER_URLS[@]}"
          --no-rl-router-agreement)
fi
if [[ -n "${REWARD:-}" ]]; then
  TRAIN+=(--rl-reward-function "$REWARD")
fi
if [[ -n "${ROLLOUT_API_KEY:-}" ]]; then
  # The environment, not --rl-rollout-api-key: `ps` shows a command line to every user of
  # the node, a process's environment only to its owner.
  export MEGATRON_RL_ROLLOUT_API_KEY="$ROLLOUT_API_KEY"
fi

# One rendezvous port each for the conversion and the training launch: the conversion's
# store may still be closing on the first node when the training's starts.
launcher() {
  if ! is_dry_run; then
    : "${MASTER_ADDR:?the first trainer node (SLURM: the sbatch script sets it)}"
  fi
  LAUNCH=(torchrun --nnodes "$NNODES" --nproc-per-node 8 --rdzv-backend c10d
          --rdzv-endpoint "${MASTER_ADDR:-MASTER_ADDR}:$1" --rdzv-id "${SLURM_JOB_ID:-rl}-$1")
}
launcher $((MASTER_PORT + 1))
convert_if_needed "${LAUNCH[@]}"
launcher "$MASTER_PORT"
train "${LAUNCH[@]}"
