# syntax=docker/dockerfile:1
#
#   docker build --target cpu -t inferstream:0.1.0-cpu .
#   docker build --target gpu -t inferstream:0.1.0-gpu .
#   (labels: --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD))
#
# builder: builds the model repository (needs the `models` extra, torch CPU-only) and the
# inferstream wheel; cpu / gpu: the runtime images (no torch), each installing the wheel with its
# onnxruntime extra and the Triton client (so every backend imports), and copying the repository
# from the builder. Every pip install takes constraints.txt: the versions CI and setup.sh use.
# pip's cache lives in a BuildKit cache mount, so rebuilds reuse downloads and no layer keeps it.

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/inferstream/inferstream

# ---------------------------------------------------------------------------------------------
# Runs natively, not under QEMU: its ONNX files, Triton configs and pure wheel fit any platform.
FROM --platform=$BUILDPLATFORM python:3.11.13-slim-bookworm AS builder
# --build-arg MODELS_BUILD_ARGS=--gpu: Triton configs with GPU instance groups (models/build.py).
ARG MODELS_BUILD_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY constraints.txt ./
# torch from the CPU-only index first, so the `models` extra finds it satisfied. An extra index:
# torch's own dependencies come from PyPI at the pinned versions; only that index has +cpu.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY agents ./agents
COPY topics ./topics
COPY models ./models
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt ".[models]" && python -m models.build --repository /src/models/repository $MODELS_BUILD_ARGS \
 && pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm AS cpu
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="inferstream (cpu)" \
      org.opencontainers.image.description="Kafka-native inference platform: worker and HTTP bridge, onnxruntime on CPU" \
      org.opencontainers.image.source=$SOURCE \
      org.opencontainers.image.revision=$REVISION \
      org.opencontainers.image.version=$VERSION \
      org.opencontainers.image.licenses=MIT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    INFERSTREAM_MODEL_REPOSITORY=/app/models/repository \
    INFERSTREAM_STATE_DIR=/tmp/inferstream \
    INFERSTREAM_METRICS_PORT=9100 INFERSTREAM_METRICS_HOST=0.0.0.0 \
    HEALTHCHECK_URL=http://127.0.0.1:9100/healthz
RUN useradd --system --uid 10001 --user-group --create-home inferstream
WORKDIR /app
COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install -c /tmp/constraints.txt "$(ls /wheels/inferstream-*.whl)[cpu,triton]" && rm /tmp/constraints.txt
COPY --from=builder --chown=10001:10001 /src/models/repository /app/models/repository
USER 10001
EXPOSE 8000 9100
# The default command is the worker, whose only HTTP port is its metrics server: /healthz there
# fails once its event loop is stuck. The bridge (CMD ["bridge"]) sets
# HEALTHCHECK_URL=http://127.0.0.1:8000/v2/health/live.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=3)"]
ENTRYPOINT ["inferstream"]
CMD ["worker"]

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.9.1-cudnn-runtime-ubuntu22.04 AS gpu
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.title="inferstream (gpu)" \
      org.opencontainers.image.description="Kafka-native inference platform: worker and HTTP bridge, onnxruntime on CUDA" \
      org.opencontainers.image.source=$SOURCE \
      org.opencontainers.image.revision=$REVISION \
      org.opencontainers.image.version=$VERSION \
      org.opencontainers.image.licenses=MIT
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    INFERSTREAM_MODEL_REPOSITORY=/app/models/repository \
    INFERSTREAM_STATE_DIR=/tmp/inferstream \
    INFERSTREAM_METRICS_PORT=9100 INFERSTREAM_METRICS_HOST=0.0.0.0 \
    HEALTHCHECK_URL=http://127.0.0.1:9100/healthz
# Ubuntu 22.04 ships Python 3.10; 3.11 comes from the deadsnakes PPA.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
RUN useradd --system --uid 10001 --user-group --create-home inferstream
WORKDIR /app
COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install -c /tmp/constraints.txt "$(ls /wheels/inferstream-*.whl)[gpu,triton]" && rm /tmp/constraints.txt
COPY --from=builder --chown=10001:10001 /src/models/repository /app/models/repository
USER 10001
EXPOSE 8000 9100
# As in the cpu image: the worker's /healthz by default; the bridge overrides HEALTHCHECK_URL.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=3)"]
ENTRYPOINT ["inferstream"]
CMD ["worker"]
