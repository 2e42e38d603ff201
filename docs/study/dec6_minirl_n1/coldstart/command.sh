#!/usr/bin/env bash
# coldstart
cd /work/main
MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false /work/main/.venv/bin/python /work/main/pretrain_rl.py --stage sft --model-preset tiny --load /tmp/p17/item2/coldstart --save /tmp/p17/item2/coldstart --train-iters 650 --global-batch-size 64 --micro-batch-size 32 --lr 0.002 --lr-decay-style cosine --adam-beta2 0.95 --lr-decay-iters 800 --lr-warmup-iters 10 --eval-interval 162 --save-interval 162 --rl-eval-size 128 --rl-eval-seed 2000003 --seed 1234 --no-progress
