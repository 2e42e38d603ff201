"""Rollout samples on their way to the trainer: sharding, sharing, conversion.

Prompts are split over data-parallel ranks by whole groups (advantages are computed
within a group). In each data group (the TP x PP x CP ranks of one data-parallel index)
the leader talks to the rollout servers, then hands every member the samples' tokens,
log-probs and advantages -- and only that member's share of the routes (the MoE layers
of its pipeline stage), so no rank holds the routes of the whole data-parallel batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_rl.config.flags import ConfigError
from megatron_rl.data.packing import Sample
from megatron_rl.data.tasks import Task, TaskItem
from megatron_rl.rollout.client import RolloutRequest
from megatron_rl.rollout.types import RolloutSample

if TYPE_CHECKING:
    from megatron_rl.arguments import RunConfig

logger = logging.getLogger(__name__)


def check_rollouts_fit(run: RunConfig, *, start_step: int = 0, start_position: int = 0,
                       tokenizer=None) -> int:
    """Refuse, before any rollout, a run whose samples cannot fit ``--seq-length``: the
    trainer feeds prompt + response - 1 tokens, so the longest prompt plus
    ``--rl-max-new-tokens`` - 1 must fit. Returns the longest prompt's length in tokens.

    The prompts checked are the ones the run will use, encoded as its rollouts encode them:
    the training items from its start position to its last step (with --rl-filter-groups,
    every sampling round's; at most the whole training set, which the stream cycles
    through) and the held-out items. A reasoning-gym
    dataset is procedural -- an item exists only once generated, and nothing bounds its
    length in general -- so these are generated here, as the run itself would later; a
    JSONL task's are read from the file."""
    from megatron_rl.model.tokenizer import PromptEncoder, load_tokenizer

    started = time.perf_counter()
    task = Task(run.task, seed=run.training.seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(run.model.tokenizer, run.model.vocab_size)
    encode = PromptEncoder.for_task(tokenizer, run.task, run.model.tokenizer)
    # Dynamic sampling may draw up to --rl-max-sampling-rounds batches of prompts a step.
    prompts_per_step = run.sampling.max_prompts_per_step(
        run.training.global_batch_size // run.rl.group_size)
    remaining = max(run.training.train_iters - start_step, 0) * prompts_per_step
    train, _ = task.next_items(start_position, min(remaining, task.train_size()))
    named = [("training", item) for item in train]
    named += [("held-out", item) for item in task.eval_items()]
    if not named:
        return 0
    lengths = [len(ids) for ids in encode.many([item.prompt for _, item in named])]
    longest = max(range(len(named)), key=lengths.__getitem__)
    kind, item = named[longest]
    prompt, max_new, seq_length = lengths[longest], run.rollout.max_new_tokens, run.model.seq_length
    need = prompt + max_new - 1
    logger.info("longest of %d prompts: %d tokens (%s item %d), checked in %.1f s",
                len(named), prompt, kind, item.index, time.perf_counter() - started)
    if need > seq_length:
        fewer = seq_length - prompt + 1
        raise ConfigError(
            f"--seq-length {seq_length} cannot hold this run's samples: the longest prompt "
            f"({kind} item {item.index} of --rl-task {run.task.task}, {prompt} tokens: "
            f"{item.prompt[:60]!r}) with --rl-max-new-tokens {max_new} makes {need} input "
            f"tokens (prompt + response - 1). Raise --seq-length to {need}"
            + (f" or lower --rl-max-new-tokens to {fewer}" if fewer >= 1 else ""))
    return prompt


def shard_prompts(items: list[TaskItem], dp_rank: int, dp_size: int) -> dict[int, TaskItem]:
    """This rank's prompts, keyed by their index in the rollout batch."""
    return {i: item for i, item in enumerate(items) if i % dp_size == dp_rank}


def build_requests(prompts: dict[int, TaskItem], encode: Callable[[str], list[int]],
                   group_size: int) -> list[RolloutRequest]:
    """G requests per prompt; ``encode`` turns a prompt's text into ids (a PromptEncoder:
    plain, or through the chat template)."""
    requests = []
    for index, item in sorted(prompts.items()):
        ids = encode(item.prompt)
        for j in range(group_size):
            requests.append(RolloutRequest(prompt_index=index, sample_index=j, prompt_ids=ids))
    return requests


@dataclasses.dataclass(frozen=True)
class RouteShare:
    """A rank's cut of one sample's routes ``[tokens, all MoE layers, topk]``: the MoE
    layers its pipeline stage holds (positions along the MoE-layer axis, in order)."""

    moe_positions: tuple[int, ...]

    def __call__(self, routes: torch.Tensor) -> torch.Tensor:
        return routes[:, list(self.moe_positions)]


def share_samples(
    samples: list[RolloutSample] | None,
    group,
    leader: int,
    ranks: list[int],
    my_share: RouteShare | None,
) -> list[RolloutSample]:
    """From the data group's leader to every member, each with its own route share.

    ``my_share`` is this rank's cut of the routes (None: this rank needs no routes). The
    leader applies each member's cut, which members send it first."""
    if group is None:
        samples = samples or []
        return [_with_routes(s, my_share) for s in samples]
    rank = dist.get_rank()
    shares: list = [None] * len(ranks)
    dist.all_gather_object(shares, my_share, group=group)
    if rank == leader:
        payloads = [[_with_routes(s, share) for s in samples] for share in shares]
    else:
        payloads = None
    received: list = [None]
    dist.scatter_object_list(received, payloads, src=leader, group=group)
    return received[0]


def _with_routes(sample: RolloutSample, share: RouteShare | None) -> RolloutSample:
    routes = None
    if share is not None and sample.routes is not None:
        routes = share(sample.routes).contiguous()
    return dataclasses.replace(sample, routes=routes, metadata=dict(sample.metadata))


def to_train_samples(samples: list[RolloutSample], advantages: torch.Tensor) -> list[Sample]:
    """Trainer-side samples, in the order given (their index is their position)."""
    out = []
    for i, (s, adv) in enumerate(zip(samples, advantages.tolist(), strict=True)):
        out.append(
            Sample(
                tokens=list(s.prompt_ids) + list(s.response_ids),
                prompt_len=len(s.prompt_ids),
                advantage=adv,
                rollout_logprobs=s.rollout_logprobs.float(),
                routes=s.routes,
                index=i,
                loss_mask=s.loss_mask,
            )
        )
    return out
