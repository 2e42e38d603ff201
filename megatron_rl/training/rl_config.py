"""Settings of the RL loop itself (the objective, replay and rollout have their own)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.import_path import load_callable
from megatron_rl.config.run_view import RunView


@dataclass(kw_only=True, frozen=True)
class RLConfig:
    """One RL step: B prompts x G responses, then N = rollout batch / mini-batch updates."""

    flag_prefix: ClassVar[str] = "--rl-"

    group_size: int = 8
    """G: responses per prompt. --global-batch-size counts responses (B x G)."""
    mini_batch_size: int | None = None
    """Responses per gradient update; N = --global-batch-size / this is the paper's
    off-policiness. None: one update per rollout batch (on-policy)."""
    sequence_packing: bool = False
    """Pack several responses into each row of --seq-length tokens."""
    share_prompts: bool | None = None
    """Lay the G responses of a prompt out in the trainer's passes as a tree over one copy
    of the prompt (megatron_rl.data.packing): each response attends to the shared prefix
    and causally to itself, at its own positions, so its log-probs and gradients are
    those of a row of its own (up to the rounding of sums taken in another order), at
    P - 1 + G x R positions instead of G x (P + R - 1). A micro-batch then holds
    --micro-batch-size responses in one row per prompt (cut at --seq-length). Needs an
    attention that takes an explicit mask -- megatron-core's local layer spec, which the
    model uses without Transformer Engine (the CPU path) -- and neither context
    parallelism, --rl-sequence-packing nor a load-balancing loss (--moe-aux-loss-coeff,
    which counts tokens). Default: on where it applies."""
    router_agreement: bool = True
    """Ask the rollout servers for routed experts even without r3, to measure how often
    the trainer's own top-k agrees with the inference engine's."""
    old_logprobs_from_first_update: bool = True
    """pi_old of the first mini-batch is pi_theta of its own update (the weights have not
    moved yet), so its separate pi_old forward is skipped: the first update's forward
    scores it, with the same routing (R3 replays the rollout's routes in both; without
    replay both route freely and the routers are observed) and the same statistics.
    Saves 1/N of the pi_old pass (all of it at N = 1). R2 keeps the whole pass: it records
    the routes of every mini-batch there."""
    weight_version_check: Literal["strict", "warn", "off"] = "strict"
    """Every rollout sample must carry the weight version its batch was generated with:
    the policy version the trainer last synced, or under --rl-rollout-ahead 1 exactly the
    one before it (any other version is refused, or only warned about)."""
    rollout_ahead: int = 0
    """K: steps the rollouts run ahead of the trainer. 0: each step generates its batch,
    then trains on it (on-policy). 1: the servers generate step k+1's batch, with the
    weights of version k-1, while the trainer updates on step k's batch; the batch is one
    version stale (rollout/staleness), which MiniRL's pi_old/mu_old factor corrects and
    R3 replays the generating policy's routes for. The first step (and a resume without a
    generated batch) generates its batch first, staleness 0. Larger K is refused."""
    rollout_function: str | None = None
    """A multi-turn (tool) rollout as module:function: a coroutine taking a
    megatron_rl.rollout.trajectory.RolloutContext (task item, tokenizer, generate() per
    model turn, insert() for tool tokens) and returning a Trajectory; only the model's
    tokens are trained on. Example: megatron_rl.rollouts.calculator:calculator_rollout."""
    keep_weight_versions: int = 2
    """Exported weight versions kept on disk for the rollout servers."""
    sync_dir: str | None = None
    """Where exported weights go (default: <save>/weights or a temporary directory)."""
    weight_sync: Literal["disk", "distributed"] | None = None
    """How the rollout servers get the weights after each step. 'distributed': rank 0
    gathers the Hugging Face tensors and broadcasts them, in buckets, to every server over a
    process group (SGLang's /update_weights_from_distributed; NCCL between GPUs, gloo on
    CPU): nothing is written or read, no file system need be shared, the group is built once
    (rebuilt when a server restarts); the servers must reach trainer rank 0 over TCP, and
    SGLang servers with --pp-size > 1 or --dp-size > 1 (without DP attention) are refused
    (SGLang numbers their ranks rank_offset + tp_rank, so they would collide). 'disk': rank
    0 writes a Hugging Face checkpoint under --rl-sync-dir and each server loads it
    (/update_weights_from_disk): needs a directory the servers can read, takes servers of
    any layout, and keeps each version on disk for a restarted server to reload. Default:
    distributed with --rl-rollout-url servers (Qwen3-30B-A3B: 61 GB, ~7 s over NCCL against
    ~50 s through a shared file system, modelled by benchmarks/bench_weight_sync.py); disk
    for the embedded servers, where distributed is no faster (tiny preset, 2 servers on a
    shared 2-core VM: 0.09-0.3 s against 0.07-0.1 s) and each version stays on disk for a
    restarted server to start from."""
    weight_sync_bucket_mb: int = 512
    """Distributed weight sync: megabytes of tensors announced and broadcast per request."""
    weight_sync_timeout_s: float = field(
        default=600.0, metadata={"flag": "--rl-weight-sync-timeout"}
    )
    """Distributed weight sync: seconds to build the group or finish one bucket."""

    def weight_sync_mode(self, run: RunView) -> Literal["disk", "distributed"]:
        """--rl-weight-sync, or its default for these servers."""
        if self.weight_sync is not None:
            return self.weight_sync
        return "disk" if run.rollout.embedded else "distributed"

    def prompt_sharing(self, run: RunView, transformer_engine: bool) -> bool:
        """Whether the passes share prompts (--rl-share-prompts, or where it applies)."""
        blocker = ("Transformer Engine's attention takes no tree mask" if transformer_engine
                   else self._sharing_blocker(run))
        if blocker is None:
            return self.share_prompts is not False
        if self.share_prompts:
            raise ConfigError(f"--rl-share-prompts: {blocker}")
        return False

    def _sharing_blocker(self, run: RunView) -> str | None:
        if self.sequence_packing:
            return "not with --rl-sequence-packing"
        if run.model.moe_aux_loss_coeff > 0:
            # The load-balancing loss would see a shared prompt token once instead of G
            # times: another objective, not the same one computed faster.
            return (f"--moe-aux-loss-coeff {run.model.moe_aux_loss_coeff}: the load-balancing "
                    "loss counts tokens, and a shared prompt's would count once")
        if run.parallel.context_parallel_size > 1:
            return (f"--context-parallel-size {run.parallel.context_parallel_size} cannot "
                    "split a tree of responses")
        return None

    def num_updates(self, global_batch_size: int) -> int:
        mini = self.mini_batch_size or global_batch_size
        return global_batch_size // mini

    def validate(self, run: RunView) -> None:
        world_size = run.world_size
        g = self.group_size
        gbs = run.training.global_batch_size
        if g < 2:
            raise ConfigError(
                f"--rl-group-size {g}: group-relative advantages need at least 2 responses"
            )
        if gbs % g:
            raise ConfigError(
                f"--global-batch-size {gbs} (responses per rollout batch) is not a multiple "
                f"of --rl-group-size {g}"
            )
        mini = self.mini_batch_size or gbs
        if mini < 1 or gbs % mini:
            raise ConfigError(
                f"--global-batch-size {gbs} is not divisible by --rl-mini-batch-size {mini}"
            )
        if self.share_prompts and (blocker := self._sharing_blocker(run)):
            raise ConfigError(f"--rl-share-prompts: {blocker}")
        dp = run.parallel.data_parallel_size(world_size)
        prompts = gbs // g
        if prompts % dp:
            raise ConfigError(
                f"{prompts} prompts per rollout batch (--global-batch-size / --rl-group-size) "
                f"do not split over {dp} data-parallel ranks (groups stay on one rank)"
            )
        if self.weight_sync_bucket_mb < 1 or self.weight_sync_timeout_s <= 0:
            raise ConfigError(
                f"--rl-weight-sync-bucket-mb ({self.weight_sync_bucket_mb}) must be >= 1 and "
                f"--rl-weight-sync-timeout ({self.weight_sync_timeout_s}) > 0"
            )
        if run.rollout.colocate and self.weight_sync == "distributed":
            raise ConfigError(
                "--rl-weight-sync distributed with --rl-rollout-colocate: the colocated "
                "server lives in trainer rank 0's process, which cannot join a weight-update "
                "group with itself; use --rl-weight-sync disk (the default)"
            )
        if self.rollout_ahead not in (0, 1):
            raise ConfigError(
                f"--rl-rollout-ahead {self.rollout_ahead}: only 0 (generate, then train) and "
                f"1 (generate the next batch while training on this one) are supported"
            )
        if self.rollout_function is not None:
            if self.rollout_ahead:
                raise ConfigError(
                    "--rl-rollout-function with --rl-rollout-ahead 1 is not supported yet "
                    "(the checkpointed batch does not carry the trajectories' loss masks)")
            self.load_rollout_function()
        per_rank = mini // dp if mini % dp == 0 else None
        if per_rank is None or per_rank % run.training.micro_batch_size:
            raise ConfigError(
                f"--rl-mini-batch-size {mini} must split into data-parallel size {dp} x "
                f"--micro-batch-size {run.training.micro_batch_size} pieces"
            )

    def load_rollout_function(self):
        """The --rl-rollout-function coroutine function (refused if it is not one)."""
        try:
            fn = load_callable(self.rollout_function, what="--rl-rollout-function")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not inspect.iscoroutinefunction(fn):
            raise ConfigError(f"--rl-rollout-function {self.rollout_function} is not an async "
                              f"function (async def fn(ctx: RolloutContext) -> Trajectory)")
        return fn
