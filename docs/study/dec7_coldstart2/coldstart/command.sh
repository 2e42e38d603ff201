#!/usr/bin/env bash
# coldstart
cd /work/study_wt
MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false /work/study_wt/.venv/bin/python /work/study_wt/pretrain_rl.py --stage sft --model-preset tiny --load /work/runs/dec7_cs2/coldstart --save /work/runs/dec7_cs2/coldstart --train-iters 650 --global-batch-size 64 --micro-batch-size 32 --lr 0.002 --lr-decay-style cosine --adam-beta2 0.95 --lr-decay-iters 800 --lr-warmup-iters 10 --eval-interval 162 --save-interval 162 --rl-eval-size 128 --rl-eval-seed 2000003 --seed 4321 --no-progress
