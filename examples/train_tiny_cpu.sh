#!/usr/bin/env bash
# The tiny preset on a laptop CPU: cold start, then MiniRL with rollout routing replay
# (R3) against the embedded SGLang-compatible server, EP=2 over 2 processes (gloo).
# `make demo` runs the same through examples/demo.py and prints the before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/tiny}
NPROC=${NPROC:-2}
COMMON=(--model-preset tiny --expert-model-parallel-size "$NPROC" --micro-batch-size 16
        --rl-eval-size 128 --eval-micro-batch-size 64 --seed 1234)

torchrun --nproc-per-node "$NPROC" pretrain_rl.py --stage sft "${COMMON[@]}" \
    --global-batch-size 64 --train-iters 400 --lr 2e-3 --lr-warmup-iters 10 \
    --eval-interval 100 --save "$RUN/coldstart"

torchrun --nproc-per-node "$NPROC" pretrain_rl.py --stage rl "${COMMON[@]}" \
    --load "$RUN/coldstart" --save "$RUN/rl" --save-interval 10 \
    --rl-objective minirl --routing-replay r3 \
    --rl-group-size 8 --global-batch-size 128 --rl-mini-batch-size 64 \
    --train-iters 40 --lr 2e-4 --lr-decay-style constant --clip-grad 1.0 \
    --rl-max-new-tokens 6 --rl-temperature 1.0 --eval-interval 10
