"""Checkpoints: megatron-core distributed checkpoints that survive a crash mid-write.

Layout of a save directory::

    iter_0000010/            complete checkpoint of step 10 (dist_checkpointing format)
        common_state.pt      scheduler, step, data position, policy version, ... (rank 0)
        rank_00000.pt        this rank's RNG states (restored only at the same layout)
        rollout_ahead_dp000.*  RL with --rl-rollout-ahead: the batch generated ahead
    latest_checkpointed_iteration.txt

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed once every rank has
finished; ``latest_checkpointed_iteration.txt`` is replaced atomically after that. A
process killed while writing therefore leaves the previous checkpoint as the latest.
Model and optimiser use the fully reshardable formats, so a checkpoint saved at one
parallel layout (e.g. EP=2) loads at another (EP=1).

A checkpoint is data, never code. Our own files are read with ``torch.load(...,
weights_only=True)`` (numpy's RNG state is the only allow-listed type), and before
megatron-core and torch.distributed.checkpoint unpickle anything of the distributed part
(``.metadata`` with plain ``pickle``, non-tensor items with ``weights_only=False``),
:func:`verify_checkpoint` reads ``.metadata`` with an unpickler that knows only the
metadata classes, checks every non-tensor item with ``weights_only=True`` and every
``.distcp`` file's size. A damaged or foreign file raises :class:`CheckpointError`
naming it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_rl.training.engine import MegatronEngine

if TYPE_CHECKING:
    from megatron_rl.training.config import CheckpointConfig

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
# Layout-independent formats: optimiser state keyed by parameter, never by the position
# of an optimiser in a chain (EP>1 chains dense and expert optimisers, EP=1 may not).
_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, damaged, or holding more than data."""


def _numpy_rng_globals() -> list:
    """numpy's RNG state (a uint32 array) in the rank files: the one non-torch type a
    checkpoint of this package holds. Named as numpy 2 and numpy 1 pickle it."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _load_data(source: str | io.BytesIO, where: str, *, numpy_rng: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only,
    so nothing in the file can run code. ``where`` names the file (or item) in errors."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals() if numpy_rng else []):
            return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{where} is missing") from exc
    except pickle.UnpicklingError as exc:
        # torch's own advice (allow-list the global) is not ours to give.
        refused = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{where} holds more than data ({refused.group(0)}): refusing to load it, since "
                "unpickling it could run code. A checkpoint may hold only tensors, numbers, "
                "strings and containers") from exc
        raise CheckpointError(f"{where} is damaged: {_first_line(exc)}") from exc
    except (EOFError, RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{where} is damaged: {_first_line(exc) or type(exc).__name__}"
                              f" (empty or truncated?)") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Everything torch.distributed.checkpoint's ``.metadata`` pickles (torch 2.x). Plain
# ``pickle.load`` of that file would run whatever a crafted file asks for.
_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = frozenset(
    [("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("collections", "OrderedDict"), (f"{_DCP}.filesystem", "_StorageInfo")]
    + [(f"{_DCP}.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")]
    + [(f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")]
    # StorageMeta.checkpoint_id may be a path (pathlib._local from Python 3.13 on).
    + [(module, name) for module in ("pathlib", "pathlib._local") for name in (
        "Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")]
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a type of torch.distributed.checkpoint's metadata")


def _read_dcp_metadata(path: str) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    where = os.path.join(path, ".metadata")
    try:
        with open(where, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{where} is missing") from exc
    except pickle.UnpicklingError as exc:
        if "is not a type of" in str(exc):
            raise CheckpointError(
                f"{where} holds more than checkpoint metadata ({exc}): refusing to load it, "
                "since unpickling it could run code") from exc
        raise CheckpointError(f"{where} is damaged: {_first_line(exc)}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{where} is damaged: {_first_line(exc)}") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where} is damaged: it holds a {type(metadata).__name__}, "
                              "not torch.distributed.checkpoint metadata")
    return metadata


def _check_dcp_files(path: str, metadata: Any) -> None:
    """Every item the metadata lists lies inside an existing ``.distcp`` file of ``path``;
    every non-tensor item (unpickled by torch with ``weights_only=False``) is plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}/.metadata points outside the checkpoint ({name!r})")
        file = os.path.join(path, name)
        if name not in sizes:
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is missing (listed in {path}/.metadata)")
            sizes[name] = os.path.getsize(file)
        end = info.offset + info.length
        if info.offset < 0 or info.length < 0 or end > sizes[name]:
            raise CheckpointError(
                f"{file} is truncated: {sizes[name]} bytes, but {path}/.metadata places "
                f"{index.fqn} at bytes {info.offset}-{end}")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if info.transform_descriptors:
                raise CheckpointError(f"{file}: item {index.fqn} is stored with transforms "
                                      f"{info.transform_descriptors}, which this package never "
                                      "writes and cannot check")
            with open(file, "rb") as handle:
                handle.seek(info.offset)
                data = handle.read(info.length)
            _load_data(io.BytesIO(data), f"{file} (item {index.fqn})")


