#!/usr/bin/env bash
# A fleet of N vision replicas behind one language service, on CPU (the bench preset with the
# router). Results land in docs/benchmarks/results/fleet-*.
#
#   bash docs/benchmarks/fleet.sh multiturn   # N = 1, 2, 4 (affinity), N = 4 (round robin)
#   bash docs/benchmarks/fleet.sh mix         # 1-13-tile images at saturation, 3 replicas
#   bash docs/benchmarks/fleet.sh failover    # one of 3 replicas SIGKILLed under load
#
# The replicas listen on 127.0.0.1 at GRPC_PORT, GRPC_PORT+1, ... and the language service
# names them as a static list (ipv4:...), as a headless Service's DNS answer would.
# Needs the project's .venv. Ports: HTTP_PORT (8390), GRPC_PORT (50390), METRICS_PORT (9390).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=docs/benchmarks/results
MODEL=${MODEL:-$HOME/.cache/dvd/bench-internvl-flash}
HTTP_PORT=${HTTP_PORT:-8390} GRPC_PORT=${GRPC_PORT:-50390} METRICS_PORT=${METRICS_PORT:-9390}
CONVERSATIONS=${CONVERSATIONS:-8}
PART=${1:-multiturn}
ROUND=${ROUND:-}  # a suffix for the result files of a repeated run (e.g. ROUND=-2)
mkdir -p "$OUT"
export VLLM_CPU_KVCACHE_SPACE=2 TOKENIZERS_PARALLELISM=false

[ -f "$MODEL/config.json" ] || dvd-tiny-model "$MODEL" --preset bench --flash

pids=()
vision_pids=()
stop_all() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); vision_pids=(); }
trap stop_all EXIT
wait_http() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; echo "no $1"; exit 1; }

# N vision replicas (1 torch thread each: N replicas share the 2 cores) and a language service
# that places calls on them with the given --vision-balancing.
start_fleet() {  # $1: replicas, $2: balancing
  local target="ipv4:" i
  for i in $(seq 0 $(($1 - 1))); do
    dvd-vision-server --model "$MODEL" --port $((GRPC_PORT + i)) \
      --metrics-port $((METRICS_PORT + i)) --torch-threads 1 --max-batch-tiles 16 \
      > "$OUT/fleet-vision-$i.log" 2>&1 & pids+=($!); vision_pids+=($!)
    target+="127.0.0.1:$((GRPC_PORT + i)),"
  done
  dvd-llm-server --model "$MODEL" --served-model-name bench --port "$HTTP_PORT" \
    --vision-target "${target%,}" --vision-balancing "$2" --enforce-eager \
    > "$OUT/fleet-llm.log" 2>&1 & pids+=($!)
  wait_http "http://127.0.0.1:$HTTP_PORT"
}

# Across the fleet: images served, images encoded (cache misses), cache hits, tiles through
# the ViT; then the language service's placement counters.
fleet_metrics() {  # $1: replicas, $2: output file
  local i
  for i in $(seq 0 $(($1 - 1))); do
    curl -s "http://127.0.0.1:$((METRICS_PORT + i))/metrics" \
      | grep -E '^dvd:vision_(images_total|embedding_cache_(hits|misses)_total|batch_tiles_sum) ' \
      | sed "s/^/replica $i: /" || true
  done > "$2"
  curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E '^dvd:fleet_' | grep -v _created \
    >> "$2" || true
}

