# megatron_rl for GPU clusters: NVIDIA's PyTorch image (CUDA, Transformer Engine, apex),
# a recent megatron-core, SGLang for rollouts, and this package.
#
#   docker build -t megatron_rl .
#   docker run --gpus all --ipc=host -it megatron_rl \
#       torchrun --nproc-per-node 8 pretrain_rl.py --help
#
# The CPU path needs none of this: `make demo` / `make test` on any machine.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# megatron-core >= 0.17 needs Python 3.12, which the NGC images have; SGLang brings its
# own CUDA kernels (flashinfer, sgl-kernel).
RUN pip install "megatron-core>=0.17" "sglang[all]>=0.5.7"

WORKDIR /opt/megatron_rl
COPY setup.py pyproject.toml README.md pretrain_rl.py Makefile ./
COPY megatron_rl ./megatron_rl
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests

# The image's torch, Transformer Engine and apex satisfy the [gpu] extra; pip keeps them.
RUN pip install -e ".[gpu,dev]"

ENV PYTHONPATH=/opt/megatron_rl
CMD ["python", "pretrain_rl.py", "--help"]
