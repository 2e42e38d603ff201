"""The RL loop: prompts -> rollout -> rewards -> advantages -> pi_old -> N updates ->
weight sync, one step after another, with evaluation, metrics and checkpoints.

Each stage of a step is one small function below; :func:`run_rl` reads like the
algorithm. Launched by ``pretrain_rl.py`` under torchrun (or SLURM).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl.advantages import compute_advantages, rollout_stats
from megatron_rl.arguments import RunConfig
from megatron_rl.data.tasks import Task, TaskItem
from megatron_rl.distributed import data_group, init_distributed, is_rank0
from megatron_rl.loss import ObjectiveConfig, derived_metrics
from megatron_rl.metrics.progress import RLProgress
from megatron_rl.metrics.stats import Stat, all_reduce_stats, merge_stats, results
from megatron_rl.metrics.writer import MetricsWriter
from megatron_rl.model.provider import transformer_engine_available
from megatron_rl.model.tokenizer import PromptEncoder, load_tokenizer
from megatron_rl.rewards import GroupScorer, RemoteRewards, reward_stats
from megatron_rl.rewards.remote import resolve_api_key
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.trajectory import TrajectoryGenerator
from megatron_rl.rollout.types import RolloutRequest, RolloutSample
from megatron_rl.training import checkpoint as ckpt
from megatron_rl.training.dynamic_sampling import DynamicSampler
from megatron_rl.training.engine import MegatronEngine, data_parallel_info
from megatron_rl.training.evaluation import evaluate, sampled_evaluate
from megatron_rl.training.reference import COMMON_KEY as REFERENCE_KEY
from megatron_rl.training.reference import ReferencePolicy, start_checkpoint
from megatron_rl.training.rl_config import RLConfig
from megatron_rl.training.rl_data import (
    RouteShare,
    build_requests,
    shard_prompts,
    share_samples,
    to_train_samples,
)
from megatron_rl.training.rl_passes import (
    BatchLayout,
    mini_batches,
    old_logprobs,
    policy_updates,
)
from megatron_rl.training.rollout_ahead import COMMON_KEY as AHEAD_KEY
from megatron_rl.training.rollout_ahead import (
    AheadGeneration,
    RolloutBatch,
    common_entry,
    load_batch,
    save_batch,
)
from megatron_rl.training.rollout_service import RolloutService

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What a checkpoint must restore for the run to continue identically."""

    step: int = 0
    data_position: int = 0
    policy_version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepRecord:
    """Metrics and timings of one step, filled stage by stage."""

    stats: dict[str, Stat] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

    def add_stats(self, stats: dict[str, Stat]) -> None:
        self.stats = merge_stats([self.stats, stats])


def run_rl(run: RunConfig) -> dict[str, float]:
    """Train the policy with RL; returns the last step's metrics."""
    init_distributed(run.parallel, run.model.num_layers, run.training.seed)
    loop = RLLoop(run)
    try:
        metrics = loop.train()
    except BaseException:
        loop.close(clean=False)
        raise
    loop.close(clean=True)
    return metrics


