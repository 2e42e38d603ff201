"""Multi-turn and tool rollouts (``--rl-rollout-function module:function``).

A user coroutine ``async def fn(ctx: RolloutContext) -> Trajectory`` drives one sample's
conversation: it calls :meth:`RolloutContext.generate` once per model turn (each a
``/generate`` on the rollout servers, through the async client's batch generator),
inserts tool output between turns, and returns the whole sequence as one
:class:`Trajectory` -- usually built by :meth:`RolloutContext.trajectory` from what it
recorded. A trajectory is ``prompt + response`` like any sample; its response holds the
model's tokens (``loss_mask`` 1, with the rollout log-probs mu_old) and the tool's
(``loss_mask`` 0, log-prob 0, never trained on).

Routes come from the last turn alone: SGLang's ``routed_experts`` of a request covers its
whole input (the earlier turns and tool output) plus its output, minus the last token --
exactly the trajectory's ``P + R - 1`` input positions, provided the last request's prompt
*is* the trajectory so far. :func:`check_trajectory` refuses a trajectory where it is not
(a tool step that re-tokenised text, a turn's prompt rebuilt from text), naming the
sample and the first position where the tokens differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_rl.data.tasks import TaskItem
from megatron_rl.rollout.generation import BatchGenerator
from megatron_rl.rollout.types import RolloutRequest, RolloutSample

RolloutFunction = Callable[["RolloutContext"], Awaitable["Trajectory"]]


class TrajectoryError(ValueError):
    """A rollout function's trajectory that cannot be trained on as it is."""


@dataclass(frozen=True, kw_only=True)
class Turn:
    """One ``/generate`` of a conversation, as the server answered it."""

    input_ids: list[int]
    output_ids: list[int]
    logprobs: torch.Tensor
    """mu_old of each output token, float32 [len(output_ids)]."""
    routes: torch.Tensor | None
    """[len(input_ids) + len(output_ids) - 1, moe_layers, topk], or None."""
    finish_reason: str
    weight_version: str | None
    server_url: str
    latency_s: float


@dataclass(kw_only=True)
class Trajectory:
    """One sample of a multi-turn rollout: ``prompt_ids + response_ids``."""

    prompt_ids: list[int]
    response_ids: list[int]
    """Everything after the prompt: model turns and tool output, in order."""
    loss_mask: torch.Tensor
    """bool [R]: True on the model's own tokens (trained), False on tool tokens."""
    rollout_logprobs: torch.Tensor
    """float32 [R]: mu_old on model tokens, 0 on tool tokens."""
    routes: torch.Tensor | None
    """[P + R - 1, moe_layers, topk] from the last turn (None when not requested)."""
    reward: float | None = None
    """Set by the function (e.g. scored on the final answer only); None: the task's scorer
    rates the decoded response, tool output included."""
    metadata: dict[str, Any] = field(default_factory=dict)


