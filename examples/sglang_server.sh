#!/usr/bin/env bash
# Start a real SGLang server that returns routed experts, for megatron_rl's rollout client.
#
#   examples/sglang_server.sh MODEL_DIR [PORT] [extra sglang.launch_server arguments...]
#
#   MODEL_DIR  a Hugging Face Qwen3-MoE checkpoint directory: config.json, *.safetensors and
#              tokenizer files, e.g. the cold-started policy, or one written by
#              tools/convert_checkpoint.py to-hf. The trainer must be able to read the same
#              path: it checks the served model against its own from MODEL_DIR/config.json,
#              and disk weight sync sends paths of new checkpoints (under the trainer's
#              --save) through /update_weights_from_disk.
#   PORT       default 30000.
#
# Environment:
#   HOST=0.0.0.0          address to listen on (default 127.0.0.1: this machine only). Any
#                         other address needs API_KEY (or ALLOW_NO_API_KEY=1): the server
#                         takes weight updates from whoever can reach it.
#   API_KEY=...           require 'Authorization: Bearer <key>' on every endpoint. Handed to
#                         SGLang in a private YAML file (--config), so it never shows in `ps`.
#                         Give the trainer the same key through MEGATRON_RL_ROLLOUT_API_KEY
#                         or --rl-rollout-api-key-file (mode 600), not on its command line.
#   TP=1, DP=1            tensor parallel size (--tp-size), data-parallel replicas (--dp-size).
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
# - Behind sglang-router, generation goes through the router and weight updates to each
#   server (the router does not forward them): the trainer's --rl-rollout-worker-urls.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 1
fi
MODEL_DIR=$1
PORT=${2:-30000}
shift $(( $# >= 2 ? 2 : 1 ))
HOST=${HOST:-127.0.0.1}

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "error: $MODEL_DIR has no config.json (not a Hugging Face checkpoint directory)" >&2
  exit 1
fi

args=(
  --model-path "$MODEL_DIR"
  --host "$HOST"
  --port "$PORT"
  --tp-size "${TP:-1}"
  --dp-size "${DP:-1}"
  --mem-fraction-static "${MEM_FRACTION:-0.8}"
  --enable-return-routed-experts
)
if [[ -n "${API_KEY:-}" ]]; then
  # A command-line --api-key would be readable by every user of the node through `ps`;
  # SGLang's --config YAML file is read once at start-up, from a directory only we can read.
  private=$(mktemp -d "${TMPDIR:-/tmp}/sglang_server.XXXXXX")
  trap 'rm -rf "$private"' EXIT
  (umask 077 && printf "api_key: '%s'\n" "${API_KEY//\'/\'\'}" > "$private/server.yaml")
  args+=(--config "$private/server.yaml")
else
  case "$HOST" in
    127.*|localhost|::1) ;;
    *)
      if [[ "${ALLOW_NO_API_KEY:-0}" != "1" ]]; then
        echo "error: HOST=$HOST without API_KEY: anyone who reaches this port could load" \
             "weights into the server. Set API_KEY (and pass it to the trainer), or" \
             "ALLOW_NO_API_KEY=1 on a network only you use" >&2
        exit 1
      fi
      ;;
  esac
fi
if [[ "${ORIGINAL_LOGPROB:-0}" == "1" ]]; then
  export SGLANG_RETURN_ORIGINAL_LOGPROB=1
fi

# Not exec: this shell stays to remove the key file when the server exits, and passes a
# stop request (kill, Ctrl-C, the end of a SLURM job) on to the server.
python -m sglang.launch_server "${args[@]}" "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null' TERM INT HUP
status=0
wait "$server" || status=$?
if kill -0 "$server" 2>/dev/null; then  # a signal ended the first wait: let it shut down
  status=0
  wait "$server" || status=$?
fi
exit "$status"
