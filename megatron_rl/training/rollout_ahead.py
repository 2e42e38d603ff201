"""Asynchronous rollouts, one step off (``--rl-rollout-ahead 1``).

Versions count weight syncs: the trainer's policy after step k is version k, and the
servers serve version k from the sync at the end of step k. With K = 1, step k

1. takes its batch B_k (generated during step k-1 by version k-2, or, at the first step
   and after a resume that saved none, generated now by version k-1);
2. starts generating B_{k+1} in the background with the weights the servers hold now,
   version k-1;
3. computes pi_old with its own weights (version k-1) and updates on B_k;
4. waits for B_{k+1} to finish, then syncs version k to the servers.

So B_{k+1} is trained at step k+1 by a trainer holding version k: one version stale
(``rollout/staleness`` = 1), every sample of it labelled with version k-1. The weights
never change under a generation (the sync waits for it), so a batch holds one version.
pi_old is the trainer's current policy, so pi_old/mu_old -- MiniRL's IS factor, and
``mismatch/kl`` -- carries the one-step staleness on top of the training-inference
discrepancy, and corrects for both; R3 replays the routes the generating policy chose.

The background generation is a thread with its own event loop (the client's
``run_sync``). Dynamic sampling runs inside it: its rounds exchange tallies over a
process group of their own, so they never interleave with the trainer's collectives.

At a checkpoint the batch generated ahead is complete (the sync waited for it): each
data-group leader saves its share in the checkpoint directory as data (safetensors for
the tensors, JSON for the rest), and a resumed run trains on exactly that batch.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron_rl.metrics.stats import Stat
from megatron_rl.rollout.types import RolloutSample

COMMON_KEY = "rollout_ahead"
"""Key of the checkpoint's common state that describes the batch generated ahead."""

_FIELDS = ("prompt_index", "sample_index", "finish_reason", "weight_version",
           "prompt_tokens", "completion_tokens", "latency_s", "server_url", "request_id",
           "reward", "advantage", "metadata")
_TENSORS = ("prompt_ids", "response_ids", "rollout_logprobs", "routes")


@dataclass
class RolloutBatch:
    """A rollout batch as the step that trains on it takes it: scored, with advantages."""

    step: int
    """The step that trains on it (its request ids and sampling seeds are that step's)."""
    version: int
    """Weight version the servers held while generating it (every sample carries it)."""
    samples: list[RolloutSample] | None
    """This data group's samples (data-group leaders; None elsewhere)."""
    stats: dict[str, Stat] = field(default_factory=dict)
    """Statistics of the batch (rewards, advantages, dynamic sampling), this rank's part."""
    scalars: dict[str, float] = field(default_factory=dict)
    """Figures every rank knows alike (dynamic sampling's rounds)."""
    generate_s: float = 0.0
    """Wall seconds the generation took (with its scoring and extra rounds)."""
    ahead: bool = False
    """Generated during the previous step (so one version behind the trainer)."""


class AheadGeneration:
    """One batch generated on a background thread while the caller trains.

    A daemon thread: a run that fails elsewhere is not kept alive by a generation that
    can no longer finish (its servers are being stopped)."""

    def __init__(self, generate: Callable[[], RolloutBatch], step: int) -> None:
        self.step = step
        self._batch: RolloutBatch | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(generate,),
                                        name=f"rollout-ahead-step{step}", daemon=True)
        self._thread.start()

    def _run(self, generate: Callable[[], RolloutBatch]) -> None:
        try:
            self._batch = generate()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            self._error = exc

    def result(self) -> RolloutBatch:
        """Wait for the batch; an error of the generation is raised here."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"generating the rollout batch of step {self.step} ahead "
                               f"failed: {self._error}") from self._error
        assert self._batch is not None
        self._batch.ahead = True
        return self._batch


# ---- checkpointing ----------------------------------------------------------------------


def batch_files(directory: str, dp_rank: int) -> tuple[str, str]:
    """Paths of data-parallel rank ``dp_rank``'s share of the batch in a checkpoint."""
    stem = os.path.join(directory, f"rollout_ahead_dp{dp_rank:03d}")
    return stem + ".safetensors", stem + ".json"