class RolloutContext:
    """What a rollout function receives for one sample: the task item, the tokenizer, the
    prompt ids, and :meth:`generate`, bound to the sample's request-id and seed scheme."""

    def __init__(self, *, request: RolloutRequest, item: TaskItem, tokenizer,
                 score: Callable[[str], float], max_tokens: int, max_new_tokens: int,
                 turn_fn: Callable[[RolloutRequest, str, int | None, tuple[int, ...] | None],
                                   Awaitable[RolloutSample]]):
        self.request, self.item, self.tokenizer, self.score = request, item, tokenizer, score
        self.prompt_ids: list[int] = list(request.prompt_ids)
        self.max_tokens = max_tokens
        """Most tokens a trajectory may hold (prompt + response; --seq-length + 1)."""
        self.max_new_tokens = max_new_tokens
        """--rl-max-new-tokens: a turn's default budget."""
        self.turns: list[Turn] = []
        self._response: list[int] = []
        self._mask: list[bool] = []
        self._logprobs: list[float] = []
        self._turn_fn = turn_fn

    @property
    def tokens(self) -> list[int]:
        """The trajectory so far: prompt, model turns and inserted tool tokens."""
        return self.prompt_ids + self._response

    @property
    def room(self) -> int:
        """Tokens the trajectory can still take."""
        return self.max_tokens - len(self.tokens)

    async def generate(self, input_ids: Sequence[int] | None = None, *,
                       max_new_tokens: int | None = None,
                       stop_token_ids: Sequence[int] | None = None) -> Turn:
        """One model turn on ``input_ids`` (default: :attr:`tokens`); its output is
        appended to the trajectory as model tokens. ``max_new_tokens`` and
        ``stop_token_ids`` override --rl-max-new-tokens and --rl-stop-token-ids for this
        turn. Each turn has its own request id (``<batch>/t<turn>/p<prompt>/s<sample>``)
        and a seed derived from it."""
        ids = list(self.tokens if input_ids is None else input_ids)
        request = dataclasses.replace(self.request, prompt_ids=ids)
        stops = None if stop_token_ids is None else tuple(stop_token_ids)
        sample = await self._turn_fn(request, f"t{len(self.turns)}", max_new_tokens, stops)
        turn = Turn(input_ids=ids, output_ids=list(sample.response_ids),
                    logprobs=sample.rollout_logprobs.float(), routes=sample.routes,
                    finish_reason=sample.finish_reason, weight_version=sample.weight_version,
                    server_url=sample.server_url, latency_s=sample.latency_s)
        self.turns.append(turn)
        self._response += turn.output_ids
        self._mask += [True] * len(turn.output_ids)
        self._logprobs += turn.logprobs.tolist()
        return turn

    def insert(self, ids: Sequence[int]) -> None:
        """Append tool (or environment) tokens: in the trajectory, never trained on."""
        self._response += list(ids)
        self._mask += [False] * len(ids)
        self._logprobs += [0.0] * len(ids)

    def trajectory(self, *, reward: float | None = None, **metadata: Any) -> Trajectory:
        """The trajectory recorded so far, routed by its last turn."""
        if not self.turns:
            raise TrajectoryError(f"sample {self.label}: the rollout function generated no turn")
        return Trajectory(
            prompt_ids=list(self.prompt_ids), response_ids=list(self._response),
            loss_mask=torch.tensor(self._mask, dtype=torch.bool),
            rollout_logprobs=torch.tensor(self._logprobs, dtype=torch.float32),
            routes=self.turns[-1].routes, reward=reward, metadata=metadata,
        )

    @property
    def label(self) -> str:
        return f"p{self.request.prompt_index}/s{self.request.sample_index}"


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def check_trajectory(trajectory: Trajectory, turns: Sequence[Turn], *, sample: str,
                     want_routes: bool, route_shape: tuple[int, int] | None = None) -> None:
    """Refuse what the trainer cannot train on, naming ``sample`` and the position:

    - ``loss_mask`` and ``rollout_logprobs`` one per response token, at least one model
      token;
    - every turn's request (``input_ids + output_ids``) a prefix of the trajectory, and
      the last turn's the whole trajectory (re-tokenisation drift otherwise: the routes
      and log-probs would describe other tokens);
    - the model's tokens masked in, with the log-probs the server returned;
    - routes covering exactly ``P + R - 1`` positions (``route_shape``: moe_layers, topk)."""
    P, R = len(trajectory.prompt_ids), len(trajectory.response_ids)
    mask, logprobs = trajectory.loss_mask, trajectory.rollout_logprobs
    where = f"trajectory {sample}"
    if R < 1:
        raise TrajectoryError(f"{where}: empty response")
    for name, t in (("loss_mask", mask), ("rollout_logprobs", logprobs)):
        if t.dim() != 1 or t.numel() != R:
            raise TrajectoryError(f"{where}: {name} has shape {tuple(t.shape)}, want [{R}] "
                                  f"(one per response token)")
    if mask.dtype != torch.bool:
        raise TrajectoryError(f"{where}: loss_mask must be bool, got {mask.dtype}")
    if not bool(mask.any()):
        raise TrajectoryError(f"{where}: no model token (loss_mask is all False)")
    if not turns:
        raise TrajectoryError(f"{where}: no turn was generated")
    tokens = list(trajectory.prompt_ids) + list(trajectory.response_ids)
    for k, turn in enumerate(turns):
        seen = turn.input_ids + turn.output_ids
        last = k == len(turns) - 1
        if seen != tokens[:len(seen)] or (last and len(seen) != len(tokens)):
            pos = _first_difference(seen, tokens)
            got = seen[pos] if pos < len(seen) else "end"
            has = tokens[pos] if pos < len(tokens) else "end"
            raise TrajectoryError(
                f"{where}: turn {k}'s request (prompt {len(turn.input_ids)} + output "
                f"{len(turn.output_ids)} tokens) differs from the trajectory at position "
                f"{pos} (turn: {got}, trajectory: {has}); the last turn's prompt must be the "
                f"trajectory's earlier tokens exactly (re-tokenised text drifts)")
        span = slice(len(turn.input_ids) - P, len(seen) - P)
        if len(turn.output_ids) and not bool(mask[span].all()):
            pos = P + span.start + int((~mask[span]).nonzero()[0, 0])
            raise TrajectoryError(f"{where}: model token at position {pos} (turn {k}) is "
                                  f"masked out")
        if len(turn.output_ids) and not torch.equal(logprobs[span], turn.logprobs.float()):
            pos = P + span.start + int((logprobs[span] != turn.logprobs).nonzero()[0, 0])
            raise TrajectoryError(f"{where}: rollout log-prob at position {pos} (turn {k}) "
                                  f"is not the one the server returned")
    if want_routes:
        routes = trajectory.routes
        want = (P + R - 1, *(route_shape or ()))
        if routes is None or tuple(routes.shape[:len(want)]) != want or routes.dim() != 3:
            got = None if routes is None else tuple(routes.shape)
            raise TrajectoryError(f"{where}: routes have shape {got}, want [{P + R - 1}, "
                                  f"moe_layers, topk] covering prompt + response - 1 = "
                                  f"{P + R - 1} positions")


