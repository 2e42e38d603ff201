#!/usr/bin/env bash
# The paper's study (arXiv 2512.01374) at laptop scale, about an hour on 2 CPU cores:
#   - cold start: 800 supervised steps of the tiny preset on chain_sum (~10 min);
#   - MiniRL at off-policiness N = 1, 4, 8 with routing replay none / R2 / R3;
#   - the on-policy objective ablation (N = 1, no replay): MiniRL without the IS
#     correction, MiniRL with length normalisation, GRPO;
#   - 2 seeds each: 24 runs of 48 gradient updates (mini-batch 8 prompts x 8 responses),
#     2 at a time (trainer and rollout server of a run take turns on one core).
# The rollout server runs bf16, the trainer fp32. One learning rate for every run.
# Interrupted? Run it again: finished runs are kept, the others resume.
# Tables and plots: $OUT/summary.md, summary.csv, runs.csv, plots/*.png (docs/study.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study_tiny}
PYTHON=${PYTHON:-python}

"$PYTHON" tools/study.py --out "$OUT" \
    --grid "objectives=minirl n=1,4,8 replay=none,r2,r3" \
    --grid "objectives=minirl_no_is,minirl_length_norm,grpo n=1 replay=none" \
    --seeds 1 2 --parallel "${PARALLEL:-2}" \
    --updates 48 --eval-every 8 --prompts-per-update 8 --group-size 8 \
    --max-new-tokens 6 --lr 5e-5 --coldstart-iters 800 "$@"
