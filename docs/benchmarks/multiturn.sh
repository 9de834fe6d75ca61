#!/usr/bin/env bash
# Multi-turn chats on CPU: N conversations x 4 turns, one image each, the whole history re-sent
# every turn (as chat UIs do), against DvD with its caches on, with the embedding cache only,
# and with both off (the router's default mode, auto), then with the caches on and `vir` off.
# Results land in docs/benchmarks/results/multiturn*.
#
#   bash docs/benchmarks/multiturn.sh          # about 15 minutes on 2 cores
#
# Needs the project's .venv. Ports: HTTP_PORT (8000), GRPC_PORT (50051), METRICS_PORT (9400).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=docs/benchmarks/results
MODEL=${MODEL:-$HOME/.cache/dvd/bench-internvl-flash}
HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-50051} METRICS_PORT=${METRICS_PORT:-9400}
CONVERSATIONS=${CONVERSATIONS:-8}
mkdir -p "$OUT"
export VLLM_CPU_KVCACHE_SPACE=2 TOKENIZERS_PARALLELISM=false

[ -f "$MODEL/config.json" ] || dvd-tiny-model "$MODEL" --preset bench --flash

# One image of 1-4 tiles (+ thumbnail) per conversation, half text-like regions, 32-word
# questions, 32 output tokens; one warm-up conversation; two conversations at a time.
WORKLOAD=(--model bench --dataset multi-turn --turns 4 --min-tiles 1 --max-tiles 4
          --dense-fraction 0.5 --prompt-len 32 --output-len 32 --ignore-eos
          --num-requests "$CONVERSATIONS" --warmup 1 --concurrency 2 --quiet)

pids=()
stop_all() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop_all EXIT
wait_http() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; echo "no $1"; exit 1; }

# DvD on shared cores (the vision service on 2 threads), with the given extra flags.
start_dvd() {  # $1: vision flags, $2: language flags
  # shellcheck disable=SC2086
  dvd-vision-server --model "$MODEL" --port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
    --torch-threads 2 --max-batch-tiles 16 $1 > "$OUT/vision.log" 2>&1 & pids+=($!)
  # shellcheck disable=SC2086
  dvd-llm-server --model "$MODEL" --served-model-name bench --port "$HTTP_PORT" \
    --vision-target "127.0.0.1:$GRPC_PORT" --enforce-eager $2 > "$OUT/llm-dvd.log" 2>&1 & pids+=($!)
  wait_http "http://127.0.0.1:$HTTP_PORT"
}

for mode in off vision_only on on_vir_off; do
  extra=()
  case $mode in
    on) start_dvd "" "" ;;
    on_vir_off) start_dvd "" ""; extra=(--extra-body '{"vir": "off"}') ;;
    vision_only) start_dvd "" "--no-prefix-caching" ;;
    off) start_dvd "--embedding-cache-mb 0" "--no-prefix-caching" ;;
  esac
  dvd-bench run --base-url "http://127.0.0.1:$HTTP_PORT" "${WORKLOAD[@]}" "${extra[@]}" \
    --label "cache $mode" --output "$OUT/multiturn-$mode.json"
  # What the vision service did: images served, encoded (cache misses) and tiles through the ViT.
  curl -s "http://127.0.0.1:$METRICS_PORT/metrics" \
    | grep -E '^dvd:vision_(images_total|embedding_cache_[a-z]+(_total)?|batch_tiles_(sum|count)) ' \
    > "$OUT/multiturn-$mode-metrics.txt" || true
  grep -E "prefix caching" "$OUT/llm-dvd.log" | tail -1 | sed 's/^.*: language/language/' \
    >> "$OUT/multiturn-$mode-metrics.txt" || true
  stop_all
done
dvd-bench compare "$OUT/multiturn-off.json" "$OUT/multiturn-vision_only.json" \
  "$OUT/multiturn-on.json" "$OUT/multiturn-on_vir_off.json" | tee "$OUT/multiturn.md"