def common_entry(batch: RolloutBatch, dp_size: int) -> dict[str, int]:
    """What every rank reads back from the checkpoint's common state."""
    return {"step": batch.step, "version": batch.version, "dp_size": dp_size}


def save_batch(directory: str, batch: RolloutBatch, dp_rank: int) -> None:
    """Write this leader's share of ``batch`` into the checkpoint ``directory``."""
    assert batch.samples is not None, "only data-group leaders hold samples"
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, sample in enumerate(batch.samples):
        tensors[f"{i}.prompt_ids"] = torch.tensor(sample.prompt_ids, dtype=torch.int64)
        tensors[f"{i}.response_ids"] = torch.tensor(sample.response_ids, dtype=torch.int64)
        tensors[f"{i}.rollout_logprobs"] = sample.rollout_logprobs.detach().contiguous()
        if sample.routes is not None:
            tensors[f"{i}.routes"] = sample.routes.contiguous()
        records.append({name: getattr(sample, name) for name in _FIELDS})
    state = {
        "step": batch.step, "version": batch.version, "dp_rank": dp_rank,
        "generate_s": batch.generate_s, "samples": records, "scalars": batch.scalars,
        "stats": {name: [s.value, s.count, s.reduction] for name, s in batch.stats.items()},
    }
    tensor_path, json_path = batch_files(directory, dp_rank)
    try:
        text = json.dumps(state, allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"the rollout batch of step {batch.step} cannot be checkpointed as "
                        f"JSON (a sample's metadata holds a non-JSON value): {exc}") from exc
    save_file(tensors, tensor_path)
    with open(json_path, "w") as handle:
        handle.write(text)


def load_batch(directory: str, entry: dict[str, Any], dp_rank: int, dp_size: int,
               is_leader: bool) -> RolloutBatch:
    """The batch a checkpoint saved (described by its common-state ``entry``), this
    rank's share of it."""
    if entry["dp_size"] != dp_size:
        raise ValueError(
            f"{directory} holds the rollout batch of step {entry['step']}, generated ahead "
            f"and split over {entry['dp_size']} data-parallel ranks; this run has {dp_size}: "
            f"resume at data-parallel size {entry['dp_size']} (the batch is already "
            f"generated and its prompts drawn)")
    batch = RolloutBatch(step=entry["step"], version=entry["version"], samples=None,
                         ahead=True)
    if not is_leader:
        return batch
    tensor_path, json_path = batch_files(directory, dp_rank)
    for path in (tensor_path, json_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint records a rollout "
                                    f"batch generated ahead for step {entry['step']}")
    with open(json_path) as handle:
        state = json.load(handle)
    tensors = load_file(tensor_path)
    if (state["step"], state["version"], state["dp_rank"]) != (entry["step"], entry["version"],
                                                               dp_rank):
        raise ValueError(f"{json_path} holds step {state['step']} version {state['version']} "
                         f"of data-parallel rank {state['dp_rank']}, the checkpoint expects "
                         f"step {entry['step']} version {entry['version']} of rank {dp_rank}")
    samples = []
    for i, record in enumerate(state["samples"]):
        parts = {name: tensors.get(f"{i}.{name}") for name in _TENSORS}
        if any(parts[name] is None for name in _TENSORS[:3]):
            raise ValueError(f"{tensor_path} lacks the tensors of sample {i}")
        samples.append(RolloutSample(
            **record, prompt_ids=parts["prompt_ids"].tolist(),
            response_ids=parts["response_ids"].tolist(),
            rollout_logprobs=parts["rollout_logprobs"], routes=parts["routes"]))
    batch.samples = samples
    batch.stats = {name: Stat(float(v), float(c), r) for name, (v, c, r) in state["stats"].items()}
    batch.scalars = {name: float(v) for name, v in state["scalars"].items()}
    batch.generate_s = float(state["generate_s"])
    return batch


__all__ = ["AheadGeneration", "COMMON_KEY", "RolloutBatch", "batch_files", "common_entry",
           "load_batch", "save_batch"]
