"""Router agreement and replay fidelity, counted per MoE layer.

* ``mismatch/router_agreement``: fraction of (token, MoE layer) pairs whose top-k set the
  trainer's router would choose from its own logits equals the micro-batch's routes
  -- measured even while those routes are replayed. ``.../layer_{i}`` per global layer
  index i. The RL loop reports it from the pi_old pass against the rollout's routes
  (every replay mode), and renames what the updates measure (against the replay target:
  the rollout's under R3, the pi_old pass's under R2) to ``replay/target_agreement``
  with :func:`as_target_agreement`, so staleness of the routing is not mixed into the
  training-inference figure.
* ``replay/fidelity``: fraction of (token, MoE layer) pairs whose experts actually used
  (the router's returned routing map) are exactly the replay target. Anything below 1
  means some path ignored the replay.

Only real tokens count (padding excluded); a prompt prefix shared by G samples
(``MicroBatch.copies``) counts G times, as it would in G separate rows. Counts stay on the device until read, so
measuring costs no synchronisation per layer; :meth:`RouterMetrics.take` returns
``Stat`` sums/counts that reduce exactly over micro-batches and ranks.
"""

from __future__ import annotations

import torch

from megatron_rl.metrics.stats import Stat

AGREEMENT = "mismatch/router_agreement"
FIDELITY = "replay/fidelity"
TARGET_AGREEMENT = "replay/target_agreement"


def as_target_agreement(stats: dict[str, Stat]) -> dict[str, Stat]:
    """``stats`` of an update pass with the agreement keys renamed (see module doc)."""
    return {TARGET_AGREEMENT + key[len(AGREEMENT):] if key.startswith(AGREEMENT) else key: v
            for key, v in stats.items()}


def expert_map(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E]`` bool map of the ``[T, k]`` expert ids (the form of a routing map)."""
    return torch.zeros(ids.shape[0], num_experts, dtype=torch.bool, device=ids.device).scatter_(
        1, ids, True)


def same_sets(given_map: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the ``[T, k]`` distinct ids ``own`` are exactly the k experts of
    ``given_map`` (``[T, E]`` with k per row): all k inside means the same set."""
    return given_map.gather(1, own).all(dim=1)


def used_exactly(routing_map: torch.Tensor, given_map: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the router's ``[T, E]`` routing map selects exactly the target
    experts (all of them, and no other)."""
    return (routing_map == given_map).all(dim=1)


class RouterMetrics:
    """Per-layer (matches, tokens) counters of agreement and fidelity."""

    def __init__(self) -> None:
        # (name, layer) -> device scalars (matches, tokens) of each router call, summed
        # only when read: appending costs no device operation.
        self._counts: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, name: str, layer: int, hits: torch.Tensor, mask: torch.Tensor,
            tokens: torch.Tensor) -> None:
        """``hits`` ``[T]`` bool per token; ``mask`` each token's weight (bool: True on
        the real ones; int: the samples a shared token stands for), ``tokens`` its sum."""
        self._counts.setdefault((name, layer), []).append(((hits * mask).sum(), tokens))

    def take(self) -> dict[str, Stat]:
        """Statistics since the last call (totals and per layer); resets the counters."""
        stats: dict[str, Stat] = {}
        for (name, layer), pairs in sorted(self._counts.items()):
            hits, count = torch.stack([torch.stack(p) for p in pairs]).sum(dim=0).tolist()
            for key in (name, f"{name}/layer_{layer}"):
                stat = Stat(float(hits), float(count), "mean")
                stats[key] = stats[key].merge(stat) if key in stats else stat
        self._counts.clear()
        return stats