def _check_backend(path: str) -> bool:
    """megatron picks its loader from ``metadata.json``; only the formats we write.
    Returns whether the common state is a separate ``common.pt`` (megatron-core <= 0.16
    names ``common_backend: torch``); from 0.17 on, megatron writes no ``common_backend``
    and keeps the common state among the torch_dist items, which
    :func:`_check_dcp_files` checks like every other non-tensor item."""
    where = os.path.join(path, "metadata.json")
    try:
        with open(where) as handle:
            backend = json.load(handle)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{where} is missing") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where} is damaged: {_first_line(exc)}") from exc
    if not isinstance(backend, dict) or backend.get("sharded_backend") != "torch_dist" or \
            backend.get("common_backend", None) not in ("torch", None):
        raise CheckpointError(f"{where} names backends {backend!r}; this package writes and "
                              "reads only sharded_backend torch_dist, with common_backend "
                              "torch (megatron-core <= 0.16) or none (>= 0.17)")
    return backend.get("common_backend") == "torch"


def _check_common(common: Any, where: str) -> dict[str, Any]:
    if not isinstance(common, dict) or not isinstance(common.get("step"), int):
        raise CheckpointError(f"{where} is damaged: no step number in it (holds "
                              f"{type(common).__name__} {str(common)[:80]})")
    if common.get("stage") == "rl":
        missing = [key for key in ("data_position", "policy_version")
                   if not isinstance(common.get(key), int)]
        if missing:
            raise CheckpointError(f"{where} is damaged: an RL checkpoint without {missing}")
    return common


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check the checkpoint directory ``path`` (``.../iter_XXXXXXX``) before anything in it
    is unpickled, and return its common state. Raises :class:`CheckpointError` naming the
    file that is missing, damaged, truncated, or holds more than data."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    common = read_common_state(path)
    separate_common = _check_backend(path)
    _check_dcp_files(path, _read_dcp_metadata(path))
    common_pt = os.path.join(path, "common.pt")
    if separate_common or os.path.exists(common_pt):
        # megatron reads it whenever metadata.json names it; check one that lies about
        # being absent too, rather than leave a pickle in the directory unchecked.
        _load_data(common_pt, common_pt)
    return common


def read_common_state(path: str) -> dict[str, Any]:
    """``common_state.pt`` of the checkpoint directory ``path``, loaded as data only."""
    where = os.path.join(path, "common_state.pt")
    return _check_common(_load_data(where, where), where)


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
    write_extra: Callable[[str], None] | None = None,
) -> str:
    """Save model, optimiser, scheduler and ``common_state``; collective over all ranks.

    ``write_extra(directory)``, called on every rank, adds this rank's own data files to
    the checkpoint before it is renamed complete (the RL loop's rollout batch generated
    ahead), so they are saved, pruned and found together with it."""
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
    if write_extra is not None:
        write_extra(tmp)
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


