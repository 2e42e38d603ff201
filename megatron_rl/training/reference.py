"""The frozen reference policy of the KL term (``--rl-kl-coef`` > 0).

A second megatron model with the policy's layout (same TP/PP/EP/CP ranks, same layer
specs), holding the weights of the checkpoint RL started from, never trained: no
gradients, no DDP buffers, no optimiser, so it costs one copy of this rank's weights in
the training dtype (bf16: 2 bytes per parameter, against about 16 for the policy with its
fp32 gradients, main weights and Adam moments). It has routing replay of its own, bound
to its own routers, so the reference pass routes as ``ReplayConfig.reference_mode`` says.

Which checkpoint: on a fresh RL start, the one ``--load`` gives (its latest step); every
RL checkpoint records it (``reference_checkpoint`` in its common state), so a resumed run
reloads the same reference even after ``--load``'s directory has moved on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from megatron_rl.data.packing import Sample
from megatron_rl.metrics.stats import Stat
from megatron_rl.training import checkpoint as ckpt
from megatron_rl.training.engine import MegatronEngine
from megatron_rl.training.rl_passes import BatchLayout, reference_logprobs

logger = logging.getLogger(__name__)

COMMON_KEY = "reference_checkpoint"
"""Key of an RL checkpoint's common state naming the checkpoint its run started from."""


class ReferenceError(RuntimeError):
    """The reference policy cannot be built as asked (named checkpoint missing, ...)."""


def start_checkpoint(source: ckpt.LoadSource | None) -> dict[str, Any] | None:
    """``{"directory", "step"}`` of the checkpoint this run's policy started from, for the
    RL checkpoints to record; None when it started from random weights."""
    if source is None:
        return None
    if source.resume:
        return source.common.get(COMMON_KEY)
    return {"directory": os.path.abspath(source.directory), "step": int(source.step)}


class ReferencePolicy:
    """The reference model of this rank and the pass that scores a rollout batch with it."""

    def __init__(self, run, *, routing_replay: bool) -> None:
        from megatron_rl.replay.router_replay import RoutingReplay

        self.run = run
        self.engine = MegatronEngine(run.model, run.parallel, run.training,
                                     routing_replay=routing_replay, build_optimizer=False,
                                     frozen=True)
        self.replay = RoutingReplay(self.engine.chunks, run.model)
        self.loaded_from: dict[str, Any] | None = None

    def load(self, start: dict[str, Any] | None) -> None:
        """Load the start checkpoint ``start`` (see :func:`start_checkpoint`)."""
        if start is None:
            raise ReferenceError(
                f"--rl-kl-coef {self.run.objective.kl_coef}: no checkpoint to take the reference "
                "policy from -- this run has none to start from (--load holds no checkpoint "
                "yet), or it resumes an RL checkpoint saved without the record of its start "
                f"('{COMMON_KEY}' in its common state)")
        directory, step = start["directory"], int(start["step"])
        if not os.path.isdir(os.path.join(directory, f"iter_{step:07d}")):
            raise ReferenceError(
                f"--rl-kl-coef: the reference policy is step {step} of {directory}, where this "
                "RL run started, and that checkpoint is gone")
        ckpt.load_checkpoint(self.engine, directory, step=step, load_optimizer=False,
                             load_rng=False, load_scheduler=False)
        self.loaded_from = {"directory": directory, "step": step}
        logger.info("reference policy: step %d of %s (frozen)", step, directory)

    def score(self, samples: list[Sample], layout: BatchLayout, *,
              have_rollout_routes: bool, temperature: float) -> dict[str, Stat]:
        """Fill ``sample.ref_logprobs``; run it after the pi_old pass (R2 replays the
        routes that pass recorded)."""
        replay_cfg = self.run.replay
        mode = replay_cfg.reference_mode(have_rollout_routes)
        routes_from = replay_cfg.reference_routes_from()
        carry = mode in ("replay", "observe")
        return reference_logprobs(self.engine, samples, layout, replay=self.replay,
                                  replay_mode=mode, routes_from=routes_from,
                                  temperature=temperature, carry_routes=carry)

    def close(self) -> None:
        self.replay.close()
