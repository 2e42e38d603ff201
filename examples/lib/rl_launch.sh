# shellcheck shell=bash
# Sourced by the GPU examples (not run by itself): start RL from the user's Hugging Face
# checkpoint, and DRY_RUN=1, which prints the plan instead of launching anything.
#
# The sourcing script sets, before calling these functions:
#   MODEL_HF   the Hugging Face checkpoint of the policy to start from (tokenizer too)
#   INIT       where its megatron conversion goes (kept: later runs start from it directly)
#   RUN        the run's --save directory (a run that already saved resumes from it)
#   PRESET     the --model-preset matching MODEL_HF
#   PARALLEL   array: the layout flags (TP/SP/PP/EP/CP), used by conversion and training
#   TRAIN      array: every pretrain_rl.py flag but --load
#   WORLD      processes of the training launch (the dry run checks the layout against it)
#
# DRY_RUN=1 runs `pretrain_rl.py --dry-run` (one CPU process, no GPU, no server): every
# start-up check of the real launch, then the plan (process groups, memory per GPU, tokens
# per step). Cheap enough for a login node, before a job waits in the queue.

# The tracker file training/checkpoint.py writes last: a directory with it holds a
# complete checkpoint.
has_checkpoint() {
  [[ -f "$1/latest_checkpointed_iteration.txt" ]]
}

is_dry_run() {
  [[ "${DRY_RUN:-0}" == "1" ]]
}

# convert_if_needed LAUNCHER...: the HF checkpoint -> a megatron checkpoint in $INIT, unless
# $INIT or $RUN already holds one. Runs under the given launcher (torchrun ...) at the
# training layout; any layout would do, since megatron checkpoints reshard on load.
convert_if_needed() {
  if has_checkpoint "$RUN" || has_checkpoint "$INIT"; then
    return 0
  fi
  if [[ ! -f "$MODEL_HF/config.json" ]]; then
    echo "error: MODEL_HF=$MODEL_HF has no config.json (not a Hugging Face checkpoint)" >&2
    return 1
  fi
  local convert=("$@" tools/convert_checkpoint.py to-megatron --hf "$MODEL_HF" --save "$INIT"
                 --model-preset "$PRESET" "${PARALLEL[@]}")
  if is_dry_run; then
    echo "dry run: $INIT holds no checkpoint yet; the launch first converts $MODEL_HF:" >&2
    echo "  ${convert[*]}" >&2
    return 0
  fi
  echo "converting $MODEL_HF -> $INIT (megatron checkpoint; done once)" >&2
  "${convert[@]}"
}

# train LAUNCHER...: pretrain_rl.py with $TRAIN, starting from $INIT (or resuming $RUN).
train() {
  if is_dry_run; then
    local start=(--load "$INIT")
    if ! has_checkpoint "$RUN" && ! has_checkpoint "$INIT"; then
      # The real launch converts first; until then --load would be refused as empty.
      echo "dry run: checking the training launch with --rl-allow-random-init in place of" \
           "--load $INIT (it exists once the conversion above has run)" >&2
      start=(--rl-allow-random-init)
    fi
    "${PYTHON:-python}" pretrain_rl.py --dry-run --world-size "$WORLD" "${TRAIN[@]}" "${start[@]}"
    return
  fi
  "$@" pretrain_rl.py "${TRAIN[@]}" --load "$INIT"
}
