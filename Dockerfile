# megatron_rl for GPU clusters: SGLang's release image (CUDA 13, Python 3.12, and the torch
# that sglang 0.5.23 pins: 2.14.1), with megatron-core, Transformer Engine and apex built
# against that torch, sglang-router, wandb, and this package.
#
#   docker build -t megatron_rl .
#   docker run --gpus all --ipc=host -it megatron_rl python pretrain_rl.py --help
#
# Nothing here replaces the image's torch: the image's own torch stack (torch, triton, the
# NVIDIA CUDA wheels, sglang and its kernels) is written to a constraints file that every
# pip install below obeys (PIP_CONSTRAINT), so a package that wants another torch makes the
# build fail instead of quietly breaking SGLang. Versions agree with setup.py's PINS
# (tests/foundation/test_dockerfile.py). Not built in this project's CI, which has no Docker
# engine and no access to Docker Hub. The CPU path needs none of this: `make demo`.
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

ARG MEGATRON_CORE_VERSION=0.19.2
ARG TRANSFORMER_ENGINE_VERSION=2.20.2
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
ARG SGLANG_ROUTER_VERSION=0.3.2
ARG WANDB_VERSION=0.31.0
# Parallel compile jobs for Transformer Engine and apex (each takes a few GB of memory).
ARG MAX_JOBS=8

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# Refuse to build on an image without torch or sglang rather than pin nothing.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|sglang|sglang-kernel|sgl-kernel|flashinfer[-_a-z0-9]*|nvidia-[-_a-z0-9]+|cuda-[-_a-z0-9]+)==' \
      > /opt/image-constraints.txt \
 && grep -q '^torch==' /opt/image-constraints.txt \
 && grep -q '^sglang==' /opt/image-constraints.txt \
 && cat /opt/image-constraints.txt
ENV PIP_CONSTRAINT=/opt/image-constraints.txt

# megatron-core needs only torch (kept), numpy and packaging; the router is a Rust binary.
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" \
                "sglang-router==${SGLANG_ROUTER_VERSION}" "wandb==${WANDB_VERSION}"

# Transformer Engine: the CUDA 13 core library as a wheel, and its torch extension compiled
# here against the image's torch (--no-build-isolation: an isolated build would fetch a
# torch of its own to compile against).
RUN pip install pybind11 ninja \
 && NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation \
      "transformer-engine[pytorch,core_cu13]==${TRANSFORMER_ENGINE_VERSION}"

# NVIDIA apex (not on PyPI) at a fixed commit, with its C++/CUDA extensions.
RUN APEX_CPP_EXT=1 APEX_CUDA_EXT=1 APEX_PARALLEL_BUILD=${MAX_JOBS} NVCC_APPEND_FLAGS="--threads 4" \
    pip install -v --no-build-isolation --no-deps \
      "apex @ git+https://github.com/NVIDIA/apex.git@${APEX_COMMIT}"

WORKDIR /opt/megatron_rl
COPY setup.py pyproject.toml README.md pretrain_rl.py Makefile ./
COPY megatron_rl ./megatron_rl
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests

# This package's dependencies that the image lacks (the image already has megatron-core,
# transformers, tokenizers, safetensors, fastapi, uvicorn, httpx, psutil, numpy, Transformer
# Engine, sglang and sglang-router at the versions setup.py accepts), then the package
# itself with --no-deps.
RUN pip install "reasoning-gym>=0.1.25" "rich>=13" "tensorboard>=2.15" "matplotlib>=3.8" \
                "pytest>=8" "ruff>=0.6" \
 && pip install --no-deps -e . \
 && python -c "import megatron.core, apex, sglang, sglang_router, megatron_rl, pretrain_rl"

ENV PYTHONPATH=/opt/megatron_rl
CMD ["python", "pretrain_rl.py", "--help"]
