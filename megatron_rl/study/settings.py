"""What every run of a study shares, and the exact commands built from it.

Only the objective, N, the replay mode and the seed differ between runs; everything else
(learning rate, batch shapes, lengths, precision of the rollout engine) is one setting
for the whole study, so no configuration is tuned on its own.

Off-policiness is varied the paper's way: the mini-batch (B prompts x G responses per
gradient update) is fixed and the rollout batch grows to N mini-batches. Every run makes
the same number of gradient updates on the same number of rollout samples, so runs with
a larger N take fewer RL steps (``updates / N``) with a larger batch each, and cost about
the same.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_rl.study.grid import RunSpec

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "pretrain_rl.py"


class SettingsError(ValueError):
    """Settings that do not fit the grid."""


@dataclass(kw_only=True, frozen=True)
class StudySettings:
    """The workload of every run of the study."""

    model_preset: str = "tiny"
    """Model shape preset of the cold start and every RL run."""
    prompts_per_update: int = 8
    """B: prompts per gradient update; the mini-batch is B x G responses."""
    group_size: int = 8
    """G: responses per prompt."""
    updates: int = 48
    """Gradient updates of each run (RL steps = updates / N). A multiple of every N."""
    eval_every: int = 8
    """Held-out evaluation (and checkpoint) every this many updates; a multiple of every N."""
    eval_size: int = 128
    """Held-out prompts (greedy decoding, and eval_samples sampled responses each)."""
    eval_samples: int = 8
    """Responses sampled per held-out prompt at the rollouts' temperature (--eval-samples):
    the held-out accuracy of the policy RL optimises (avg@K); greedy decoding shows its
    mode only, which RL's sharpening of the distribution does not move."""
    eval_seed: int = 2_000_003
    """Seed of the held-out set, one for the cold start and every run (--rl-eval-seed):
    with the runs' own seeds, 98 of the 116 distinct held-out chain_sum problems of seeds
    1 and 2 were in the cold start's (seed 1234) training stream."""
    max_new_tokens: int = 6
    """Most tokens generated per response (chain_sum answers take at most 4)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    lr: float = 2e-4
    """Learning rate (constant) of every RL run."""
    micro_batch_size: int = 32
    """Responses per forward/backward pass."""
    rollout_dtype: Literal["bf16", "fp32"] = "bf16"
    """Precision of the embedded rollout server (the trainer runs fp32): bf16 makes the
    training-inference discrepancy real, as FP8/BF16 inference does in the paper."""
    rollout_quantization: Literal["none", "fp8", "w8a8_fp8"] = "none"
    """FP8 weights in the rollout server (SGLang's --quantization; the paper's rollouts are
    FP8): fp8 = FP8 weights with bf16 activations, w8a8_fp8 = FP8 activations too."""
    threads: int = 1
    """Torch threads of each trainer and of each rollout server."""
    coldstart_iters: int = 800
    """Supervised steps of the cold start (shared by every run)."""
    coldstart_lr: float = 2e-3
    """Peak learning rate of the cold start (cosine decay, 10 warm-up steps)."""
    coldstart_decay_iters: int = 0
    """Steps the cold start's cosine decays over (--lr-decay-iters); 0: coldstart_iters.
    Larger: the cold start stops early on a longer schedule, exactly the checkpoint of
    step coldstart_iters of that longer run (an under-trained model RL can improve)."""
    coldstart_batch: int = 64
    """Examples per cold-start step."""
    coldstart_seed: int = 1234
    """Seed of the cold start."""
    extra_args: tuple[str, ...] = ()
    """More pretrain_rl.py flags given to every RL run alike."""

    @property
    def mini_batch(self) -> int:
        return self.prompts_per_update * self.group_size

    def steps(self, n: int) -> int:
        return self.updates // n

    def validate(self, ns: Iterable[int]) -> None:
        for name in ("prompts_per_update", "group_size", "updates", "eval_every", "threads",
                     "micro_batch_size", "max_new_tokens", "coldstart_iters"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        if self.coldstart_decay_iters and self.coldstart_decay_iters < self.coldstart_iters:
            raise SettingsError(f"coldstart_decay_iters {self.coldstart_decay_iters} is shorter "
                                f"than coldstart_iters {self.coldstart_iters}")
        if self.eval_samples < 0:
            raise SettingsError("eval_samples must be at least 0")
        if self.group_size < 2:
            raise SettingsError("group_size must be at least 2 (group advantages)")
        for n in sorted(set(ns)):
            for name in ("updates", "eval_every"):
                if getattr(self, name) % n:
                    raise SettingsError(f"{name} = {getattr(self, name)} is not a multiple of "
                                        f"N = {n}: every N must take whole RL steps")
        if self.mini_batch % self.micro_batch_size and self.micro_batch_size < self.mini_batch:
            raise SettingsError(f"micro_batch_size {self.micro_batch_size} does not divide the "
                                f"mini-batch {self.mini_batch}")


def coldstart_args(s: StudySettings, directory: Path) -> list[str]:
    """pretrain_rl.py flags of the cold start; ``--load`` = ``--save`` resumes it."""
    return [
        "--stage", "sft", "--model-preset", s.model_preset, "--load", str(directory),
        "--save", str(directory), "--train-iters", str(s.coldstart_iters),
        "--global-batch-size", str(s.coldstart_batch),
        "--micro-batch-size", str(min(32, s.coldstart_batch)), "--lr", str(s.coldstart_lr),
        "--lr-decay-style", "cosine", "--adam-beta2", "0.95",
        "--lr-decay-iters", str(s.coldstart_decay_iters or s.coldstart_iters),
        "--lr-warmup-iters", "10", "--eval-interval", str(max(1, s.coldstart_iters // 4)),
        "--save-interval", str(max(1, s.coldstart_iters // 4)),
        "--rl-eval-size", str(s.eval_size), "--rl-eval-seed", str(s.eval_seed),
        "--seed", str(s.coldstart_seed), "--no-progress",
    ]


def run_args(s: StudySettings, spec: RunSpec, coldstart: Path, run_dir: Path) -> list[str]:
    """pretrain_rl.py flags of one RL run of the grid."""
    c = spec.config
    steps = s.steps(c.n)
    every = max(1, s.eval_every // c.n)
    return [
        "--stage", "rl", "--model-preset", s.model_preset,
        "--load", str(coldstart), "--save", str(run_dir),
        "--rl-objective", c.objective, "--routing-replay", c.replay,
        "--rl-group-size", str(s.group_size),
        "--global-batch-size", str(s.mini_batch * c.n),
        "--rl-mini-batch-size", str(s.mini_batch),
        "--micro-batch-size", str(min(s.micro_batch_size, s.mini_batch)),
        "--train-iters", str(steps), "--eval-interval", str(every),
        "--save-interval", str(every), "--keep-last", "1",
        "--rl-max-new-tokens", str(s.max_new_tokens), "--rl-temperature", str(s.temperature),
        "--rl-rollout-dtype", s.rollout_dtype, "--rl-rollout-threads", str(s.threads),
        "--rl-rollout-quantization", s.rollout_quantization,
        "--rl-eval-size", str(s.eval_size), "--rl-eval-seed", str(s.eval_seed),
        "--eval-samples", str(s.eval_samples),
        "--lr", str(s.lr), "--lr-decay-style", "constant", "--adam-beta2", "0.95",
        "--seed", str(spec.seed), "--rl-rollout-seed", str(spec.seed),
        "--no-progress", "--no-rl-rollout-progress",
        *s.extra_args,
    ]


def command(args: list[str]) -> list[str]:
    """The full command line: one process, no launcher (the loop initialises a world of
    one by itself, and skips torchrun's extra process)."""
    return [sys.executable, str(ENTRY), *args]


def environment(s: StudySettings) -> dict[str, str]:
    """Variables set for every run (on top of the caller's environment)."""
    return {"OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads),
            "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


__all__ = ["ROOT", "SettingsError", "StudySettings", "coldstart_args", "command",
           "environment", "run_args"]
