# syntax=docker/dockerfile:1
# thrift-vllm: vLLM's OpenAI-compatible server with the ThriftAttention backend, for Hopper
# (sm_90) and Blackwell (sm_100 / sm_120) GPU nodes.
#
# Base: the official vLLM CUDA image, pinned by tag. The plugin supports vLLM >= 0.32 on CUDA
# through its compat module (thrift_vllm/backend/compat.py gates the 0.32.x-0.33.x interface);
# the H200 tests ran vLLM 0.26 separately (shared/gpu-vllm), not this image. Bumping the tag
# past what compat.py accepts makes the server fail at start with a clear version error.
#
# Build:  docker build -t thrift-vllm:0.1.0 .
# Run:    docker run --gpus all --ipc=host -p 8000:8000 -v thrift-data:/data thrift-vllm:0.1.0
#           (the embedded model; -e THRIFT_MODEL=<HF id or /data/dir> for another one; extra
#           arguments are `thrift-vllm serve` / `vllm serve` flags)
FROM vllm/vllm-openai:v0.33.0

LABEL org.opencontainers.image.title="thrift-vllm" \
      org.opencontainers.image.description="vLLM OpenAI-compatible server with ThriftAttention (FP4 attention with a few FP16 blocks)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/vllm/vllm-openai:v0.33.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Only what `pip install .` needs (pyproject reads README.md; `server/` and `kernels/` are
# installed as thrift_vllm.server / thrift_vllm.kernels); .dockerignore keeps the rest out.
WORKDIR /opt/thrift-vllm
COPY pyproject.toml README.md src/
COPY thrift_vllm/ src/thrift_vllm/
COPY kernels/ src/kernels/
COPY server/ src/server/

# --no-deps: torch, triton, numpy (and vLLM itself) come from the image and must not be replaced
# by a resolver "upgrade" (that would swap the image's CUDA build). The checks run outside the
# source tree and fail the build unless the wheel's only top-level package is thrift_vllm (never
# a top-level `kernels` or `server`), the vLLM plugin entry point is registered and the
# `thrift-vllm` console script is on PATH.
RUN python3 -m pip install --no-cache-dir --no-deps ./src \
    && rm -rf ./src \
    && python3 -c "import importlib.metadata as m; \
top = m.distribution('thrift-vllm').read_text('top_level.txt').split(); \
assert top == ['thrift_vllm'], top; \
assert any(e.name == 'thrift_vllm' for e in m.entry_points(group='vllm.general_plugins')); \
import thrift_vllm.server.cli" \
    && command -v thrift-vllm

# The model served when THRIFT_MODEL is empty: models/thrift-embedded/ (the trained embedded
# model) when it is in the build context -- .dockerignore lets only that directory of models/
# through -- else the untrained placeholder (same architecture, random weights with a fixed seed,
# 15.6 MB; the server warns that it is noise), made here so the image serves without a download.
# pyproject.toml keeps this COPY valid when models/ is absent (the glob then matches nothing).
ENV THRIFT_VLLM_MODELS_DIR=/opt/thrift-vllm/models
COPY pyproject.toml models* /opt/thrift-vllm/models/
# chmod: the export writes model.safetensors as 0600, and the server runs as another user.
RUN rm -f /opt/thrift-vllm/models/pyproject.toml \
    && python3 -c "from thrift_vllm.server.models import default_model; print(*default_model())" \
    && chmod -R a+rX /opt/thrift-vllm/models

COPY --chmod=0755 deploy/entrypoint.sh /usr/local/bin/thrift-vllm-entrypoint

# Non-root user (numeric, so Kubernetes' runAsNonRoot can verify it). Model weights and the
# Hugging Face, vLLM and Triton caches live under /data: mount a volume there.
RUN groupadd --system --gid 10001 thrift \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/thrift --create-home \
       --shell /usr/sbin/nologin thrift \
    && mkdir -p /data \
    && chown 10001:10001 /data

ENV HOME=/home/thrift \
    HF_HOME=/data/huggingface \
    VLLM_CACHE_ROOT=/data/vllm-cache \
    TRITON_CACHE_DIR=/data/triton-cache \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    THRIFT_MODEL="" \
    THRIFT_FP16_BUDGET=0.05 \
    THRIFT_MAX_FP16_BUDGET=0.25 \
    THRIFT_KV_LAYOUT=auto \
    HOST=0.0.0.0 \
    PORT=8000

VOLUME ["/data"]
WORKDIR /home/thrift
USER 10001:10001

EXPOSE 8000

# vLLM's /health answers 200 once the engine is up; model download + load + compile can take
# minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

# The entry point turns THRIFT_MODEL / THRIFT_FP16_BUDGET / THRIFT_MAX_FP16_BUDGET / HOST / PORT
# into flags and execs `thrift-vllm serve`; extra arguments (CMD, `docker run IMAGE ...`, k8s
# `args`) are appended, e.g. --tensor-parallel-size 4. A first argument that is not a flag is
# run as a command instead (`docker run IMAGE ray start --head`, `... bash`).
ENTRYPOINT ["/usr/local/bin/thrift-vllm-entrypoint"]
CMD []
