"""Checkpoints: megatron-core distributed checkpoints that survive a crash mid-write.

Layout of a save directory::

    iter_0000010/            complete checkpoint of step 10 (dist_checkpointing format)
        common_state.pt      scheduler, step, data position, policy version, ... (rank 0)
        rank_00000.pt        this rank's RNG states (restored only at the same layout)
    latest_checkpointed_iteration.txt

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed once every rank has
finished; ``latest_checkpointed_iteration.txt`` is replaced atomically after that. A
process killed while writing therefore leaves the previous checkpoint as the latest.
Model and optimiser use the fully reshardable formats, so a checkpoint saved at one
parallel layout (e.g. EP=2) loads at another (EP=1).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_rl.training.engine import MegatronEngine

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
# Layout-independent formats: optimiser state keyed by parameter, never by the position
# of an optimiser in a chain (EP>1 chains dense and expert optimisers, EP=1 may not).
_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _model_state(engine: MegatronEngine) -> dict[str, Any]:
    return {
        f"chunk{i}": chunk.sharded_state_dict(prefix="", metadata=_METADATA)
        for i, chunk in enumerate(engine.chunks)
    }


def _layout() -> dict[str, int]:
    return {
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
    }


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    engine: MegatronEngine,
    save_dir: str,
    step: int,
    common_state: dict[str, Any],
    *,
    keep_last: int = 2,
) -> str:
    """Save model, optimiser, scheduler and ``common_state``; collective over all ranks."""
    final = os.path.join(save_dir, f"iter_{step:07d}")
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state: dict[str, Any] = {"model": _model_state(engine)}
    with_optimizer = _optimizer_has_state(engine)
    if with_optimizer:
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            state["model"], metadata=_METADATA
        )
    dist_checkpointing.save(state, tmp)
    torch.save({"rng": rng_state(), "layout": _layout()},
               os.path.join(tmp, f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        common = dict(common_state)
        common["step"] = step
        common["layout"] = _layout()
        common["has_optimizer"] = with_optimizer
        if engine.scheduler is not None:
            common["scheduler"] = engine.scheduler.state_dict()
        _atomic_torch_save(common, os.path.join(tmp, "common_state.pt"))
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(os.path.join(save_dir, TRACKER), str(step))
        _prune(save_dir, keep_last)
    _barrier()
    logger.info("saved checkpoint of step %d to %s", step, final)
    return final


_SCHEDULE_KEYS = ("lr", "max_lr", "min_lr", "weight_decay", "wd_mult", "lr_mult")


def _hyperparameters(group: dict) -> dict:
    return {key: group[key] for key in _SCHEDULE_KEYS if key in group}


def _adapt_optimizer_state(loaded: dict, engine: MegatronEngine) -> dict:
    """Fit the optimiser's non-tensor state to this layout.

    Optimiser tensors are keyed by parameter and reshard freely, but megatron keeps one
    optimiser per parameter kind (dense / expert) only where their data-parallel groups
    differ, so the number of chained optimisers -- and the nesting of ``param_groups`` and
    Adam's step counter in the common state -- depends on the layout. When that nesting
    changed, the hyperparameters are taken from the live optimiser (they come from the
    flags anyway) and the step counter from the checkpoint."""
    live = engine.optimizer.state_dict()
    live_parts = live if isinstance(live, list) else [live]
    single = not isinstance(live, list)
    parts = [loaded] if single else [loaded[i] for i in range(len(live_parts))]
    step = _find_common_step(loaded)
    for part, live_part in zip(parts, live_parts, strict=True):
        groups = part.get("param_groups", [])
        if len(groups) != len(live_part["param_groups"]) or any(
            "lr" not in g for g in groups
        ):
            part["param_groups"] = [
                {**lg, "params": g.get("params", lg["params"])} if i < len(groups) else dict(lg)
                for i, (lg, g) in enumerate(
                    zip(live_part["param_groups"], groups + [{}] * len(live_part["param_groups"]),
                        strict=False)
                )
            ]
        state = part.setdefault("state", {})
        if step is not None and "common_step" not in state:
            state["common_step"] = step
    if single:
        return {k: v for k, v in loaded.items() if k in ("state", "param_groups") or
                not isinstance(k, int)}
    return {i: parts[i] for i in range(len(parts))}


def _find_common_step(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "common_step" in obj:
            return obj["common_step"]
        for value in obj.values():
            found = _find_common_step(value)
            if found is not None:
                return found
    return None


def _optimizer_has_state(engine: MegatronEngine) -> bool:
    """Adam's moments exist only after the first step; before it there is nothing to save
    (and a checkpoint of step 0 is a weights-only checkpoint)."""
    if engine.optimizer is None:
        return False
    optimizers = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
    return any(len(getattr(opt.optimizer, "state", {})) > 0 for opt in optimizers)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _prune(save_dir: str, keep_last: int) -> None:
    steps = sorted(complete_steps(save_dir))
    for step in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(save_dir, f"iter_{step:07d}"), ignore_errors=True)


def complete_steps(save_dir: str) -> list[int]:
    """Steps with a complete (renamed) checkpoint directory."""
    if not os.path.isdir(save_dir):
        return []
    steps = []
    for name in os.listdir(save_dir):
        if name.startswith("iter_") and not name.endswith(".tmp"):
            try:
                steps.append(int(name[5:]))
            except ValueError:
                continue
    return sorted(steps)


def latest_step(load_dir: str) -> int | None:
    """Step of the latest complete checkpoint, or None."""
    tracker = os.path.join(load_dir, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as handle:
            step = int(handle.read().strip())
        if os.path.isdir(os.path.join(load_dir, f"iter_{step:07d}")):
            return step
    steps = complete_steps(load_dir)
    return steps[-1] if steps else None


def load_checkpoint(
    engine: MegatronEngine,
    load_dir: str,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    load_scheduler: bool = True,
    step: int | None = None,
) -> dict[str, Any]:
    """Load the latest (or the given) checkpoint into ``engine``; returns its common state.

    ``load_scheduler=False`` keeps this run's learning-rate schedule (e.g. RL continuing
    from a cold start's weights and Adam moments with its own learning rate)."""
    step = latest_step(load_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {load_dir}")
    path = os.path.join(load_dir, f"iter_{step:07d}")
    common = torch.load(os.path.join(path, "common_state.pt"), weights_only=False)
    state: dict[str, Any] = {"model": _model_state(engine)}
    with_optimizer = load_optimizer and engine.optimizer is not None and common.get(
        "has_optimizer", True
    )
    if with_optimizer:
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            state["model"], is_loading=True, metadata=_METADATA
        )
    loaded = dist_checkpointing.load(state, path)
    for i, chunk in enumerate(engine.chunks):
        chunk.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    if with_optimizer:
        ours = [_hyperparameters(g) for g in engine.optimizer.param_groups]
        engine.optimizer.load_state_dict(_adapt_optimizer_state(loaded["optimizer"], engine))
        if engine.scheduler is not None and "scheduler" in common and load_scheduler:
            engine.scheduler.load_state_dict(common["scheduler"])
        elif engine.scheduler is not None:
            # The loaded param groups carry the old run's schedule (max_lr, min_lr, lr,
            # weight decay), which megatron's scheduler reads from the groups: put this
            # run's back, then apply its current learning rate.
            for group, hyper in zip(engine.optimizer.param_groups, ours, strict=True):
                group.update(hyper)
            engine.scheduler.step(increment=0)
    else:
        # Fresh optimiser on loaded weights: its fp32 main copies must follow the model.
        if engine.optimizer is not None:
            engine.optimizer.reload_model_params()
    rank_file = os.path.join(path, f"rank_{_rank():05d}.pt")
    if load_rng and os.path.isfile(rank_file):
        rank_state = torch.load(rank_file, weights_only=False)
        if rank_state["layout"] == _layout():
            set_rng_state(rank_state["rng"])
        else:
            logger.warning("checkpoint layout %s differs from %s: RNG states not restored",
                           rank_state["layout"], _layout())
    logger.info("loaded checkpoint of step %d from %s", step, path)
    return common
