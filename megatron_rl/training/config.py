"""Optimisation, checkpointing and logging settings (Megatron-LM flag names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.run_view import RunView


@dataclass(kw_only=True, frozen=True)
class TrainingConfig:
    """Optimiser and schedule."""

    micro_batch_size: int | None = None
    """Samples per micro-batch on one data-parallel rank. Required, as in Megatron-LM."""
    global_batch_size: int = 64
    """SFT: samples per optimiser step over all data-parallel ranks. RL: responses per RL
    step (the rollout batch, --rl-group-size responses per prompt), split into
    --rl-mini-batch-size gradient updates."""
    train_iters: int = 200
    """SFT: optimiser steps. RL: RL steps (each one rollout batch and its N updates)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up."""
    lr_decay_iters: int | None = None
    """Steps (as --train-iters counts them) to decay the learning rate over; None:
    --train-iters. After them the learning rate stays at --min-lr."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient norm clipping (0 disables)."""
    bf16: bool = False
    """Train in bfloat16 (fp32 master weights); off on CPU by default."""
    use_distributed_optimizer: bool = False
    """Shard optimiser state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = field(default=False, metadata={"store_true": True})
    """Overlap the data-parallel gradient reduction with the backward pass (megatron-core
    DDP)."""
    overlap_param_gather: bool = field(default=False, metadata={"store_true": True})
    """Overlap the distributed optimizer's parameter all-gather with the next forward
    (needs --use-distributed-optimizer and --overlap-grad-reduce)."""
    seed: int = 1234
    """Seed of every random generator."""

    def validate(self, run: RunView) -> None:
        data_parallel_size = run.parallel.data_parallel_size(run.world_size)
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ConfigError(f"--lr-decay-iters must be >= 1, got {self.lr_decay_iters}")
        if self.overlap_param_gather and not (self.use_distributed_optimizer
                                              and self.overlap_grad_reduce):
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer and "
                              "--overlap-grad-reduce")
        if self.micro_batch_size is None:
            raise ConfigError("--micro-batch-size is required (as in Megatron-LM): samples "
                              "per micro-batch on one data-parallel rank")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("--micro-batch-size and --global-batch-size must be >= 1")
        if self.global_batch_size % (self.micro_batch_size * data_parallel_size):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{data_parallel_size}"
            )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}), --lr > 0")
        if self.train_iters < 1:
            raise ConfigError("--train-iters must be >= 1")


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """Where checkpoints go and come from."""

    save: str | None = None
    """Directory to save checkpoints (and metrics.jsonl) to."""
    load: str | None = None
    """Directory to resume from (its latest complete checkpoint)."""
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    no_load_optim: bool = False
    """Load model weights only (e.g. RL from a cold-start checkpoint)."""
    no_load_rng: bool = False
    """Do not restore RNG states."""
    finetune: bool = False
    """Load weights only and start counting steps from 0."""
    keep_last: int = 2
    """Complete checkpoints to keep (older ones are deleted)."""
    allow_random_init: bool = field(default=False, metadata={"flag": "--rl-allow-random-init"})
    """RL with --rl-rollout-url servers and no checkpoint to start from: train from random
    weights anyway. Refused without this flag, because the first weight sync overwrites
    the checkpoint the servers serve with random weights."""

    def validate(self, run: RunView) -> None:
        if self.save_interval < 0:
            raise ConfigError(f"--save-interval must be >= 0, got {self.save_interval}")
        if self.keep_last < 1:
            raise ConfigError(f"--keep-last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    """Where metrics go."""

    log_interval: int = 100
    """Print a metrics line every N steps."""
    tensorboard_dir: str | None = None
    """Write tensorboard events here."""
    wandb_project: str | None = None
    """Log to this wandb project (offline when there is no network)."""
    wandb_exp_name: str | None = None
    """wandb run name."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """wandb mode; offline writes locally for a later `wandb sync`."""
    progress: bool = True
    """Show the rich progress display (rank 0)."""

    def validate(self, run: RunView) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"--log-interval must be >= 1, got {self.log_interval}")


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    """Held-out evaluation: greedy decoding with the trainer's model, and in RL runs
    optionally K samples per prompt from the rollout servers."""

    eval_interval: int = 0
    """Evaluate every N steps (0: only before the first and after the last step)."""
    eval_max_new_tokens: int = 8
    """Longest greedy answer generated during evaluation."""
    eval_micro_batch_size: int = 32
    """Prompts per forward pass during evaluation."""
    eval_samples: int = 0
    """RL only: also sample this many responses per held-out prompt on the rollout
    servers, with the rollouts' sampling settings (temperature, top-p, max new tokens),
    and report their mean accuracy (eval/sampled_accuracy, avg@K: the accuracy of the
    policy RL optimises, where greedy decoding shows only its mode) and eval/pass_at_k.
    Each (prompt, sample) keeps one sampling seed across evaluations, so two evaluations
    differ by the weights, not by the draws. 0: greedy only."""

    def validate(self, run: RunView) -> None:
        if self.eval_max_new_tokens < 1 or self.eval_micro_batch_size < 1:
            raise ConfigError(
                f"--eval-max-new-tokens ({self.eval_max_new_tokens}) and "
                f"--eval-micro-batch-size ({self.eval_micro_batch_size}) must be >= 1"
            )
        if self.eval_samples < 0:
            raise ConfigError(f"--eval-samples must be >= 0, got {self.eval_samples}")
        if run.stage == "sft" and self.eval_samples:
            raise ConfigError("--eval-samples samples on the rollout servers, which only an "
                              "RL run (--stage rl) has; the SFT stage evaluates greedily")