def _run_group_keys() -> tuple[str, ...]:
    """Param-group settings that belong to the run, not to the checkpoint, when a run
    continues another's Adam state under its own schedule: the schedule's keys and every
    key megatron pairs a saved param group with a live one by (its
    ``param_group_identifier_keys``: ``wd_mult``, ``lr_mult``, ``is_expert_parallel``,
    ``is_decoupled_lr`` in 0.16; 0.19 adds ``max_lr``, ``min_lr``, ``start_wd``,
    ``end_wd``, ``optimizer``, so a saved group whose learning rate differs from the live
    one's no longer pairs)."""
    try:
        from megatron.core.optimizer.optimizer import param_group_identifier_keys
    except ImportError:  # a release without it pairs groups by position
        param_group_identifier_keys = ()
    return tuple(dict.fromkeys((*_SCHEDULE_KEYS, *param_group_identifier_keys)))


def _param_group_lists(state: Any) -> list[list[dict]]:
    """Every ``param_groups`` list in an optimiser state dict, in order (chained
    optimisers by index, a mixed-precision optimiser's nested ``optimizer`` entry)."""
    found: list[list[dict]] = []
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "param_groups" and isinstance(value, list):
                found.append(value)
            else:
                found.extend(_param_group_lists(value))
    elif isinstance(state, list):
        for value in state:
            found.extend(_param_group_lists(value))
    return found


def _keep_run_group_settings(loaded: dict, engine: MegatronEngine) -> None:
    """Give the loaded param groups this run's settings (:func:`_run_group_keys`) before
    megatron loads them: the groups are paired by position (same model, same grouping
    code), so megatron's own pairing by those keys then finds every group, and the
    scheduler reads this run's learning rates and weight decay from them. Adam's moments
    and step count stay the checkpoint's."""
    keys = _run_group_keys()
    live_lists = _param_group_lists(engine.optimizer.state_dict())
    loaded_lists = _param_group_lists(loaded)
    if [len(g) for g in live_lists] != [len(g) for g in loaded_lists]:
        raise CheckpointError(
            "the checkpoint's optimiser has param groups "
            f"{[len(g) for g in loaded_lists]}, this run's {[len(g) for g in live_lists]}: "
            "cannot continue its optimiser state (use --no-load-optim)")
    for live_groups, loaded_groups in zip(live_lists, loaded_lists, strict=True):
        for live_group, loaded_group in zip(live_groups, loaded_groups, strict=True):
            for key in keys:
                if key in live_group:
                    loaded_group[key] = live_group[key]
                else:
                    loaded_group.pop(key, None)


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
    """Step of the latest complete checkpoint, or None.

    The tracker names it. A tracker that is not a step number is damaged (the package
    writes it atomically, so something else did): that is reported, and the newest
    checkpoint that passes :func:`verify_checkpoint` is used instead."""
    tracker = os.path.join(load_dir, TRACKER)
    steps = complete_steps(load_dir)
    if os.path.isfile(tracker):
        with open(tracker, errors="replace") as handle:
            text = handle.read()
        try:
            step = int(text.strip())
        except ValueError:
            return _newest_intact(load_dir, steps, f"{tracker} is damaged (it holds "
                                                   f"{text[:40]!r}, not a step number)")
        if step in steps:
            return step
        # Renamed before the tracker is written: a tracker naming a missing directory was
        # edited or its checkpoint deleted by hand.
        _warn_once(f"{tracker} names step {step}, which has no complete checkpoint in "
                   f"{load_dir}; using the newest complete one "
                   f"({_iter_name(steps[-1]) if steps else 'none'})")
    return steps[-1] if steps else None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # latest_step is asked several times per start-up (checks, then the load itself).
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _newest_intact(load_dir: str, steps: list[int], why: str) -> int | None:
    for step in reversed(steps):
        try:
            verify_checkpoint(os.path.join(load_dir, _iter_name(step)))
        except CheckpointError as exc:
            _warn_once(f"{why}; skipping {_iter_name(step)}: {exc}")
            continue
        _warn_once(f"{why}; falling back to the newest intact checkpoint, "
                   f"{os.path.join(load_dir, _iter_name(step))}")
        return step
    _warn_once(f"{why}, and no checkpoint in {load_dir} is intact")
    return None