class RLLoop:
    """All the state of one RL run on this rank."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.rl: RLConfig = run.rl
        self.objective: ObjectiveConfig = run.objective
        self.rollout_cfg: RolloutConfig = run.rollout
        self.replay_mode: str = run.replay.routing_replay
        self.tokenizer = load_tokenizer(run.model.tokenizer, run.model.vocab_size)
        self.task = Task(run.task, seed=run.training.seed)
        self.prompts = PromptEncoder.for_task(self.tokenizer, run.task, run.model.tokenizer)
        self.sampler = (DynamicSampler(run.sampling, self.rl.group_size)
                        if run.sampling.filter_groups else None)
        # Routers can always be observed (router agreement); replay itself additionally
        # refuses, at start-up, models under which it cannot be exact.
        self.engine = MegatronEngine(
            run.model, run.parallel, run.training, routing_replay=self.replay_mode != "none",
            updates_per_step=self.rl.num_updates(run.training.global_batch_size))
        # Built before _load: its initialisation draws random numbers, which a resume
        # then restores past, as an uninterrupted run had.
        self.reference = ReferencePolicy(run, routing_replay=self.replay_mode != "none") \
            if self.objective.uses_reference else None
        self.start_checkpoint: dict[str, Any] | None = None
        self.state = self._load()
        if self.reference is not None:
            self.reference.load(self.start_checkpoint)
        self.replay = _make_replay(self.engine, run)
        self.group, self.leader, self.members = data_group()
        self.is_leader = dist.get_rank() == self.leader
        self.ahead_batch: RolloutBatch | None = self._load_ahead_batch()
        """The next step's batch, generated ahead (--rl-rollout-ahead 1) or restored."""
        self.ahead_job: AheadGeneration | None = None
        # Dynamic sampling's rounds exchange tallies while the trainer runs collectives of
        # its own: on a group of their own, the two never interleave.
        self.ahead_group = (dist.new_group(backend="gloo")
                            if self.rl.rollout_ahead and self.sampler is not None else None)
        self.layout = BatchLayout(
            micro_batch_size=run.training.micro_batch_size,
            seq_length=run.model.seq_length,
            pack=self.rl.sequence_packing,
            share_prompts=self.rl.prompt_sharing(run, transformer_engine_available()),
            pad_id=self.tokenizer.pad_token_id or 0,
            route_shape=(len(self.replay.stage_moe_positions()), run.model.moe_router_topk,
                         run.model.num_experts),
        )
        if is_rank0():
            logger.info("trainer passes: %s", "one row per prompt, its responses sharing it "
                        "(--rl-share-prompts)" if self.layout.share_prompts
                        else "one row per response")
        self.want_routes = self.replay_mode == "r3" or self.rl.router_agreement
        task = run.task
        self.remote_rewards = RemoteRewards(
            task.reward_url, concurrency=task.reward_concurrency, retries=task.reward_retries,
            timeout_s=task.reward_timeout_s, api_key=resolve_api_key(task.reward_api_key_file),
        ) if task.reward_url and self.is_leader else None
        self.reward_time: dict[str, float] = {}
        """time/reward and time/reward_wait of the batch being generated, over its rounds."""
        self.service = RolloutService(
            self.engine, run, self.rollout_cfg, self.tokenizer,
            return_routed_experts=self.want_routes, is_leader=self.is_leader,
            sync_dir=self.rl.sync_dir, keep_versions=self.rl.keep_weight_versions,
        )
        self.trajectories = None if self.rl.rollout_function is None else TrajectoryGenerator(
            None, self.rl.load_rollout_function(), tokenizer=self.tokenizer,
            score=self.task.score, max_tokens=run.model.seq_length + 1)
        """Multi-turn rollouts (--rl-rollout-function); bound to the client when used."""
        self.writer = MetricsWriter(
            run.checkpoint.save, tensorboard_dir=run.logging.tensorboard_dir,
            wandb_project=run.logging.wandb_project, wandb_exp_name=run.logging.wandb_exp_name,
            wandb_mode=run.logging.wandb_mode, config=_flat_config(run),
            resume_step=self.state.step,
        )
        self.progress = RLProgress(run.training.train_iters, self.state.step,
                                   enabled=run.logging.progress)

    # ---- the loop -------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        run = self.run
        # The servers serve exactly the policy being trained (fresh, or restored).
        self.service.start(version=self.state.policy_version)
        metrics: dict[str, float] = {}
        if self.state.step == 0 and run.evaluation.eval_interval >= 0:
            metrics = self.evaluate()
            self.writer.write(0, metrics)
        while self.state.step < run.training.train_iters:
            metrics = self.step()
        return metrics

    def step(self) -> dict[str, float]:
        record = StepRecord()
        started = time.perf_counter()
        step = self.state.step + 1
        samples = self.rollout(step, record)
        train_samples = self.prepare(samples, record)
        self.compute_old_logprobs(train_samples, record)
        self.compute_ref_logprobs(train_samples, record)
        self.update(train_samples, record)
        self.await_ahead(record)
        self.sync_weights(step, record)
        self.state.step = step
        self.maybe_evaluate(step, record)
        record.scalars["time/step"] = time.perf_counter() - started
        metrics = self.finish_step(step, record)
        self.maybe_save(step)
        return metrics

    def prompts_per_step(self) -> int:
        return self.run.training.global_batch_size // self.rl.group_size

    def draw_prompts(self, count: int) -> list[TaskItem]:
        """The stream's next ``count`` items (the same on every rank); the data position
        saved in checkpoints moves past them."""
        items, self.state.data_position = self.task.next_items(self.state.data_position, count)
        return items

    def next_prompts(self) -> dict[int, TaskItem]:
        """This data-parallel rank's prompts of the next rollout batch."""
        dp_rank, dp_size = data_parallel_info()
        return shard_prompts(self.draw_prompts(self.prompts_per_step()), dp_rank, dp_size)

    def rollout(self, step: int, record: StepRecord) -> list[RolloutSample]:
        """This step's batch, shared with the data group: generated ahead during the
        previous step (--rl-rollout-ahead 1; or restored from the checkpoint), else now.
        Under --rl-rollout-ahead 1 the next step's generation starts here, with the
        weights the servers hold now, and runs while this step trains."""
        t0 = time.perf_counter()
        batch, self.ahead_batch = self.ahead_batch, None
        if batch is None:
            batch = self.generate(step)
        self.check_batch(batch, step, record)
        if self.rl.rollout_ahead and step < self.run.training.train_iters:
            exchange = (_all_gather if self.ahead_group is None
                        else lambda value: _all_gather(value, self.ahead_group))
            self.ahead_job = AheadGeneration(
                lambda: self.generate(step + 1, exchange=exchange), step + 1)
        record.add_stats(batch.stats)
        record.scalars.update(batch.scalars)
        share = RouteShare(self.replay.stage_moe_positions()) if self.want_routes else None
        samples = share_samples(batch.samples, self.group, self.leader, self.members, share)
        record.scalars["time/rollout"] = time.perf_counter() - t0
        return samples

    def check_batch(self, batch: RolloutBatch, step: int, record: StepRecord) -> None:
        """A batch is trained exactly one version behind the trainer if it was generated
        ahead, else with the trainer's own version; its samples must all carry it."""
        expected = self.state.policy_version - (1 if batch.ahead else 0)
        if batch.step != step or batch.version != expected:
            raise RuntimeError(
                f"step {step} (trainer at policy version {self.state.policy_version}) got the "
                f"rollout batch of step {batch.step}, generated by version {batch.version}; "
                f"expected version {expected}")
        if self.is_leader:
            self.service.check_versions(batch.samples, self.rl.weight_version_check,
                                        expected=str(batch.version))
        record.scalars["rollout/staleness"] = float(self.state.policy_version - batch.version)
        record.scalars["rollout/weight_version"] = float(batch.version)
        if batch.ahead:
            record.scalars["time/rollout_ahead"] = batch.generate_s

    def await_ahead(self, record: StepRecord) -> None:
        """Wait for the batch generated ahead: the weights must not change under it."""
        if self.ahead_job is None:
            return
        t0 = time.perf_counter()
        job, self.ahead_job = self.ahead_job, None
        self.ahead_batch = job.result()
        # The overlap is real when this wait is short against the generation's own time
        # (time/rollout_ahead of the next step).
        record.scalars["time/rollout_wait"] = time.perf_counter() - t0

    def generate(self, step: int, exchange=None) -> RolloutBatch:
        """Prompts, rollout, rewards and advantages of step ``step``'s batch on the data
        group's leader (with --rl-filter-groups, over as many rounds as it takes to fill
        the batch), with the weights the servers hold now."""
        t0 = time.perf_counter()
        version = self.state.policy_version
        items = self.next_prompts()
        record = StepRecord()
        self.reward_time = {"time/reward": 0.0, "time/reward_wait": 0.0}
        samples: list[RolloutSample] | None = None
        if self.sampler is None:
            if self.is_leader:
                samples = self.rollout_round(items, step, version)
        else:
            dp_rank, dp_size = data_parallel_info()
            batch = self.sampler.sample(
                items, need=len(items), prompts_per_step=self.prompts_per_step(),
                dp_rank=dp_rank, dp_size=dp_size, is_leader=self.is_leader,
                generate=lambda round_items: self.rollout_round(round_items, step, version),
                draw=self.draw_prompts, exchange=exchange or _all_gather)
            samples = batch.samples
            record.add_stats(batch.stats)
            record.scalars.update(batch.scalars)
        if self.is_leader:
            # Everything below describes the batch that reaches the trainer.
            record.add_stats(reward_stats(samples))
            record.scalars.update(self.reward_time)
            record.add_stats(_advantages(samples, self.objective))
            record.add_stats(_sample_stats(samples))
        return RolloutBatch(step=step, version=version, samples=samples, stats=record.stats,
                            scalars=record.scalars, generate_s=time.perf_counter() - t0)

    def rollout_round(self, items: dict[int, TaskItem], step: int,
                      version: int) -> list[RolloutSample]:
        """One generation round trip for ``items`` (keyed by prompt index in the step),
        scored; the servers hold weight ``version``. Data-group leaders only."""
        requests = build_requests(items, self.prompts, self.rl.group_size)
        self.progress.start_rollout(len(requests))
        # Each group is scored as soon as its last sample is back, overlapping generation.
        scorer = GroupScorer(items, self.rl.group_size, self.task, self.tokenizer,
                             remote=self.remote_rewards)

        def arrived(sample: RolloutSample) -> None:
            self.progress.rollout_advance()
            scorer.on_sample(sample)

        if self.trajectories is None:
            samples = self.service.generate(requests, f"step{step}", on_sample=arrived)
            times = scorer.finish(samples)
        else:
            samples = self.service.generate_trajectories(
                requests, items, f"step{step}", self.trajectories,
                on_sample=lambda _: self.progress.rollout_advance())
            # A rollout function may have scored its trajectory itself (its final answer).
            times = scorer.finish([s for s in samples if s.reward is None])
        for name, seconds in times.items():
            self.reward_time[name] += seconds
        self.service.check_versions(samples, self.rl.weight_version_check,
                                    expected=str(version))
        return samples

    def prepare(self, samples: list[RolloutSample], record: StepRecord):
        advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        train_samples = to_train_samples(samples, advantages)
        if not self.want_routes:
            for s in train_samples:
                s.routes = None
        return train_samples

    def old_pass_mode(self) -> str:
        """Routing of the pi_old pass, as the replay config decides it."""
        return self.run.replay.old_logprob_mode(have_rollout_routes=self.want_routes)

    def first_update_is_old_pass(self) -> bool:
        """See RLConfig.old_logprobs_from_first_update."""
        return self.rl.old_logprobs_from_first_update and self.old_pass_mode() != "record"

    def compute_old_logprobs(self, samples, record: StepRecord) -> None:
        t0 = time.perf_counter()
        if self.first_update_is_old_pass():
            # The first mini-batch is scored by its own update (see update()).
            n = self.rl.num_updates(self.run.training.global_batch_size)
            samples = [s for mini in mini_batches(samples, n)[1:] for s in mini]
        stats = old_logprobs(
            self.engine, samples, self.layout, replay=self.replay,
            replay_mode=self.old_pass_mode(), record_routes=self.replay_mode == "r2",
            temperature=self.rollout_cfg.temperature, carry_routes=self.want_routes,
        )
        record.add_stats(stats)
        record.scalars["time/logprob"] = time.perf_counter() - t0

    def compute_ref_logprobs(self, samples, record: StepRecord) -> None:
        """pi_ref of every sample (--rl-kl-coef > 0), after the pi_old pass."""
        if self.reference is None:
            return
        t0 = time.perf_counter()
        record.add_stats(self.reference.score(samples, self.layout,
                                              have_rollout_routes=self.want_routes,
                                              temperature=self.rollout_cfg.temperature))
        record.scalars["time/reference"] = time.perf_counter() - t0

    def update(self, samples, record: StepRecord) -> None:
        t0 = time.perf_counter()
        n = self.rl.num_updates(self.run.training.global_batch_size)
        mode = self.run.replay.update_mode()
        self.progress.start_updates(n)
        outcomes = policy_updates(
            self.engine, samples, self.layout, self.objective, n, replay=self.replay,
            replay_mode=mode, temperature=self.rollout_cfg.temperature,
            on_update=self.progress.update_advance,
            first_as_old_mode=self.old_pass_mode() if self.first_update_is_old_pass() else None,
        )
        skipped = 0
        for u, (result, stats) in enumerate(outcomes):
            record.add_stats(stats)
            for name in ("train/staleness_kl", "train/kl_ref"):
                if name in stats:
                    record.stats[f"{name}/update_{u}"] = stats[name]
            skipped += int(result.skipped)
            record.scalars[f"train/grad_norm/update_{u}"] = result.grad_norm
        record.scalars["train/grad_norm"] = outcomes[-1][0].grad_norm
        record.scalars["train/lr"] = outcomes[-1][0].lr
        record.scalars["train/updates"] = float(n)
        record.scalars["train/skipped_updates"] = float(skipped)
        record.scalars["time/update"] = time.perf_counter() - t0

    def sync_weights(self, step: int, record: StepRecord) -> None:
        t0 = time.perf_counter()
        self.state.policy_version = step
        record.scalars.update(self.service.sync(version=step))
        record.scalars["time/sync"] = time.perf_counter() - t0

    def maybe_evaluate(self, step: int, record: StepRecord) -> None:
        interval = self.run.evaluation.eval_interval
        if (interval and step % interval == 0) or step == self.run.training.train_iters:
            t0 = time.perf_counter()
            record.scalars.update(self.evaluate())
            record.scalars["time/eval"] = time.perf_counter() - t0

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy (collective); with --eval-samples, global rank 0 (a
        data-group leader, the rank that writes metrics) adds the sampled accuracy of the
        weights the servers hold now, which are the trainer's (evaluation follows the
        sync)."""
        metrics = evaluate(self.engine, self.task, self.tokenizer, self.run)
        count = self.run.evaluation.eval_samples
        if count and dist.get_rank() == 0:
            def generate(requests: list[RolloutRequest]) -> list[RolloutSample]:
                samples = self.service.generate(requests, "eval")
                self.service.check_versions(samples, self.rl.weight_version_check)
                return samples

            metrics.update(sampled_evaluate(generate, self.task, self.tokenizer,
                                            self.prompts, count))
        return metrics

    def finish_step(self, step: int, record: StepRecord) -> dict[str, float]:
        stats = all_reduce_stats(record.stats)
        metrics = results(stats)
        metrics.update(derived_metrics(metrics))
        metrics.update(record.scalars)
        metrics["rollout/policy_version"] = float(self.state.policy_version)
        self.writer.write(step, metrics)
        self.progress.end_step(step, metrics)
        return metrics

    def maybe_save(self, step: int) -> None:
        cp = self.run.checkpoint
        if cp.save and ((cp.save_interval and step % cp.save_interval == 0)
                        or step == self.run.training.train_iters):
            ahead = self.ahead_batch
            dp_rank, dp_size = data_parallel_info()
            ckpt.save_checkpoint(self.engine, cp.save, step, {
                "stage": "rl", "data_position": self.state.data_position,
                "policy_version": self.state.policy_version,
                REFERENCE_KEY: self.start_checkpoint,
                AHEAD_KEY: None if ahead is None else common_entry(ahead, dp_size),
            }, keep_last=cp.keep_last,
                write_extra=(lambda directory: save_batch(directory, ahead, dp_rank))
                if ahead is not None and self.is_leader else None)
            if is_rank0():
                self.tokenizer.save_pretrained(cp.save)

    # ---- set-up and tear-down -------------------------------------------------------

    def _load(self) -> LoopState:
        """Resume an RL run, or start RL from a cold-start (SFT) checkpoint's weights."""
        cp = self.run.checkpoint
        source = ckpt.find_load_source(cp, "rl")
        self.start_checkpoint = start_checkpoint(source)
        if source is None:
            return LoopState()
        if source.resume:
            common = ckpt.load_checkpoint(self.engine, source.directory, step=source.step,
                                          load_optimizer=not cp.no_load_optim,
                                          load_rng=not cp.no_load_rng)
            logger.info("resuming RL from step %d (%s)", common["step"], source.directory)
            extra = {}
            if common.get(AHEAD_KEY) is not None:
                extra[AHEAD_KEY] = (source.path, common[AHEAD_KEY])
            return LoopState(step=common["step"], data_position=common["data_position"],
                             policy_version=common["policy_version"], extra=extra)
        # The cold start's Adam moments come along (unless --no-load-optim): a fresh Adam's
        # first steps move every weight by about the learning rate, which knocks a small
        # converged model off its optimum before RL helps.
        ckpt.load_checkpoint(self.engine, source.directory, step=source.step,
                             load_optimizer=not cp.no_load_optim, load_rng=False,
                             load_scheduler=False)
        logger.info("starting RL from %s (stage %s)%s", source.directory,
                    source.common.get("stage"),
                    "" if cp.no_load_optim else " with its optimiser state")
        return LoopState()

    def _load_ahead_batch(self) -> RolloutBatch | None:
        """The batch a resumed checkpoint had generated ahead: trained next, as the
        uninterrupted run did (whatever this run's --rl-rollout-ahead)."""
        if AHEAD_KEY not in self.state.extra:
            return None
        path, entry = self.state.extra.pop(AHEAD_KEY)
        dp_rank, dp_size = data_parallel_info()
        batch = load_batch(path, entry, dp_rank, dp_size, self.is_leader)
        logger.info("resuming with the rollout batch of step %d generated ahead by policy "
                    "version %d (%s)", batch.step, batch.version, path)
        return batch

    def close(self, clean: bool = True) -> None:
        self.progress.close()
        self.writer.close()
        self.service.close(clean)
        if self.remote_rewards is not None:
            self.remote_rewards.close()


