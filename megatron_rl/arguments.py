"""The run's configuration: one typed config per component, all parsed from one command line.

Flags follow Megatron-LM's names where Megatron users know them (``--num-layers``,
``--tensor-model-parallel-size``, ``--lr``, ``--save`` ...) and use an ``--rl-`` prefix for
the RL-specific ones. Each component's flags parse into their own namespace, so two
components may both have a field called ``seed``. Every invalid value or combination is
refused before any process group is created, with one message naming the flags involved:
:meth:`RunConfig.validate` asks each component to ``validate(run)``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from megatron_rl.config.flags import ConfigError, add_config_flags, config_from_flags
from megatron_rl.data.tasks import TaskConfig
from megatron_rl.distributed import ParallelConfig, world_size_from_env
from megatron_rl.loss import ObjectiveConfig
from megatron_rl.model.config import ModelConfig, preset
from megatron_rl.replay.config import ReplayConfig
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.training.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    TrainingConfig,
)
from megatron_rl.training.rl_config import RLConfig


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Everything one launch of pretrain_rl.py needs: one config per component."""

    stage: Literal["sft", "rl"] = "rl"
    world_size: int = 1
    """Processes in the launch (from torchrun's WORLD_SIZE); the layout checks need it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def components(self) -> Iterator[tuple[str, object]]:
        """(name, config) of every component, in flag-group order."""
        for name, _, _ in COMPONENTS:
            yield name, getattr(self, name)

    def validate(self) -> None:
        """Each component checks itself against the whole run (layouts need the model
        and world size, batch arithmetic needs the parallel layout, ...)."""
        for _, component in self.components():
            component.validate(self)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


COMPONENTS: tuple[tuple[str, type, str], ...] = (
    # (RunConfig field, config class, --help group title)
    ("model", ModelConfig, "model"),
    ("parallel", ParallelConfig, "distributed"),
    ("training", TrainingConfig, "training"),
    ("checkpoint", CheckpointConfig, "checkpointing"),
    ("logging", LoggingConfig, "logging"),
    ("evaluation", EvalConfig, "evaluation"),
    ("task", TaskConfig, "task"),
    ("rl", RLConfig, "rl"),
    ("objective", ObjectiveConfig, "objective"),
    ("replay", ReplayConfig, "replay"),
    ("rollout", RolloutConfig, "rollout"),
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
    for name, cls, title in COMPONENTS:
        add_config_flags(parser, cls, title, scope=name)
    return parser


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None) -> RunConfig:
    """Parse and validate; raises ConfigError with a clear message on bad input."""
    ns = build_parser().parse_args(argv)
    parts = {}
    for name, cls, _ in COMPONENTS:
        base = preset(ns.model_preset) if cls is ModelConfig else None
        parts[name] = config_from_flags(cls, ns, base, scope=name)
    run = RunConfig(
        stage=ns.stage,
        world_size=world_size if world_size is not None else world_size_from_env(),
        **parts,
    )
    run.validate()
    return run


__all__ = ["RunConfig", "ConfigError", "COMPONENTS", "parse_args", "build_parser"]
