#!/usr/bin/env bash
# The headline panel of the paper's study (arXiv 2512.01374) at laptop scale, about an
# hour on 2 CPU cores (docs/study.md, "Dec 6"):
#   - cold start: the tiny preset on chain_sum, stopped at step 650 of an 800-step cosine
#     schedule (greedy held-out 0.930, sampled 0.777; ~9 min);
#   - FP8 rollouts (bf16 activations) against the fp32 trainer: the paper's
#     training-inference discrepancy (KL ~3e-3, ~1.4% of token-layer routes differ);
#   - MiniRL on-policy (N = 1, no replay) and off-policy (N = 8) with routing replay
#     none / R2 / R3, 3 seeds each: 12 runs of 96 gradient updates of 64 prompts x 8
#     responses, lr 1e-4, held-out greedy and sampled (avg@8) accuracy every 8 updates;
#     about 8 min a run, 2 at a time.
# Interrupted? Run it again: finished runs are kept, the others resume.
# Tables and plots: $OUT/summary.md, summary.csv, runs.csv, plots/*.png (one column per N).
# The full grid of issue 17 (4 objectives x N = 1, 2, 4, 8 x none / R2 / R3 x 3 seeds,
# 144 runs, about 9 hours here two at a time; all 144 are in docs/study/dec6_grid, and the
# README's study section gives the verdict per finding):
#   OUT=runs/study_full examples/study_tiny.sh \
#       --grid "objectives=minirl,minirl_no_is,minirl_length_norm,grpo n=1,2,4,8 replay=none,r2,r3"
# (a --grid given here replaces none of the two above: runs of every grid are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study_tiny}
PYTHON=${PYTHON:-python}

"$PYTHON" tools/study.py --out "$OUT" \
    --grid "objectives=minirl n=1 replay=none" \
    --grid "objectives=minirl n=8 replay=none,r2,r3" \
    --seeds 1 2 3 --parallel "${PARALLEL:-2}" \
    --coldstart-iters 650 --coldstart-decay-iters 800 \
    --prompts-per-update 64 --micro-batch-size 64 --lr 1e-4 --updates 96 --eval-every 8 \
    --rollout-quantization fp8 "$@"