@dataclass(frozen=True)
class LoadSource:
    """The checkpoint a run starts from (see :func:`find_load_source`)."""

    directory: str
    step: int
    common: dict[str, Any]
    resume: bool
    """Continue that checkpoint's own run: its step, data position and optimiser."""

    @property
    def path(self) -> str:
        """The checkpoint's own directory (``iter_XXXXXXX``)."""
        return os.path.join(self.directory, _iter_name(self.step))


def find_load_source(cp: CheckpointConfig, stage: str) -> LoadSource | None:
    """The checkpoint a run of ``stage`` starts from, verified; None to start afresh.

    RL resumes its own run from ``--save`` (a checkpoint of stage rl), else starts from
    ``--load``'s weights; SFT resumes from ``--load``. A ``--load`` without a complete
    checkpoint is refused (training from random weights is never a fallback), except when
    it is also ``--save``: the first launch of a job that resumes itself."""
    candidates = [cp.save, cp.load] if stage == "rl" else [cp.load]
    for directory in candidates:
        if not directory:
            continue
        step = latest_step(directory)
        if step is None:
            continue
        common = verify_checkpoint(os.path.join(directory, _iter_name(step)))
        if stage == "rl" and common.get("stage") == "rl" and not cp.finetune:
            return LoadSource(directory, step, common, resume=True)
        if directory == cp.load:
            return LoadSource(directory, step, common,
                              resume=stage == "sft" and not cp.finetune)
    if cp.load and cp.load != cp.save:
        if not os.path.isdir(cp.load):
            raise CheckpointError(f"--load {cp.load}: no such directory")
        found = sorted(os.listdir(cp.load))
        raise CheckpointError(
            f"--load {cp.load} holds no complete checkpoint (no {TRACKER} or iter_XXXXXXX/ "
            f"directory; found {found[:8] if found else 'nothing'}); refusing to train from "
            "random weights")
    if cp.load:
        logger.info("no checkpoint in %s yet (--load = --save): starting from step 0", cp.load)
    return None


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
        raise CheckpointError(f"no complete checkpoint in {load_dir}")
    path = os.path.join(load_dir, _iter_name(step))
    common = verify_checkpoint(path)
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
        optimizer_state = _adapt_optimizer_state(loaded["optimizer"], engine)
        own_schedule = engine.scheduler is not None and not (
            load_scheduler and "scheduler" in common)
        if own_schedule:
            # The loaded param groups carry the old run's schedule (max_lr, min_lr, lr,
            # weight decay), which megatron's scheduler reads from the groups: give them
            # this run's before loading (megatron >= 0.19 pairs groups by these keys).
            _keep_run_group_settings(optimizer_state, engine)
        engine.optimizer.load_state_dict(optimizer_state)
        if own_schedule:
            engine.scheduler.step(increment=0)  # apply this run's current learning rate
        elif engine.scheduler is not None:
            engine.scheduler.load_state_dict(common["scheduler"])
    else:
        # Fresh optimiser on loaded weights: its fp32 main copies must follow the model.
        if engine.optimizer is not None:
            engine.optimizer.reload_model_params()
    rank_file = os.path.join(path, f"rank_{_rank():05d}.pt")
    if load_rng and os.path.isfile(rank_file):
        rank_state = _load_data(rank_file, rank_file, numpy_rng=True)
        if rank_state["layout"] == _layout():
            set_rng_state(rank_state["rng"])
        else:
            logger.warning("checkpoint layout %s differs from %s: RNG states not restored",
                           rank_state["layout"], _layout())
    logger.info("loaded checkpoint of step %d from %s", step, path)
    return common