case $PART in
multiturn)
  # The section 7 workload: one image of 1-4 tiles per conversation, 4 turns, the history
  # re-sent every turn, both caches on (the defaults).
  WORKLOAD=(--model bench --dataset multi-turn --turns 4 --min-tiles 1 --max-tiles 4
            --dense-fraction 0.5 --prompt-len 32 --output-len 32 --ignore-eos
            --num-requests "$CONVERSATIONS" --warmup 1 --concurrency 2 --quiet)
  for run in ${RUNS:-1:affinity 2:affinity 4:affinity 4:round_robin}; do
    n=${run%%:*} balancing=${run#*:}
    start_fleet "$n" "$balancing"
    dvd-bench run --base-url "http://127.0.0.1:$HTTP_PORT" "${WORKLOAD[@]}" \
      --label "$n replicas, $balancing" --output "$OUT/fleet-multiturn-$n-$balancing.json"
    fleet_metrics "$n" "$OUT/fleet-multiturn-$n-$balancing-metrics.txt"
    stop_all
  done
  dvd-bench compare "$OUT"/fleet-multiturn-{1-affinity,2-affinity,4-affinity,4-round_robin}.json \
    | tee "$OUT/fleet-multiturn.md"
  ;;
mix)
  # Single-image requests of 1 to 13 tiles (max_tiles 12 + thumbnail), every image new (no
  # cache hits), so only where the tiles go differs. Saturation: more requests in flight than
  # 3 replicas on 2 cores can encode at once.
  WORKLOAD=(--model bench --dataset synthetic --min-tiles 1 --max-tiles 13
            --dense-fraction 0.5 --prompt-len 32 --output-len 8 --ignore-eos
            --num-requests 60 --warmup 4 --concurrency 8 --quiet)
  for balancing in affinity round_robin; do
    start_fleet 3 "$balancing"
    dvd-bench run --base-url "http://127.0.0.1:$HTTP_PORT" "${WORKLOAD[@]}" \
      --label "3 replicas, $balancing" --output "$OUT/fleet-mix-$balancing$ROUND.json"
    fleet_metrics 3 "$OUT/fleet-mix-$balancing$ROUND-metrics.txt"
    stop_all
  done
  dvd-bench compare "$OUT"/fleet-mix-{affinity,round_robin}"$ROUND".json \
    | tee "$OUT/fleet-mix$ROUND.md"
  ;;
failover)
  # Steady load on 3 replicas; 20 s in, one replica is SIGKILLed. Every response's status is
  # in the results; the latency percentiles cover the whole run, and the script reports the
  # requests in flight at the kill or started in the 10 s after it apart.
  start_fleet 3 affinity
  WORKLOAD=(--model bench --dataset synthetic --min-tiles 1 --max-tiles 4
            --dense-fraction 0.5 --prompt-len 32 --output-len 8 --ignore-eos
            --num-requests 80 --warmup 2 --concurrency 4 --quiet)
  dvd-bench run --base-url "http://127.0.0.1:$HTTP_PORT" "${WORKLOAD[@]}" \
    --label "3 replicas, one SIGKILLed" --output "$OUT/fleet-failover.json" & bench=$!
  sleep 20
  kill -KILL "${vision_pids[0]}"
  killed_at=$(date +%s.%N)
  echo "SIGKILLed vision replica 0 (pid ${vision_pids[0]}) at $(date -u +%T)"
  wait "$bench"
  python - "$OUT/fleet-failover.json" "$killed_at" <<'PY' | tee "$OUT/fleet-failover-window.txt"
import datetime, json, sys
run = json.load(open(sys.argv[1]))
# The run's origin (first measured request): its end (date, written when it finished) less
# its duration; to about a second.
ended = datetime.datetime.strptime(run["date"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
kill = float(sys.argv[2]) - (ended - run["metrics"]["duration_s"])
requests = run["requests"]
window = [r for r in requests if r["started_s"] <= kill + 10 and r["started_s"] + r["e2el_s"] >= kill]
def p99(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else float("nan")
print(f"kill at {kill:.1f} s into the measured run; {len(requests)} requests, "
      f"{sum(not r['success'] for r in requests)} failed ({[r['error'] for r in requests if not r['success']][:3]})")
print(f"in flight at the kill or started within 10 s after it: {len(window)} requests, "
      f"{sum(not r['success'] for r in window)} failed, "
      f"E2E p99 {1000 * p99([r['e2el_s'] for r in window]):.0f} ms, "
      f"TTFT p99 {1000 * p99([r['ttft_s'] for r in window if r['success']]):.0f} ms")
others = [r for r in requests if r not in window]
print(f"the other {len(others)} requests: E2E p99 {1000 * p99([r['e2el_s'] for r in others]):.0f} ms, "
      f"TTFT p99 {1000 * p99([r['ttft_s'] for r in others if r['success']]):.0f} ms")
PY
  fleet_metrics 3 "$OUT/fleet-failover-metrics.txt"
  grep -E "unreachable|retrying" "$OUT/fleet-llm.log" | tail -5 >> "$OUT/fleet-failover-metrics.txt" || true
  stop_all
  dvd-bench compare "$OUT/fleet-failover.json" | tee "$OUT/fleet-failover.md"
  ;;
*) echo "usage: $0 multiturn|mix|failover"; exit 2 ;;
esac
