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

from megatron_rl.config.flags import (
    ConfigError,
    add_config_flags,
    check_finite,
    config_from_flags,
)
from megatron_rl.data.tasks import TaskConfig
from megatron_rl.distributed import ParallelConfig, planned_world_size, world_size_from_env
from megatron_rl.loss import ObjectiveConfig
from megatron_rl.model.config import ArchitectureFlags, ModelConfig, preset
from megatron_rl.replay.config import ReplayConfig
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.training.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    TrainingConfig,
)
from megatron_rl.training.dynamic_sampling import DynamicSamplingConfig
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
    sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    architecture: ArchitectureFlags = field(default_factory=ArchitectureFlags)

    def components(self) -> Iterator[tuple[str, object]]:
        """(name, config) of every component, in flag-group order."""
        for name, _, _ in COMPONENTS:
            yield name, getattr(self, name)

    def validate(self) -> None:
        """Each component checks itself against the whole run (layouts need the model
        and world size, batch arithmetic needs the parallel layout, ...)."""
        for _, component in self.components():
            check_finite(component)
        for _, component in self.components():
            component.validate(self)

    def check_initial_weights(self, has_checkpoint: bool) -> None:
        """RL on external servers from random weights would push those weights over the
        model the servers serve at the first sync: only with --rl-allow-random-init."""
        if (self.stage == "rl" and self.rollout.urls and not has_checkpoint
                and not self.checkpoint.allow_random_init):
            raise ConfigError(
                "RL with --rl-rollout-url but no checkpoint to start from (no --load, nothing "
                "to resume in --save): the first weight sync would overwrite the servers' "
                "model with random weights; pass --load <checkpoint>, or "
                "--rl-allow-random-init to train from random weights anyway"
            )

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
    ("sampling", DynamicSamplingConfig, "dynamic sampling"),
    ("objective", ObjectiveConfig, "objective"),
    ("replay", ReplayConfig, "replay"),
    ("rollout", RolloutConfig, "rollout"),
    ("architecture", ArchitectureFlags, "Megatron-LM architecture flags"),
)

# Megatron-LM's own RL flags (megatron/training/arguments.py) as other spellings of ours.
MEGATRON_RL_ALIASES: dict[str, tuple[str, ...]] = {
    "--rl-group-size": ("--grpo-group-size",),
    "--rl-clip-low": ("--grpo-clamp-eps-lower",),
    "--rl-clip-high": ("--grpo-clamp-eps-upper",),
    "--rl-sequence-packing": ("--rl-use-sequence-packing",),
    "--rl-temperature": ("--rl-default-temperature",),
    "--rl-top-p": ("--rl-default-top-p",),
    "--rl-top-k": ("--rl-default-top-k",),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_rl.py",
        description="RL of MoE models on megatron-core (MiniRL, routing replay R2/R3).",
    )
    parser.add_argument("--stage", choices=["sft", "rl"], default="rl",
                        help="sft: cold-start supervised training; rl: the RL loop")
    parser.add_argument("--perform-rl-step", dest="stage", action="store_const", const="rl",
                        default=argparse.SUPPRESS,
                        help="Megatron-LM's spelling of --stage rl")
    parser.add_argument("--model-preset", default="tiny",
                        help="shape preset the --num-layers etc. flags override "
                             "(tiny, qwen3-30b-a3b)")
    launch = parser.add_argument_group("launch")
    launch.add_argument("--dry-run", action="store_true",
                        help="check the whole configuration as the real run would and print "
                             "its plan (groups, parameters, memory, tokens per step), then "
                             "exit: no GPU, no process group, no server contacted")
    launch.add_argument("--world-size", type=int, default=None,
                        help="processes of the launch; a dry run takes it from here, else "
                             "from WORLD_SIZE, SLURM_NNODES x --nproc-per-node or "
                             "SLURM_NTASKS; a real run checks it against WORLD_SIZE")
    launch.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes per node, as given to torchrun (with SLURM_NNODES "
                             "it makes a dry run's world size)")
    for name, cls, title in COMPONENTS:
        add_config_flags(parser, cls, title, scope=name, aliases=MEGATRON_RL_ALIASES)
    return parser


@dataclass(frozen=True)
class Launch:
    """A parsed command line: the run, and how this launch treats it."""

    run: RunConfig
    dry_run: bool = False
    world_size_source: str = "WORLD_SIZE"
    """Where ``run.world_size`` came from (printed by the dry run)."""


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None) -> RunConfig:
    """Parse and validate; raises ConfigError with a clear message on bad input."""
    return parse_launch(argv, world_size).run


def parse_launch(argv: Sequence[str] | None = None, world_size: int | None = None) -> Launch:
    """Parse and validate the command line; ``world_size`` (tests) overrides the
    launcher's."""
    ns = build_parser().parse_args(argv)
    if world_size is not None:
        source = "given"
    elif ns.dry_run:
        world_size, source = planned_world_size(ns.world_size, ns.nproc_per_node)
    else:
        world_size, source = world_size_from_env(), "WORLD_SIZE"
        if ns.world_size is not None and ns.world_size != world_size:
            raise ConfigError(
                f"--world-size {ns.world_size} but the launcher started {world_size} "
                f"process(es) (WORLD_SIZE)"
            )
    parts = {}
    for name, cls, _ in COMPONENTS:
        base = preset(ns.model_preset) if cls is ModelConfig else None
        parts[name] = config_from_flags(cls, ns, base, scope=name)
    tokenizer_model = parts["architecture"].tokenizer_model
    if tokenizer_model is not None and not hasattr(ns, "model.tokenizer"):
        parts["model"] = parts["model"].replace(tokenizer=tokenizer_model)
    run = RunConfig(stage=ns.stage, world_size=world_size, **parts)
    run.validate()
    return Launch(run=run, dry_run=ns.dry_run, world_size_source=source)


__all__ = ["RunConfig", "ConfigError", "COMPONENTS", "Launch", "parse_args", "parse_launch",
           "build_parser"]