def _make_replay(engine: MegatronEngine, run: RunConfig):
    from megatron_rl.replay.router_replay import RoutingReplay

    return RoutingReplay(engine.chunks, run.model)


def _advantages(samples: list[RolloutSample], objective: ObjectiveConfig) -> dict[str, Stat]:
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    groups = torch.tensor([s.prompt_index for s in samples], dtype=torch.long)
    advantages = compute_advantages(rewards, groups, objective.estimator_in_force(),
                                    std_eps=objective.advantage_std_eps)
    for sample, adv in zip(samples, advantages.tolist(), strict=True):
        sample.advantage = adv
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
    return rollout_stats(rewards, groups, advantages, lengths)


def _all_gather(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``value`` (dynamic sampling's per-round tallies)."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _sample_stats(samples: list[RolloutSample]) -> dict[str, Stat]:
    latency = torch.tensor([s.latency_s for s in samples], dtype=torch.float64)
    stops = torch.tensor([1.0 if s.finish_reason == "stop" else 0.0 for s in samples])
    return {"rollout/num_samples": Stat(float(len(samples)), 1.0, "sum"),
            "rollout/latency_mean": Stat.mean(latency),
            "rollout/latency_max": Stat.extreme(latency, None, "max"),
            "rollout/stop_frac": Stat.mean(stops),
            **_token_stats(samples)}


def _token_stats(samples: list[RolloutSample]) -> dict[str, Stat]:
    """Response tokens; of them, those the model generated (multi-turn rollouts add tool
    tokens) and those the loss trains on (its mask)."""
    response = sum(len(s.response_ids) for s in samples)
    model = sum(s.metadata.get("model_tokens", len(s.response_ids)) for s in samples)
    trained = sum(len(s.response_ids) if s.loss_mask is None else int(s.loss_mask.sum())
                  for s in samples)
    return {"rollout/response_tokens": Stat(float(response), 1.0, "sum"),
            "rollout/model_tokens": Stat(float(model), 1.0, "sum"),
            "rollout/trained_tokens": Stat(float(trained), 1.0, "sum")}


def _flat_config(run: RunConfig) -> dict[str, Any]:
    """The run's settings for wandb / tensorboard; secrets never leave the process."""
    out: dict[str, Any] = {"stage": run.stage}
    for name, component in run.components():
        for key, value in asdict(component).items():
            secret = "api_key" in key and value is not None
            out[f"{name}.{key}"] = "<redacted>" if secret else value
    return out


__all__ = ["run_rl", "RLLoop"]
