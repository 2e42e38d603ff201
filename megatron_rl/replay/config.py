"""``--routing-replay``: which experts the trainer's MoE routers use in each RL pass.

R2 records the experts the trainer itself picks while it computes pi_old and replays
them in every gradient update on that batch; R3 replays the experts the inference
engine picked while generating, in the pi_old pass and in every update. Either way the
gate weights of the fixed experts are recomputed from the live router logits, so the
router keeps learning. The reference pass (--rl-kl-coef) routes as the updates do, so
pi_theta and pi_ref are compared on the same experts; evaluation routes freely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.run_view import RunView
from megatron_rl.model.config import ModelConfig

ReplayMode = Literal["none", "r2", "r3"]
PassMode = Literal["record", "replay", "observe", "off"]
PASS_MODES: tuple[str, ...] = ("record", "replay", "observe", "off")
"""What :meth:`RoutingReplay.pass_mode` accepts:

* ``record``: route freely and keep each MoE layer's top-k per micro-batch (R2 pi_old);
* ``replay``: use the micro-batch's routes (R3 pi_old, R2/R3 updates);
* ``observe``: route freely, only compare with the micro-batch's routes (no replay);
* ``off``: route freely, measure nothing (evaluation; the reference pass without routes).
"""


@dataclass(kw_only=True, frozen=True)
class ReplayConfig:
    """Routing replay for the MoE layers (paper: R2 / R3)."""

    routing_replay: ReplayMode = "none"
    """none: routers choose freely in every pass; r2: replay, in every gradient update,
    the experts the trainer chose when it computed pi_old; r3: replay the experts the
    inference engine chose (returned with each rollout), in the pi_old pass and in every
    update. Gate weights always come from the live router logits."""

    def validate(self, run: RunView) -> None:
        """Refuse, at start-up, model settings under which the replay cannot be exact."""
        if self.routing_replay != "none":
            check_model_supports_replay(run.model, flag=f"--routing-replay {self.routing_replay}")

    @property
    def needs_rollout_routes(self) -> bool:
        """R3 replays the inference engine's routes: rollouts must return them."""
        return self.routing_replay == "r3"

    def old_logprob_mode(self, have_rollout_routes: bool) -> PassMode:
        """Mode of the pi_old pass: R3 replays the rollout's routes, R2 records the
        trainer's own; without replay the routers are only observed when the rollout
        returned routes to compare with."""
        if self.routing_replay == "r3":
            return "replay"
        if self.routing_replay == "r2":
            return "record"
        return "observe" if have_rollout_routes else "off"

    def reference_mode(self, have_rollout_routes: bool) -> PassMode:
        """Mode of the reference pass (--rl-kl-coef > 0), run after the pi_old pass: it
        uses the experts the updates use, so the KL term compares pi_theta and pi_ref on
        the same experts -- R3 replays the rollout's routes, R2 the routes the pi_old pass
        recorded (which the samples then carry); without replay it routes freely, observed
        against the rollout's routes when there are any."""
        if self.routing_replay in ("r2", "r3"):
            return "replay"
        return "observe" if have_rollout_routes else "off"

    def reference_routes_from(self) -> str:
        """Whose routes the reference pass is given: the pi_old pass's under R2 (it
        recorded them over the rollout's), the rollout's otherwise."""
        return "old_pass" if self.routing_replay == "r2" else "rollout"

    def update_mode(self) -> PassMode:
        """Mode of the gradient updates: R2 and R3 replay; without replay the routers
        route freely and are not measured (router agreement comes from the pi_old pass,
        or from the first update where it stands in for that pass)."""
        return "replay" if self.routing_replay in ("r2", "r3") else "off"


@dataclass(frozen=True)
class ReplayBlocker:
    """A megatron-core setting under which a replayed top-k is not what the experts get."""

    attribute: str
    """Its name on ModelConfig and on megatron-core's TransformerConfig alike."""
    blocks: Callable[[Any], bool]
    flag: str
    why: str


REPLAY_BLOCKERS: tuple[ReplayBlocker, ...] = (
    ReplayBlocker("moe_router_fusion", bool, "--moe-router-fusion",
                  "Transformer Engine's fused router (moe_router_fusion) computes top-k itself "
                  "and never consults megatron-core's RouterReplay, so the routers would "
                  "silently route freely"),
    ReplayBlocker("moe_token_dispatcher_type", lambda v: v == "flex",
                  "--moe-token-dispatcher-type flex",
                  "the flex dispatcher (DeepEP) recomputes top-k from the probabilities and "
                  "can undo the replayed experts; use allgather or alltoall"),
    ReplayBlocker("moe_expert_capacity_factor", lambda v: v is not None,
                  "--moe-expert-capacity-factor",
                  "token dropping discards replayed experts"),
    ReplayBlocker("moe_router_load_balancing_type", lambda v: v == "sinkhorn",
                  "--moe-router-load-balancing-type sinkhorn",
                  "sinkhorn routing bypasses the top-k replay hook"),
)
"""The one statement of when replay can be exact: checked at start-up on the flags
(:func:`check_model_supports_replay`) and again on the built model's TransformerConfig
when a replay pass starts (``replay.binding.check_routers_replayable``)."""


def replay_blockers(config: Any) -> list[ReplayBlocker]:
    """The blockers set in ``config`` (a ModelConfig or a TransformerConfig)."""
    return [b for b in REPLAY_BLOCKERS if b.blocks(getattr(config, b.attribute, None))]


def check_model_supports_replay(model: ModelConfig, *, flag: str = "routing replay") -> None:
    """Raise :class:`ConfigError` for a model whose routers cannot replay exactly."""
    if model.num_experts < 1 or model.num_moe_layers == 0:
        raise ConfigError(
            f"{flag} needs MoE layers, but --moe-layer-freq {model.moe_layer_freq!r} makes "
            f"every one of the {model.num_layers} layers dense"
        )
    for blocker in replay_blockers(model):
        raise ConfigError(f"{flag} cannot be combined with {blocker.flag}: {blocker.why}")
