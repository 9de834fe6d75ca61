#!/usr/bin/env bash
# The vision service on one CUDA GPU: the `gpu`-marked tests, `dvd-bench-vision` with
# InternVL3.5-1B's vision geometry (raw encoder vs served through gRPC, vir off and auto; a
# lone image in parts and in one piece), and the embedding transport on this host's cores.
# Runs from the repository root with the project importable (its .venv, or PYTHONPATH=$PWD
# where torch and the vision half's packages are installed); needs no language model and no
# vLLM.
#
#   bash docs/benchmarks/gpu.sh [RESULTS_DIR]       # about 7 minutes on one H100
#   STEPS="tests vision" bash docs/benchmarks/gpu.sh
#   STEPS=vision CONCURRENCY=64 REQUESTS=1024 VISION_SERVER_ARGS="--passes-in-flight 3" \
#     VISION_TAG=-inflight3 bash docs/benchmarks/gpu.sh      # one served level, one server flag
#   STEPS="vision lone" BATCH_INVARIANT=on VISION_TAG=-invariant bash docs/benchmarks/gpu.sh
#                                        # the cost of --batch-invariant (raw, served, lone)
#
# Other knobs: PRESET, ROUNDS, OVERLAP ("on off": the lone step's --overlap-preparation
# values), LONE_REQUESTS, and each step's time limit (TESTS_LIMIT, VISION_LIMIT, LONE_LIMIT,
# TRANSPORT_LIMIT, in seconds).
#
# Each step has its own time limit and the script goes on after a failed step; a summary of
# every step is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
OUT=${1:-docs/benchmarks/results}
STEPS=${STEPS:-"tests vision lone transport"}
PRESET=${PRESET:-vision-300m}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
summary=()
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout --kill-after 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name: exit $rc after $((SECONDS - started)) s")
  tail -n 25 "$OUT/$name.log"
}

"$PY" - <<'PY' | tee "$OUT/gpu-host.txt"
import os, platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cpus", os.cpu_count(), platform.machine())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
PY

if [[ " $STEPS " == *" tests "* ]]; then
  step gpu-tests "${TESTS_LIMIT:-300}" "$PY" -m pytest -p no:cacheprovider -m gpu -v \
    tests/oracle/test_gpu_vision.py tests/unit/vision_server/test_batch_invariance.py
fi

if [[ " $STEPS " == *" vision "* ]]; then
  # 896x896 JPEGs (4 tiles + thumbnail); served at 1, 16 and 64 concurrent calls.
  # VISION_SERVER_ARGS: more dvd-vision-server flags; VISION_TAG: a suffix for the file names.
  step "vision-bench${VISION_TAG:-}" "${VISION_LIMIT:-300}" "$PY" -m benchmarks.vision \
    --preset "$PRESET" --batch-sizes 1 4 16 32 64 --raw-seconds 1.5 \
    --concurrency ${CONCURRENCY:-1 16 64} --vir off auto --rounds "${ROUNDS:-2}" \
    --requests "${REQUESTS:-0}" --server-args "${VISION_SERVER_ARGS:-}" \
    --batch-invariant "${BATCH_INVARIANT:-auto}" \
    --cache-dir "${CACHE_DIR:-/tmp/dvd-bench-vision}" \
    --output "$OUT/vision-gpu-$PRESET${VISION_TAG:-}.json"
fi

if [[ " $STEPS " == *" lone "* ]]; then
  # One image at a time, taken in parts (the default with CUDA) and in one piece; --stages
  # splits its latency into the engine (cut tiles in), the pipeline (JPEG in) and gRPC.
  for overlap in ${OVERLAP:-on off}; do
    step "lone${VISION_TAG:-}-$overlap" "${LONE_LIMIT:-150}" "$PY" -m benchmarks.vision --preset "$PRESET" \
      --batch-sizes 1 4 5 --raw-seconds 1 --concurrency 1 --vir off auto --requests "${LONE_REQUESTS:-60}" \
      --stages --overlap-preparation "$overlap" --cache-dir "${CACHE_DIR:-/tmp/dvd-bench-vision}" \
      --batch-invariant "${BATCH_INVARIANT:-auto}" \
      --output "$OUT/vision-gpu-$PRESET${VISION_TAG:-}-lone-$overlap.json"
  done
fi

if [[ " $STEPS " == *" transport "* ]]; then
  step transport "${TRANSPORT_LIMIT:-120}" "$PY" -m benchmarks.transport --sizes-mb 1.7 6.8 \
    --streams 1 16 --transports grpc shared-memory --calls 10 --json
  # gRPC from 4 client processes at once (as 4 language-service processes would read).
  step transport-clients "${TRANSPORT_LIMIT:-120}" "$PY" -m benchmarks.transport \
    --sizes-mb 1.7 6.8 --streams 4 --clients 4 --transports grpc --calls 10 --json
fi

printf '%s\n' "${summary[@]}" | tee "$OUT/gpu-summary.txt"
