"""megatron-core's RouterReplay for one MoE layer, fed by layer identity and micro-batch.

``topk_routing_with_score_function`` asks the router's ``router_replay`` for the top-k
(``get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)``). This
subclass answers with megatron's own record / replay code, after loading the targets of
the micro-batch the router is running for (asked of its :class:`RoutingReplay`), so:

* replayed probabilities are megatron's: the live logits gathered at the replayed ids;
  with ``moe_router_pre_softmax=False`` the softmax is then taken over those k logits,
  the same gate as free top-k routing, so the router keeps receiving gradients;
* the FIFO of ``REPLAY_BACKWARD`` is never used: a forward recomputed in backward gets
  the targets of its own micro-batch again;
* while replaying it also computes the top-k the router would have chosen, for
  ``mismatch/router_agreement``.

Instances stay out of megatron's process-global list.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_rl.data.routes import route_dtype
from megatron_rl.replay.binding import RouterSite, drop_from_global_list
from megatron_rl.replay.chunk_routes import ChunkRoutes
from megatron_rl.replay.metrics import (
    AGREEMENT,
    FIDELITY,
    RouterMetrics,
    expert_map,
    same_sets,
    used_exactly,
)


class ReplayDriver(Protocol):
    """What a bound router asks of the replay that drives it (``RoutingReplay``): the
    routes of the micro-batch now running in a model chunk, whether this pass counts
    tokens, and where to add its counts."""

    metrics: RouterMetrics
    counts_tokens: bool

    def routes_for(self, chunk: int) -> ChunkRoutes | None: ...


class ReplayError(RuntimeError):
    """Routing replay was used in a way that cannot be exact."""


class BoundRouterReplay(RouterReplay):
    """The RouterReplay of one router, bound to a global MoE layer."""

    def __init__(self, site: RouterSite, driver: ReplayDriver, num_experts: int) -> None:
        super().__init__()
        drop_from_global_list({id(self)})
        # megatron >= 0.19 keeps the router's 1-based global layer number here too.
        self.layer_number = site.layer + 1
        self.site = site
        self._driver = driver
        self._compact = route_dtype(num_experts)
        # The [T, E] map the router's returned routing map must equal (while replaying).
        self._fidelity_target: torch.Tensor | None = None

    def _megatron_topk(self, action: RouterReplayAction | None, target: torch.Tensor | None,
                       args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """megatron's own get_replay_topk with one action (and target) loaded, then
        cleared again so that nothing outlives the call."""
        self.clear_indices()
        if target is not None:
            self.set_target_indices(target)
        if action is None:
            self.clear_router_replay_action()
        else:
            self.set_router_replay_action(action)
        try:
            return RouterReplay.get_replay_topk(self, *args, **kwargs)
        finally:
            self.clear_router_replay_action()
            if action is not RouterReplayAction.RECORD:
                self.clear_indices()

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups: Any = None,
                        group_topk: Any = None, default_compute_topk: Any = None,
                        *more: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        args = (scores, topk, num_groups, group_topk, default_compute_topk, *more)
        entry = self._driver.routes_for(self.site.chunk)
        if entry is None:
            return self._megatron_topk(None, None, args, kwargs)
        position = self.site.position
        if entry.measuring:
            entry.visited.add(position)
        given = entry.target(position)
        if given is not None and given.shape[0] != scores.shape[0]:
            raise ReplayError(
                f"micro-batch {entry.key}: routes give {given.shape[0]} tokens to decoder layer "
                f"{self.site.layer}, whose router sees {scores.shape[0]} (its sequence slice "
                "x batch)"
            )
        measure = entry.measuring and self._driver.counts_tokens and given is not None
        given_map = expert_map(given, scores.shape[1]) if measure else None

        if entry.mode == "replay":
            if measure:
                with torch.no_grad():
                    _, own = default_compute_topk(
                        scores.detach(), topk, num_groups=num_groups, group_topk=group_topk
                    )
                self._add(AGREEMENT, same_sets(given_map, own), entry)
                self._fidelity_target = given_map
            return self._megatron_topk(RouterReplayAction.REPLAY_FORWARD, given, args, kwargs)

        if entry.mode == "record":
            probs, chosen = self._megatron_topk(RouterReplayAction.RECORD, None, args, kwargs)
            recorded = self.get_recorded_indices()
            self.clear_indices()
            if entry.measuring:
                if position in entry.records:
                    raise ReplayError(
                        f"micro-batch {entry.key}: decoder layer {self.site.layer} routed twice "
                        "in one forward"
                    )
                entry.records[position] = recorded.detach().to(self._compact)
        else:  # observe
            probs, chosen = self._megatron_topk(None, None, args, kwargs)
        if measure:
            self._add(AGREEMENT, same_sets(given_map, chosen), entry)
        return probs, chosen

    def _add(self, name: str, hits: torch.Tensor, entry: ChunkRoutes) -> None:
        self._driver.metrics.add(name, self.site.layer, hits, entry.mask, entry.tokens)

    def check_router_output(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        """Forward hook on the TopKRouter: did the experts it returned (its routing map)
        equal the replay target? Feeds ``replay/fidelity``."""
        target, self._fidelity_target = self._fidelity_target, None
        if target is None:
            return
        entry = self._driver.routes_for(self.site.chunk)
        self._add(FIDELITY, used_exactly(output[1], target), entry)
