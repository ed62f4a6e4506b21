# syntax=docker/dockerfile:1
#
#   docker build --target cpu -t inferstream:0.1.0-cpu .
#   docker build --target gpu -t inferstream:0.1.0-gpu .
#
# builder: builds the model repository (needs the `models` extra, torch CPU-only) and the
# inferstream wheel; cpu / gpu: the runtime images (no torch), each installing the wheel with its
# onnxruntime extra and copying the repository from the builder.

# ---------------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# torch from the CPU-only index first, so the `models` extra finds it satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY agents ./agents
COPY topics ./topics
COPY models ./models
RUN pip install ".[models]" && python -m models.build --repository /src/models/repository \
 && pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm AS cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    INFERSTREAM_MODEL_REPOSITORY=/app/models/repository \
    INFERSTREAM_STATE_DIR=/tmp/inferstream
RUN useradd --system --uid 10001 --user-group --create-home inferstream
WORKDIR /app
COPY --from=builder /wheels /wheels
RUN pip install "$(ls /wheels/inferstream-*.whl)[cpu]" && rm -rf /wheels
COPY --from=builder --chown=10001:10001 /src/models/repository /app/models/repository
USER 10001
EXPOSE 8000 9100
ENTRYPOINT ["inferstream"]
CMD ["worker"]

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.9.1-cudnn-runtime-ubuntu22.04 AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    INFERSTREAM_MODEL_REPOSITORY=/app/models/repository \
    INFERSTREAM_STATE_DIR=/tmp/inferstream
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
COPY --from=builder /wheels /wheels
RUN pip install "$(ls /wheels/inferstream-*.whl)[gpu]" && rm -rf /wheels
COPY --from=builder --chown=10001:10001 /src/models/repository /app/models/repository
USER 10001
EXPOSE 8000 9100
ENTRYPOINT ["inferstream"]
CMD ["worker"]
