"""Convert between megatron_rl's distributed checkpoints and Hugging Face Qwen3-MoE.

Megatron -> Hugging Face (a checkpoint directory written by training/checkpoint.py; the
model shape comes from the same flags as training, or from an HF config)::

    python tools/convert_checkpoint.py to-hf --load runs/rl --save hf/step10 \
        [--step 10] [--model-preset tiny | --num-layers ... | --hf-config DIR] [--dtype bf16]

Hugging Face -> Megatron (the shape comes from the HF config.json)::

    torchrun --nproc-per-node 2 tools/convert_checkpoint.py to-megatron --hf hf/model \
        --save runs/init --expert-model-parallel-size 2

Both directions run at any parallel layout (``--tensor-model-parallel-size``,
``--pipeline-model-parallel-size``, ``--expert-model-parallel-size``, ...; torchrun for
more than one process). Distributed checkpoints reshard on load, so the layout of a
conversion need not match training's. Optimiser state in a training checkpoint is left
out of the HF export; a converted megatron checkpoint holds the weights only (training
starts a fresh optimiser from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _parser() -> argparse.ArgumentParser:
    from megatron_rl.config.flags import add_config_flags
    from megatron_rl.distributed import ParallelConfig
    from megatron_rl.model.config import ModelConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="megatron distributed checkpoint -> HF directory")
    to_hf.add_argument("--load", required=True, help="checkpoint directory (with iter_*/)")
    to_hf.add_argument("--step", type=int, default=None, help="default: the latest")
    to_hf.add_argument("--save", required=True, help="Hugging Face output directory")
    to_hf.add_argument(
        "--hf-config",
        default=None,
        help="take the model shape from this HF checkpoint's config.json",
    )
    to_hf.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="dtype of the written weights (default: fp32, the converter's model)",
    )
    to_hf.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors file")
    to_mg = commands.add_parser("to-megatron", help="HF directory -> megatron checkpoint")
    to_mg.add_argument("--hf", required=True, help="Hugging Face checkpoint directory")
    to_mg.add_argument("--save", required=True, help="checkpoint directory to write")
    to_mg.add_argument("--step", type=int, default=0, help="step recorded in the checkpoint")
    for sub in (to_hf, to_mg):
        sub.add_argument(
            "--model-preset",
            default="tiny",
            help="shape preset the model flags override (to-hf), or the source "
            "of the fields an HF config lacks (to-megatron)",
        )
        add_config_flags(sub, ModelConfig, "model")
        add_config_flags(sub, ParallelConfig, "parallel layout")
    return parser


def _model_config(ns: argparse.Namespace):
    from megatron_rl.config.flags import config_from_flags
    from megatron_rl.model.config import ModelConfig, preset
    from megatron_rl.weight_sync.load_hf import model_config_from_hf

    base = config_from_flags(ModelConfig, ns, preset(ns.model_preset))
    source = ns.hf if ns.command == "to-megatron" else ns.hf_config
    return model_config_from_hf(source, base=base) if source else base


def model_flags(config) -> str:
    """The training flags that build ``config`` (fields that differ from the defaults)."""
    from megatron_rl.model.config import ModelConfig

    defaults = ModelConfig()
    flags = []
    for field in dataclasses.fields(ModelConfig):
        value = getattr(config, field.name)
        if field.metadata.get("flag") is False or value == getattr(defaults, field.name):
            continue
        flags.append(f"--{field.name.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(flags) or "(the defaults)"


def run(ns: argparse.Namespace) -> str:
    import torch

    from megatron_rl.config.flags import config_from_flags
    from megatron_rl.distributed import ParallelConfig, init_distributed, world_size_from_env
    from megatron_rl.training import checkpoint as ckpt
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.weight_sync.export import export_hf
    from megatron_rl.weight_sync.load_hf import load_hf_weights

    model = _model_config(ns)
    parallel = config_from_flags(ParallelConfig, ns)
    parallel.check_layout(world_size_from_env(), model.num_layers, model.num_experts)
    init_distributed(parallel, model.num_layers, seed=0)
    engine = MegatronEngine(model, parallel, TrainingConfig(), build_optimizer=False)
    if ns.command == "to-hf":
        common = ckpt.load_checkpoint(
            engine, ns.load, load_optimizer=False, load_rng=False, step=ns.step
        )
        dtype = getattr(torch, _DTYPES[ns.dtype]) if ns.dtype else None
        stats = export_hf(
            engine.chunks,
            model,
            ns.save,
            dtype=dtype,
            max_shard_bytes=int(ns.max_shard_gb * 1024**3),
        )
        if stats is None:
            return ""
        return (
            f"wrote {stats.num_tensors} tensors ({stats.bytes / 1e6:.1f} MB) of step "
            f"{common.get('step')} from {ns.load} to {stats.path}"
        )
    load_hf_weights(engine.chunks, model, ns.hf)
    path = ckpt.save_checkpoint(
        engine, ns.save, ns.step, {"converted_from": os.path.abspath(ns.hf)}, keep_last=0
    )
    return f"wrote {path}; train from it with --load {ns.save} {model_flags(model)}"


def main(argv: list[str] | None = None) -> int:
    from megatron_rl.config.flags import ConfigError
    from megatron_rl.distributed import destroy_distributed, is_rank0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = _parser().parse_args(argv)
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_rl.training.checkpoint import CheckpointError

    try:
        message = run(ns)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"convert_checkpoint.py {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointingException, CheckpointException) as exc:
        # torch wraps each rank's error; the first one says which tensor does not fit.
        failures = getattr(exc, "failures", None)
        cause = next(iter(failures.values())) if failures else exc
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
        print(
            f"convert_checkpoint.py {ns.command}: error: the checkpoint in {ns.load} does not "
            f"fit the model the flags describe ({cause}); pass the training run's model flags "
            "(--model-preset, --num-layers, ...) or --hf-config DIR",
            file=sys.stderr,
        )
        return 2
    if is_rank0() and message:
        print(message)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    # dist_checkpointing starts a helper process with "spawn", which re-imports this file:
    # all work stays under this guard.
    sys.exit(main())
