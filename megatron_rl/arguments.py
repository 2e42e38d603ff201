"""The run's configuration: one dataclass per concern, all parsed from one command line.

Flags follow Megatron-LM's names where Megatron users know them (``--num-layers``,
``--tensor-model-parallel-size``, ``--lr``, ``--save`` ...) and use an ``--rl-`` prefix for
the RL-specific ones. Every invalid value or combination is refused before any process
group is created, with one message naming the flags involved.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from megatron_rl.config.flags import ConfigError, add_config_flags, config_from_flags
from megatron_rl.data.tasks import TaskConfig
from megatron_rl.distributed import ParallelConfig, world_size_from_env
from megatron_rl.model.config import ModelConfig, preset
from megatron_rl.training.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    TrainingConfig,
)


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Everything one launch of pretrain_rl.py needs."""

    stage: Literal["sft", "rl"] = "rl"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    extra: dict = field(default_factory=dict)
    """Configs of the RL components (objective, replay, rollout, loop), by name."""

    def validate(self, world_size: int) -> None:
        self.model.validate()
        self.parallel.validate(world_size, self.model.num_layers, self.model.num_experts)
        self.training.validate(self.parallel.data_parallel_size(world_size))
        self.task.validate()
        for component in self.extra.values():
            _validate_component(component, self, world_size)


def _validate_component(component, run: RunConfig, world_size: int) -> None:
    """Call ``component.validate`` with whichever of (run, world_size) it takes."""
    check = getattr(component, "validate", None)
    if check is None:
        return
    params = inspect.signature(check).parameters
    offered = {"run": run, "world_size": world_size}
    check(**{name: value for name, value in offered.items() if name in params})


def _component_configs() -> dict[str, type]:
    """The RL components' configs (name -> class), parsed into ``RunConfig.extra``."""
    from megatron_rl.loss import ObjectiveConfig
    from megatron_rl.replay.config import ReplayConfig
    from megatron_rl.rollout.config import RolloutConfig
    from megatron_rl.training.rl_config import RLConfig

    return {"rl": RLConfig, "objective": ObjectiveConfig, "replay": ReplayConfig,
            "rollout": RolloutConfig}


EXTRA_CONFIGS: dict[str, type] = _component_configs()

_GROUPS: tuple[tuple[str, type, str], ...] = (
    ("model", ModelConfig, "model"),
    ("parallel", ParallelConfig, "distributed"),
    ("training", TrainingConfig, "training"),
    ("checkpoint", CheckpointConfig, "checkpointing"),
    ("logging", LoggingConfig, "logging"),
    ("evaluation", EvalConfig, "evaluation"),
    ("task", TaskConfig, "task"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_rl.py",
        description="RL of MoE models on megatron-core (MiniRL, routing replay R2/R3).",
    )
    parser.add_argument("--stage", choices=["sft", "rl"], default="rl",
                        help="sft: cold-start supervised training; rl: the RL loop")
    parser.add_argument("--model-preset", default="tiny",
                        help="shape preset the --num-layers etc. flags override "
                             "(tiny, qwen3-30b-a3b)")
    for _, cls, title in _GROUPS:
        add_config_flags(parser, cls, title)
    for name, cls in EXTRA_CONFIGS.items():
        add_config_flags(parser, cls, name)
    return parser


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None) -> RunConfig:
    """Parse and validate; raises ConfigError with a clear message on bad input."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    parts = {}
    for name, cls, _ in _GROUPS:
        base = preset(ns.model_preset) if cls is ModelConfig else None
        parts[name] = config_from_flags(cls, ns, base)
    extra = {name: config_from_flags(cls, ns) for name, cls in EXTRA_CONFIGS.items()}
    run = RunConfig(stage=ns.stage, extra=extra, **parts)
    run.validate(world_size if world_size is not None else world_size_from_env())
    return run


def replace(run: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(run, **changes)


__all__ = ["RunConfig", "ConfigError", "parse_args", "build_parser", "EXTRA_CONFIGS"]
