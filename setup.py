"""megatron_rl: stable RL for Mixture-of-Experts models on megatron-core.

Every version pin of the project lives in ``PINS`` below: the CPU extra pins the
releases that install on Python 3.11 CPU machines (CI, laptops); the GPU extra adds
what the Docker image brings on NVIDIA machines.
"""

from setuptools import find_packages, setup

PINS = {
    # torch: 2.13.0 is the CPU wheel the CPU machines carry; GPU images bring their own.
    "torch": "torch==2.13.0",
    # megatron-core >= 0.17 needs Python 3.12; 0.16.1 is the newest for 3.11.
    "megatron-core-cpu": "megatron-core==0.16.1",
    # Bounded to the releases the tests run on: 0.16.1 (`make test`) and 0.19.2 (`make
    # test-mcore-latest`, Python 3.12).
    "megatron-core": "megatron-core>=0.16.1,<=0.19.2",
    "transformers": "transformers>=5.0,<6",
    "tokenizers": "tokenizers>=0.22",
    "safetensors": "safetensors>=0.5",
    "reasoning-gym": "reasoning-gym>=0.1.25",
    "fastapi": "fastapi>=0.115",
    "uvicorn": "uvicorn>=0.30",
    "httpx": "httpx>=0.27",
    "rich": "rich>=13",
    "tensorboard": "tensorboard>=2.15",
    "wandb": "wandb>=0.19",
    "psutil": "psutil>=5.9",
    "matplotlib": "matplotlib>=3.8",
    "numpy": "numpy>=1.26",
    "pytest": "pytest>=8",
    "ruff": "ruff>=0.6",
    # The GPU stack, as the Dockerfile installs it on SGLang's release image (torch 2.14.1,
    # CUDA 13): Transformer Engine's CUDA 13 core and its torch extension, compiled there
    # against the image's torch with --no-build-isolation.
    "transformer-engine": "transformer-engine[pytorch,core_cu13]==2.20.2",
    # Serving only: sglang's [all] extra adds diffusion and tracing, not needed here. Every
    # sglang release pins torch exactly (0.5.23: torch==2.14.1).
    "sglang": "sglang==0.5.23",
    "sglang-router": "sglang-router==0.3.2",
}

# NVIDIA apex is not on PyPI (PyPI's "apex" is another project) and must be compiled
# against the torch it runs with, so no extra names it: the Dockerfile builds this commit
# (README, "GPU clusters", says how to build it elsewhere). megatron-core imports it only as
# a fallback for Transformer Engine's fused kernels.
APEX_COMMIT = "6424da3b4faa6c8f062da4a48c424fff3f02d42d"

BASE = [
    PINS[name]
    for name in (
        "megatron-core", "transformers", "tokenizers", "safetensors", "reasoning-gym",
        "fastapi", "uvicorn", "httpx", "rich", "tensorboard", "wandb", "psutil",
        "matplotlib", "numpy",
    )
]

setup(
    name="megatron_rl",
    version="0.1.0",
    description="Stable RL (MiniRL, routing replay R2/R3) for MoE models on megatron-core",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"]),
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require={
        "cpu": [PINS["torch"], PINS["megatron-core-cpu"]],
        "gpu": [PINS["transformer-engine"], PINS["sglang"], PINS["sglang-router"]],
        "dev": [PINS["pytest"], PINS["ruff"], "sglang-router==0.3.2"],  # the router e2e test
    },
    py_modules=["pretrain_rl"],
    entry_points={"console_scripts": ["megatron-rl=pretrain_rl:main"]},
)