def to_rollout_sample(trajectory: Trajectory, turns: Sequence[Turn], request: RolloutRequest,
                      rid: str) -> RolloutSample:
    last = turns[-1]
    versions = {t.weight_version for t in turns}
    if len(versions) > 1:
        raise TrajectoryError(f"trajectory {rid}: its turns were generated by weight versions "
                              f"{sorted(map(str, versions))}")
    return RolloutSample(
        prompt_index=request.prompt_index, sample_index=request.sample_index,
        prompt_ids=list(trajectory.prompt_ids), response_ids=list(trajectory.response_ids),
        rollout_logprobs=trajectory.rollout_logprobs.float(), routes=trajectory.routes,
        loss_mask=trajectory.loss_mask.bool(), finish_reason=last.finish_reason,
        weight_version=last.weight_version, prompt_tokens=len(trajectory.prompt_ids),
        completion_tokens=int(trajectory.loss_mask.sum()),
        latency_s=sum(t.latency_s for t in turns), server_url=last.server_url,
        request_id=rid, reward=trajectory.reward,
        metadata={**request.metadata, **trajectory.metadata, "turns": len(turns),
                  "model_tokens": sum(len(t.output_ids) for t in turns)},
    )


class TrajectoryGenerator:
    """Runs a rollout function for every request of a batch, concurrently, each turn one
    ``/generate`` through a :class:`BatchGenerator` sharing the client's servers and HTTP
    transport (one per turn sampling override; without a progress bar, which is per
    batch)."""

    def __init__(self, core, function: RolloutFunction, *, tokenizer,
                 score: Callable[[str, TaskItem], float], max_tokens: int):
        self.core, self.function, self.tokenizer = core, function, tokenizer
        self.score, self.max_tokens = score, max_tokens
        self._generators: dict[tuple, BatchGenerator] = {}

    def _generator(self, max_new: int | None, stops: tuple[int, ...] | None) -> BatchGenerator:
        config = self.core.config
        key = (max_new, stops)
        if key not in self._generators:
            changes: dict[str, Any] = {"progress": False}
            if max_new is not None:
                changes["max_new_tokens"] = max_new
            if stops is not None:
                changes["stop_token_ids"] = stops
            self._generators[key] = BatchGenerator(
                dataclasses.replace(config, **changes), self.core.shape, self.core.servers,
                self.core.transport, return_routed_experts=self.core.return_routed_experts)
        return self._generators[key]

    async def generate(self, requests: Sequence[RolloutRequest], items: dict[int, TaskItem],
                       batch_id: str, route_shape: tuple[int, int] | None = None,
                       on_sample: Callable[[RolloutSample], None] | None = None,
                       ) -> list[RolloutSample]:
        limit = asyncio.Semaphore(self.core.config.concurrency)

        async def turn_fn(request, turn_id, max_new, stops):
            if max_new is not None and max_new < 1:
                raise TrajectoryError(f"sample {batch_id}/p{request.prompt_index}/"
                                      f"s{request.sample_index}: turn {turn_id} asks for "
                                      f"{max_new} new tokens")
            async with limit:
                samples = await self._generator(max_new, stops).generate(
                    [request], f"{batch_id}/{turn_id}")
            return samples[0]

        async def one(request: RolloutRequest) -> RolloutSample:
            item = items[request.prompt_index]
            ctx = RolloutContext(request=request, item=item, tokenizer=self.tokenizer,
                                 score=lambda text: self.score(text, item),
                                 max_tokens=self.max_tokens, turn_fn=turn_fn,
                                 max_new_tokens=self.core.config.max_new_tokens)
            trajectory = await self.function(ctx)
            rid = f"{batch_id}/{ctx.label}"
            if not isinstance(trajectory, Trajectory):
                raise TrajectoryError(f"sample {rid}: the rollout function returned "
                                      f"{type(trajectory).__name__}, not a Trajectory")
            check_trajectory(trajectory, ctx.turns, sample=rid,
                             want_routes=self.core.return_routed_experts, route_shape=route_shape)
            P, R = len(trajectory.prompt_ids), len(trajectory.response_ids)
            if P + R > self.max_tokens:
                raise TrajectoryError(f"trajectory {rid}: {P} + {R} tokens, more than "
                                      f"--seq-length + 1 = {self.max_tokens}")
            sample = to_rollout_sample(trajectory, ctx.turns, request, rid)
            if on_sample is not None:
                on_sample(sample)
            return sample

        started = time.perf_counter()
        samples = await asyncio.gather(*(one(r) for r in requests))
        self.last_seconds = time.perf_counter() - started
        return list(samples)
