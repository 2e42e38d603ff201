"""Rollout samples on their way to the trainer: sharding, sharing, conversion.

Prompts are split over data-parallel ranks by whole groups (advantages are computed
within a group). In each data group (the TP x PP x CP ranks of one data-parallel index)
the leader talks to the rollout servers, then hands every member the samples' tokens,
log-probs and advantages -- and only that member's share of the routes (the MoE layers
of its pipeline stage), so no rank holds the routes of the whole data-parallel batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_rl.data.packing import Sample
from megatron_rl.data.tasks import TaskItem
from megatron_rl.rollout.client import RolloutRequest
from megatron_rl.rollout.types import RolloutSample


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
            )
        )
    return out
