#!/usr/bin/env bash
# One 8-GPU node: SGLang on GPUs 6-7 (routed experts on), the trainer on GPUs 0-5.
# Converts the checkpoint for SGLang first; weights are synced back after every step.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_HF=${MODEL_HF:?path to a Hugging Face Qwen3-MoE checkpoint}
RUN=${RUN:-runs/single_node}
PORT=${PORT:-30000}

CUDA_VISIBLE_DEVICES=6,7 python -m sglang.launch_server --model-path "$MODEL_HF" \
    --tp 2 --port "$PORT" --host 127.0.0.1 --enable-return-routed-experts \
    --mem-fraction-static 0.8 &
SGLANG_PID=$!
trap 'kill $SGLANG_PID' EXIT

CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 torchrun --nproc-per-node 6 pretrain_rl.py \
    --model-preset qwen3-30b-a3b --tokenizer "$MODEL_HF" --bf16 \
    --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 6 \
    --moe-token-dispatcher-type alltoall \
    --load "$RUN/init" --save "$RUN/rl" --save-interval 20 \
    --rl-rollout-url "http://127.0.0.1:$PORT" \
    --rl-objective minirl --routing-replay r3 --rl-is-cap 5 \
    --rl-clip-low 0.2 --rl-clip-high 0.27 \
    --rl-group-size 16 --global-batch-size 1024 --rl-mini-batch-size 512 \
    --micro-batch-size 1 --rl-sequence-packing --seq-length 16384 \
    --rl-max-new-tokens 8192 --lr 1e-6 --lr-decay-style constant --train-iters 200
