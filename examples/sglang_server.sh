#!/usr/bin/env bash
# Start a real SGLang server that returns routed experts, for megatron_rl's rollout client.
#
#   examples/sglang_server.sh MODEL_DIR [PORT] [extra sglang.launch_server arguments...]
#
#   MODEL_DIR  a Hugging Face Qwen3-MoE checkpoint directory: config.json, *.safetensors and
#              tokenizer files, e.g. one written by megatron_rl's megatron -> HF converter
#              (tools/), or by megatron_rl.weight_sync.hf_config.save_random_checkpoint.
#              The trainer must be able to read the same path: it checks the served model
#              against its own from MODEL_DIR/config.json, and weight sync sends paths of
#              new checkpoints through /update_weights_from_disk.
#   PORT       default 30000.
#
# Environment:
#   HOST=0.0.0.0          address to listen on (default 127.0.0.1: this machine only).
#   TP=1                  tensor parallel size (--tp-size).
#   API_KEY=...           require 'Authorization: Bearer <key>' (pass the same key to the
#                         trainer with --rl-rollout-api-key).
#   MEM_FRACTION=0.8      --mem-fraction-static (lower it when the trainer shares the GPUs).
#   ORIGINAL_LOGPROB=1    report logprobs at temperature 1 instead of SGLang's default
#                         log softmax(logits / temperature) (SGLANG_RETURN_ORIGINAL_LOGPROB).
#   Reproducible sampling: SGLang ignores the trainer's per-sample sampling_seed unless it
#                         runs with --enable-deterministic-inference (pass it after PORT);
#                         without it a retried or re-run request samples other tokens.
#
# Then, e.g.:  python pretrain_rl.py ... --rl-rollout-url http://HOST:PORT
#
# Notes for routing replay (R3):
# - --enable-return-routed-experts is required; the client refuses servers that do not
#   return routes (it probes at start-up).
# - Routed experts are stored per KV-cache slot: a prefix-cache hit returns the routes of
#   the pass that filled the slot. The trainer flushes the cache with every weight update
#   (flush_cache=true); --disable-radix-cache removes the reuse entirely.
# - Keep expert parallel load balancing (EPLB / redundant experts) off: with it the ids can
#   be physical rather than logical experts.
# - Behind sglang-router, make sure the router forwards return_routed_experts.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 1
fi
MODEL_DIR=$1
PORT=${2:-30000}
shift $(( $# >= 2 ? 2 : 1 ))

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "error: $MODEL_DIR has no config.json (not a Hugging Face checkpoint directory)" >&2
  exit 1
fi

args=(
  --model-path "$MODEL_DIR"
  --host "${HOST:-127.0.0.1}"
  --port "$PORT"
  --tp-size "${TP:-1}"
  --mem-fraction-static "${MEM_FRACTION:-0.8}"
  --enable-return-routed-experts
)
if [[ -n "${API_KEY:-}" ]]; then
  args+=(--api-key "$API_KEY")
fi
if [[ "${ORIGINAL_LOGPROB:-0}" == "1" ]]; then
  export SGLANG_RETURN_ORIGINAL_LOGPROB=1
fi

exec python -m sglang.launch_server "${args[@]}" "$@"
