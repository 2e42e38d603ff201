"""Weight sync: after a training step, the rollout servers get the trainer's weights.

How the RL loop uses it (every rank constructs it and calls it together; only rank 0
needs the rollout client)::

    sync = WeightSync(engine, model_config, tokenizer, f"{run_dir}/weights", keep=2,
                      client=client if rank == 0 else None)
    path = sync.export(version="0")        # collective: e.g. to start embedded servers
    ...
    result = sync.sync(version=str(step))  # collective: export + update every server

Disk mode (default): all ranks gather the sharded model to rank 0, which writes a Hugging
Face checkpoint to ``<weights_dir>/v<version>`` (under ``.partial``, renamed when
complete), calls ``/update_weights_from_disk`` with ``weight_version=version`` and
``flush_cache`` on every server, then deletes the oldest version directories beyond
``keep`` -- never the one the servers last accepted. Distributed mode: rank 0 gathers the
same tensors and broadcasts them, in buckets, to every server through a
:class:`~megatron_rl.weight_sync.broadcast.DistributedWeightUpdater` (SGLang's
``/update_weights_from_distributed``), no files; the servers are the client's worker URLs
that are not down, and the group is rebuilt whenever they change or restart.

The outcome is broadcast from rank 0, so every rank returns the same :class:`SyncResult`
or raises the same :class:`WeightSyncError` (naming the server and its answer). After a
refusal the servers keep serving their previous weights.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import torch
import torch.distributed as dist

from megatron_rl.model.config import ModelConfig
from megatron_rl.weight_sync.export import export_hf, gather_hf_tensors

if TYPE_CHECKING:
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.weight_sync.broadcast import DistributedWeightUpdater

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class WeightSyncError(RuntimeError):
    """The servers did not take the new weights (they keep serving the previous ones)."""


@dataclass(frozen=True)
class SyncResult:
    """What one weight sync did, in seconds."""

    version: str
    path: str | None
    """The checkpoint directory (disk mode), else None."""
    export_s: float
    """Gathering and writing the weights (distributed mode: gathering them)."""
    update_s: float
    """The servers loading them (disk mode); distributed mode: broadcasting them and the
    servers loading them."""
    total_s: float
    bytes: int
    servers: int
    """Servers updated (0 without a client)."""

    def metrics(self) -> dict[str, float]:
        return {
            "weight_sync/export_s": self.export_s,
            "weight_sync/update_s": self.update_s,
            "weight_sync/total_s": self.total_s,
            "weight_sync/mb": self.bytes / 1e6,
        }


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def check_version(version: str) -> str:
    """Versions name directories and travel to servers: keep them plain."""
    version = str(version)
    if not _VERSION.fullmatch(version):
        raise ValueError(
            f"weight version {version!r} must be letters, digits, '.', '_' or '-' "
            "(e.g. the RL step)"
        )
    return version


class WeightSync:
    """Exports the trainer's weights and pushes them to the rollout servers."""

    def __init__(
        self,
        model: Any,
        model_config: ModelConfig,
        tokenizer: Any = None,
        weights_dir: str | os.PathLike = "weights",
        *,
        keep: int = 2,
        client: RolloutClient | None = None,
        mode: Literal["disk", "distributed"] = "disk",
        updater: DistributedWeightUpdater | None = None,
        dtype: torch.dtype | None = None,
        flush_cache: bool = True,
    ):
        """``model``: a MegatronEngine or its list of model chunks. ``tokenizer`` (a
        tokenizer object, 'char' or a directory; default ``model_config.tokenizer``) is
        written beside the weights. ``client`` and ``updater`` matter on rank 0 only.
        ``dtype`` casts the exported weights (e.g. bf16 for SGLang)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the served version), got {keep}")
        if mode not in ("disk", "distributed"):
            raise ValueError(f"weight sync mode {mode!r} is not 'disk' or 'distributed'")
        if mode == "distributed" and _rank() == 0 and updater is None:
            raise ValueError("mode='distributed' needs a DistributedWeightUpdater on rank 0")
        self.model, self.model_config, self.tokenizer = model, model_config, tokenizer
        self.weights_dir = Path(weights_dir)
        self.client, self.updater = client, updater
        self.keep, self.mode = keep, mode
        self.dtype, self.flush_cache = dtype, flush_cache
        self.version: str | None = None
        """Version the servers accepted last (None before the first sync)."""

    @property
    def chunks(self) -> Sequence[torch.nn.Module]:
        return self.model.chunks if hasattr(self.model, "chunks") else list(self.model)

    def path_of(self, version: str) -> Path:
        return self.weights_dir / f"v{check_version(version)}"

    def reload_path(self, version: str) -> str | None:
        """The checkpoint of ``version`` if it is on disk (a restarted server can load it);
        None for a version that only travelled over the network."""
        path = self.path_of(version)
        return str(path) if path.is_dir() else None

    def targets(self) -> list[str]:
        """Rank 0: the servers a distributed update goes to: all of the client's workers,
        a server the client declared down included -- the updater leaves out those that do
        not answer, and one that is back (restarted) gets the weights and can rejoin."""
        return [] if self.client is None else list(self.client.servers.worker_urls)

    def export(self, version: str | int) -> str:
        """Collective: write ``<weights_dir>/v<version>``; returns its path on every rank
        once it is complete. Prunes old versions (see :meth:`prune`)."""
        path = self.path_of(str(version))
        self._export(path)
        if _rank() == 0:
            self.prune(keep=path)
        _from_rank0(None)  # nobody returns before rank 0 has renamed the directory
        return str(path)

    def _export(self, path: Path):
        return export_hf(
            self.chunks, self.model_config, path, dtype=self.dtype, tokenizer=self.tokenizer
        )

    def sync(self, version: str | int) -> SyncResult:
        """Collective: export the weights and update every server to ``version``."""
        version = check_version(str(version))
        started = time.perf_counter()
        if self.mode == "disk":
            outcome = self._sync_disk(version, started)
        else:
            outcome = self._sync_distributed(version, started)
        outcome = _from_rank0(outcome)
        if isinstance(outcome, str):
            raise WeightSyncError(outcome)
        self.version = version
        if _rank() == 0:
            logger.info(
                "weight sync v%s: export %.2f s, update %.2f s, %.1f MB, %d server(s)",
                version, outcome.export_s, outcome.update_s, outcome.bytes / 1e6,
                outcome.servers,
            )  # fmt: skip
        return outcome

    def _sync_disk(self, version: str, started: float) -> SyncResult | str | None:
        path = self.path_of(version)
        stats = self._export(path)
        if stats is None:  # not rank 0: the outcome comes from rank 0
            return None
        exported = time.perf_counter()
        try:
            servers = self.update_servers(str(path), version)
        except WeightSyncError as exc:
            self.prune(keep=path)
            return str(exc)
        done = time.perf_counter()
        self.version = version  # rank 0 prunes with the new served version
        self.prune(keep=path)
        return SyncResult(
            version, str(path), exported - started, done - exported, done - started,
            stats.bytes, servers,
        )  # fmt: skip

    def _sync_distributed(self, version: str, started: float) -> SyncResult | str | None:
        tensors = gather_hf_tensors(self.chunks, self.model_config, dtype=self.dtype)
        if _rank() != 0:
            for _ in tensors:  # drive the sends of this rank's shards
                pass
            return None
        targets = self.targets()
        try:
            if targets:
                targets = self.updater.ensure_connected(targets)
                stats = self.updater.push(tensors, version)
            else:  # no server to update (no client): the gather still runs everywhere
                for _ in tensors:
                    pass
        except (RuntimeError, ValueError, httpx.HTTPError) as exc:
            for _ in tensors:  # receive the rest, or the other ranks wait in send forever
                pass
            served = self.version if self.version is not None else "their previous weights"
            return (
                f"weight sync of version {version} over {self.updater.group_name} failed: "
                f"{exc}. Servers that refused keep serving {served}."
            )
        if not targets:
            elapsed = time.perf_counter() - started
            return SyncResult(version, None, elapsed, 0.0, elapsed, 0, 0)
        if self.client is not None:
            # Pushed over the network: no checkpoint a restarted server could reload.
            self.client.servers.note_weights(version)
        elapsed = time.perf_counter() - started
        return SyncResult(
            version, None, elapsed - stats.send_seconds, stats.send_seconds, elapsed,
            stats.bytes, len(targets),
        )  # fmt: skip

    def update_servers(self, path: str, version: str) -> int:
        """Rank 0: ``/update_weights_from_disk`` on every server; returns how many.
        Raises :class:`WeightSyncError` with each server's answer on a refusal."""
        if self.client is None:
            return 0
        from megatron_rl.rollout.protocol import RolloutServerError

        try:
            self.client.update_weights_from_disk(path, version, flush_cache=self.flush_cache)
        except RolloutServerError as exc:
            served = self.version if self.version is not None else "their previous weights"
            raise WeightSyncError(
                f"weight sync of version {version} from {path} was refused: {exc}. Servers "
                f"that refused keep serving {served}."
            ) from exc
        # The workers, not the generation URLs: through a router those are one URL.
        return len(self.client.servers.live_workers())

    def prune(self, keep: Path) -> list[Path]:
        """Delete version directories beyond the newest ``self.keep`` (by modification
        time), sparing ``keep`` and the version the servers last accepted."""
        if not self.weights_dir.is_dir():
            return []
        spared = {keep} | ({self.path_of(self.version)} if self.version is not None else set())
        versions = [
            p for p in self.weights_dir.iterdir()
            if p.is_dir() and p.name.startswith("v") and not p.name.endswith(".partial")
        ]  # fmt: skip
        newest_first = sorted(versions, key=lambda p: p.stat().st_mtime, reverse=True)
        kept = set(newest_first[: self.keep]) | spared
        removed = [p for p in newest_first if p not in kept]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed


def _from_rank0(value):
    """Rank 0's value, on every rank (also a barrier)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
