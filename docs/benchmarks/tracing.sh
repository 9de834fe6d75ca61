#!/usr/bin/env bash
# Tracing off vs on (100% sampling, exported over OTLP/HTTP to a local receiver), side by side:
# dvd-serve on the bench checkpoint, restarted for each run, the runs alternating
# (off, on, off, on, ...) so that both modes see the same machine. Results in
# docs/benchmarks/results/tracing-{off,on}-<round>.json and tracing.md.
# BASELINE=<commit> adds a third mode to each round, "before": that commit's code (checked out
# in a temporary worktree, run with this virtual environment), e.g. the commit before tracing.
#
#   bash docs/benchmarks/tracing.sh          # ROUNDS=2, CONCURRENCY=4 (about 10 minutes)
#   FIRST_ROUND=3 ROUNDS=4 bash docs/benchmarks/tracing.sh   # two more rounds, all compared
#   BASELINE=4c7a696 PREFIX=tracing-vs-before bash docs/benchmarks/tracing.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=$PWD/docs/benchmarks/results
MODEL=${MODEL:-$HOME/.cache/dvd/bench-internvl-flash}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-4}
PREFIX=${PREFIX:-tracing}  # names the result files
BASELINE=${BASELINE:-}
mkdir -p "$OUT"
if [ -n "$BASELINE" ]; then
  BASELINE_TREE=$(mktemp -d)
  git worktree add --detach "$BASELINE_TREE" "$BASELINE" > /dev/null
fi
export VLLM_CPU_KVCACHE_SPACE=2 TOKENIZERS_PARALLELISM=false
export DVD_METRICS_PORT=0  # the vision service's metrics on a free port
[ -f "$MODEL/config.json" ] || dvd-tiny-model "$MODEL" --preset bench --flash

# The image-heavy workload of section 1 (docs/benchmarks.md).
WORKLOAD=(--dataset synthetic --min-tiles 1 --max-tiles 8 --dense-fraction 0.5
          --prompt-len 32 --output-len 32 --ignore-eos --num-requests 32 --warmup 2 --quiet
          --concurrency "$CONCURRENCY")

pids=()
# Last started, first stopped: the services flush their spans before the receiver goes.
stop_all() {
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill "${pids[i]}" 2>/dev/null || true; wait "${pids[i]}" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_all
  if [ -n "$BASELINE" ]; then git worktree remove --force "$BASELINE_TREE"; fi
}
trap cleanup EXIT

run() {  # run MODE ROUND
  local mode=$1 round=$2 env=(OTEL_SDK_DISABLED=false) code=$PWD
  # "before": the baseline's modules shadow the installed ones, and the services run from its
  # tree (`python -m` puts the working directory first on the module path).
  if [ "$mode" = before ]; then code=$BASELINE_TREE; env+=(PYTHONPATH="$BASELINE_TREE"); fi
  if [ "$mode" = on ]; then
    python tests/support/otlp_receiver.py "$OUT/$PREFIX-spans-$round.jsonl" > "$OUT/receiver.out" &
    pids+=($!)
    for _ in $(seq 100); do [ -s "$OUT/receiver.out" ] && break; sleep 0.1; done
    env=(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="$(head -1 "$OUT/receiver.out")" OTEL_TRACES_SAMPLER=always_on)
  fi
  rm -f "$OUT/serve.ports"
  (cd "$code" && exec env "${env[@]}" dvd-serve --model "$MODEL" --port 0 --vision-port 0 \
    --port-file "$OUT/serve.ports") > "$OUT/serve-$PREFIX-$mode.log" 2>&1 & pids+=($!)
  for _ in $(seq 1200); do [ -s "$OUT/serve.ports" ] && break; sleep 0.5; done
  local url="http://127.0.0.1:$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$OUT/serve.ports")"
  local name; name=$(curl -sf "$url/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
  dvd-bench run --base-url "$url" --model "$name" "${WORKLOAD[@]}" --label "tracing $mode ($round)" \
    --output "$OUT/$PREFIX-$mode-$round.json"
  stop_all
  if [ "$mode" = on ]; then tail -1 "$OUT/receiver.out"; rm -f "$OUT/receiver.out"; fi
}

MODES=(off on)
if [ -n "$BASELINE" ]; then MODES=(before off on); fi
for round in $(seq "${FIRST_ROUND:-1}" "$ROUNDS"); do  # FIRST_ROUND: add rounds to earlier ones
  for mode in "${MODES[@]}"; do run "$mode" "$round"; done
done
files=()
for round in $(seq "$ROUNDS"); do
  for mode in "${MODES[@]}"; do files+=("$OUT/$PREFIX-$mode-$round.json"); done
done
dvd-bench compare "${files[@]}" | tee "$OUT/$PREFIX.md"
