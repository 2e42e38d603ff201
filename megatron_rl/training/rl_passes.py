"""The two trainer passes of an RL step: pi_old, then N gradient updates.

Both run megatron-core's pipeline schedule over micro-batches of this rank's samples.
Routing replay is switched per pass: R3 replays the rollout's routes in both; R2
records the trainer's routes in the pi_old pass and replays them in the updates; with
replay off the routers route freely and are only observed (router agreement).

The first update may stand in for the pi_old pass of its own mini-batch (the weights
have not moved yet): it then runs in the pi_old pass's routing mode, takes pi_old as its
detached log-probs, and reports what that pass would have (entropy, router agreement
with the rollout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl.data.packing import (
    MicroBatch,
    Sample,
    plan_rows,
    set_global_counts,
    split_microbatches,
)
from megatron_rl.loss import ObjectiveConfig
from megatron_rl.metrics.stats import Stat, merge_stats
from megatron_rl.replay.metrics import AGREEMENT, FIDELITY, as_target_agreement
from megatron_rl.training.engine import MegatronEngine, StepResult
from megatron_rl.training.forward_step import cp_unsplit, make_forward_step
from megatron_rl.training.rl_losses import old_logprob_pass, policy_loss


@dataclass
class BatchLayout:
    """How samples become micro-batches on every rank."""

    micro_batch_size: int
    seq_length: int
    pack: bool
    pad_id: int
    route_shape: tuple[int, int, int] | None
    """(stage MoE layers, top-k, experts) when routes travel with the micro-batches."""
    share_prompts: bool = False
    """Lay the responses of one prompt out as a tree over one copy of the prompt
    (data.packing); a micro-batch then holds micro_batch_size samples."""


def _agreed(value: int, op=dist.ReduceOp.MAX) -> int:
    t = torch.tensor([value], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return int(t.item())


def make_batches(samples: list[Sample], layout: BatchLayout, *,
                 with_routes: bool) -> tuple[list[MicroBatch], int, int]:
    """Micro-batches of ``samples`` and their (row length, rows); every rank gets the same
    shape and the same number of micro-batches (expert-parallel dispatch and pipeline
    exchanges are collective per micro-batch), padding with empty micro-batches where
    needed."""
    share = layout.share_prompts and not layout.pack
    longest = _agreed(max((s.num_inputs for s in samples), default=1))
    if layout.seq_length is not None and longest > layout.seq_length:
        # Refused on every rank alike (a rank raising alone would leave the others
        # waiting in the next collective).
        raise ValueError(f"a sample has {longest} input tokens, above --seq-length "
                         f"{layout.seq_length}")
    min_rows = 0
    if share:
        widest, most_rows = plan_rows(samples, layout.micro_batch_size,
                                      max_length=layout.seq_length)
        longest, min_rows = _agreed(max(widest, 1)), _agreed(max(most_rows, 1))
    route_shape = layout.route_shape if with_routes else None
    batches, length = split_microbatches(
        samples, layout.micro_batch_size, pad_multiple=_pad_multiple(),
        max_length=layout.seq_length,
        pack=layout.pack, pad_id=layout.pad_id, route_shape=route_shape, min_length=longest,
        share_prompts=share, min_rows=min_rows,
    ) if samples else ([], 0)
    # Same inputs on every rank give the same length; ranks without samples adopt it.
    length = _agreed(length)
    rows = _agreed(batches[0].tokens.shape[0] if batches else max(min_rows, 1)) \
        if share else layout.micro_batch_size
    count = _agreed(len(batches))
    while len(batches) < count:
        batches.append(_empty_batch(layout, length, rows, route_shape, key=len(batches)))
    return batches, length, rows


def _pad_multiple() -> int:
    """Row lengths split evenly over sequence-parallel ranks and 2 x CP chunks."""
    tp = ps.get_tensor_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    return math.lcm(8, tp, 2 * cp)


def _empty_batch(layout: BatchLayout, length: int, rows: int, route_shape, key: int) -> MicroBatch:
    from megatron_rl.data.packing import make_microbatch

    return make_microbatch([], pad_to=length, num_rows=rows,
                           pad_id=layout.pad_id, route_shape=route_shape, key=key)


def old_logprobs(
    engine: MegatronEngine,
    samples: list[Sample],
    layout: BatchLayout,
    *,
    replay=None,
    replay_mode: str = "off",
    record_routes: bool = False,
    temperature: float = 1.0,
    carry_routes: bool = False,
) -> dict[str, Stat]:
    """Fill ``sample.old_logprobs`` (last pipeline stage) and, when ``record_routes``,
    ``sample.routes`` with the experts this stage's routers chose (R2). ``carry_routes``:
    the samples hold the rollout's routes, to replay or to compare with (R2 records the
    trainer's own choice and measures its agreement with the rollout's)."""
    stats = _score(engine, samples, layout, into="old_logprobs", entropy_stat="logprob/entropy",
                   replay=replay, replay_mode=replay_mode, record_routes=record_routes,
                   temperature=temperature, carry_routes=carry_routes)
    if replay is not None and samples:
        stats.update(replay.stats())
    return stats


def reference_logprobs(
    reference: MegatronEngine,
    samples: list[Sample],
    layout: BatchLayout,
    *,
    replay=None,
    replay_mode: str = "off",
    routes_from: str = "rollout",
    temperature: float = 1.0,
    carry_routes: bool = False,
) -> dict[str, Stat]:
    """Fill ``sample.ref_logprobs`` with the frozen reference model's log-probs, routed as
    ``replay_mode`` says (``ReplayConfig.reference_mode``). Its statistics are named
    ``ref/*``: ``ref/entropy``, ``ref/replay_fidelity``, and the agreement of the
    reference's own top-k with the routes the samples carry, ``ref/router_agreement``
    when ``routes_from`` is 'rollout' (r3, none) or ``ref/target_agreement`` when it is
    'old_pass' (r2: the routes the pi_old pass recorded)."""
    stats = _score(reference, samples, layout, into="ref_logprobs", entropy_stat="ref/entropy",
                   replay=replay, replay_mode=replay_mode, record_routes=False,
                   temperature=temperature, carry_routes=carry_routes)
    if replay is not None and samples:
        stats.update(reference_route_stats(replay.stats(), routes_from))
    return stats


def reference_route_stats(stats: dict[str, Stat], routes_from: str) -> dict[str, Stat]:
    """A reference pass's router statistics under ``ref/`` names (see reference_logprobs)."""
    agreement = {"rollout": "ref/router_agreement", "old_pass": "ref/target_agreement"}
    if routes_from not in agreement:
        raise ValueError(f"routes_from must be 'rollout' or 'old_pass', got {routes_from!r}")
    renamed = {}
    for key, stat in stats.items():
        if key.startswith(AGREEMENT):
            renamed[agreement[routes_from] + key[len(AGREEMENT):]] = stat
        elif key.startswith(FIDELITY):
            renamed["ref/replay_fidelity" + key[len(FIDELITY):]] = stat
    return renamed


def _score(engine, samples, layout, *, into, entropy_stat, replay, replay_mode,
           record_routes, temperature, carry_routes) -> dict[str, Stat]:
    """A forward-only pass that sets ``sample.<into>`` to each sample's log-probs."""
    if replay_mode == "replay" and not carry_routes:
        raise ValueError("a scoring pass replays routes only when the samples carry them")
    for i, sample in enumerate(samples):
        sample.index = i  # positions in this pass (a caller may pass a tail of the batch)
    # A rank without samples still takes part (empty micro-batches): the passes'
    # collectives would otherwise wait for it.
    batches, length, rows = make_batches(samples, layout, with_routes=carry_routes)
    if not batches:  # no rank has samples
        return {}
    forward_step = make_forward_step(old_logprob_pass(temperature, entropy_stat), replay)
    context = replay.pass_mode(replay_mode) if replay is not None else _null()
    with context:
        outputs = engine.forward_only(forward_step, batches, seq_length=length,
                                      micro_batch_size=rows)
        if record_routes and replay is not None:
            for batch in batches:
                recorded = cp_unsplit(replay.take_recorded(batch.key), batch.tokens.shape[1])
                for local, index in enumerate(batch.sample_index):
                    samples[index].routes = batch.sample_inputs(recorded, local).contiguous()
    for out in outputs:
        for index, logprobs in out["logprobs"].items():
            mask = samples[index].loss_mask
            if mask is not None:
                # The pass scores trained tokens only; per-token tensors span the response.
                logprobs = torch.zeros(mask.shape, dtype=logprobs.dtype,
                                       device=logprobs.device).masked_scatter(
                    mask.bool().to(logprobs.device), logprobs)
            setattr(samples[index], into, logprobs)
    return merge_stats([o["stats"] for o in outputs])


def mini_batches(samples: list[Sample], num_updates: int) -> list[list[Sample]]:
    """The consecutive mini-batches of this rank's samples, one per update."""
    per_update = len(samples) // num_updates
    return [samples[u * per_update : (u + 1) * per_update] for u in range(num_updates)]


def policy_updates(
    engine: MegatronEngine,
    samples: list[Sample],
    layout: BatchLayout,
    objective: ObjectiveConfig,
    num_updates: int,
    *,
    replay=None,
    replay_mode: str = "off",
    temperature: float = 1.0,
    on_update=None,
    first_as_old_mode: str | None = None,
) -> list[tuple[StepResult, dict[str, Stat]]]:
    """N gradient updates on consecutive mini-batches of this rank's samples.

    ``first_as_old_mode``: the first update also stands in for its mini-batch's pi_old
    pass, run in this routing mode (the pi_old pass's: 'replay' under R3, 'observe' or
    'off' without replay); its samples need no ``old_logprobs``."""
    if first_as_old_mode not in (None, "replay", "observe", "off"):
        raise ValueError(f"the first update cannot stand in for a {first_as_old_mode!r} "
                         "pi_old pass (R2 records its routes there)")
    results = []
    for u, mini in enumerate(mini_batches(samples, num_updates)):
        for i, sample in enumerate(mini):
            sample.index = i
        as_old = u == 0 and first_as_old_mode is not None
        mode = first_as_old_mode if as_old else replay_mode
        num_samples = _agreed(len(mini), dist.ReduceOp.SUM) // _dp_replicas()
        num_tokens = _agreed(sum(s.trained_len for s in mini), dist.ReduceOp.SUM) // _dp_replicas()
        batches, length, rows = make_batches(mini, layout,
                                             with_routes=mode in ("replay", "observe"))
        set_global_counts(batches, num_samples, num_tokens)
        forward_step = make_forward_step(policy_loss(objective, temperature, as_old), replay)
        context = replay.pass_mode(mode) if replay is not None else _null()
        with context:
            result = engine.train_step(forward_step, batches, seq_length=length,
                                       micro_batch_size=rows,
                                       loss_of=lambda out: out["loss"])
        stats = merge_stats([o["stats"] for o in result.outputs])
        # What the update computed: rows x row length of its micro-batches, padding and
        # shared prompts (once) included.
        # (counted once per data-parallel replica: the stats are summed over all ranks).
        stats["train/positions"] = Stat(float(len(batches) * rows * length) / _dp_replicas(),
                                        1.0, "sum")
        if replay is not None:
            measured = replay.stats()
            if as_old:
                # Agreement with the rollout's routes, as the pi_old pass reports it; under
                # R3 that is also the update's agreement with its replay target.
                stats.update(measured)
            if not as_old or mode == "replay":
                stats.update(as_target_agreement(measured))
        results.append((result, stats))
        if on_update is not None:
            on_update(u)
    for i, sample in enumerate(samples):
        sample.index = i
    return results


def _dp_replicas() -> int:
    """Ranks that hold the same samples (a world-wide SUM counts each sample this often)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return world // ps.get_data_parallel_world_size()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
