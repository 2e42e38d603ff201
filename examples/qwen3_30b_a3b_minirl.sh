#!/usr/bin/env bash
# The paper's setting for Qwen3-30B-A3B (arXiv 2512.01374): MiniRL, B = 64 prompts x
# G = 16 responses per mini-batch (1,024 responses), N = global / mini-batch gradient
# updates per rollout batch (N in {1, 2, 4, 8}), eps_low 0.2 / eps_high 0.27, IS cap 5,
# bf16 training, up to 32,768 generated tokens. R2 for N = 2, R3 for N >= 4 (paper).
# Launched by examples/slurm/qwen3_30b_a3b.sbatch on each trainer node.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4}
REPLAY=${REPLAY:-$([ "$N" -ge 4 ] && echo r3 || echo r2)}
ROLLOUT_URL=${ROLLOUT_URL:?sglang-router URL, e.g. http://rollout-head:30000}
MODEL_HF=${MODEL_HF:?HF checkpoint dir of the cold-started policy (tokenizer too)}
RUN=${RUN:-runs/qwen3_30b_a3b_N${N}_${REPLAY}}

torchrun --nnodes "${NNODES:-4}" --nproc-per-node 8 --rdzv-backend c10d \
    --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv-id "${SLURM_JOB_ID:-rl}" \
    pretrain_rl.py \
    --model-preset qwen3-30b-a3b --tokenizer "$MODEL_HF" --bf16 \
    --tensor-model-parallel-size 2 --sequence-parallel \
    --pipeline-model-parallel-size 2 --expert-model-parallel-size 8 \
    --context-parallel-size 2 --moe-token-dispatcher-type alltoall \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    --use-distributed-optimizer \
    --load "$RUN" --save "$RUN" --save-interval 10 \
    --rl-rollout-url "$ROLLOUT_URL" --rl-rollout-concurrency 1024 \
    --rl-objective minirl --routing-replay "$REPLAY" --rl-is-cap 5 \
    --rl-clip-low 0.2 --rl-clip-high 0.27 \
    --rl-group-size 16 --rl-mini-batch-size 1024 --global-batch-size $((1024 * N)) \
    --micro-batch-size 1 --rl-sequence-packing --seq-length 34816 \
    --rl-max-new-tokens 32768 --rl-temperature 1.0 \
    --lr 1e-6 --min-lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --clip-grad 1.0 \
    --train-iters 500 --eval-interval 10 \
    --tensorboard-dir "$RUN/tensorboard" --wandb-project megatron_rl \
    --wandb-exp-name "qwen3-30b-a3b-minirl-N${N}-${REPLAY}"
