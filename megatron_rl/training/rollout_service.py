"""The trainer's side of the rollout servers: start, generate, check, sync, stop.

Without ``--rl-rollout-url`` global rank 0 starts the embedded SGLang-compatible
server(s) on the policy's exported weights: processes of their own, or with
``--rl-rollout-colocate`` one served from rank 0's process (``inference.colocated``). Each data group's leader holds a client:
``/generate`` goes to ``--rl-rollout-url`` (servers or one sglang-router), weight updates
to ``--rl-rollout-worker-urls`` (default: the same servers).
After every step the policy is exported in Hugging Face format (collective: sharded
weights are gathered) and rank 0 asks every server to load it with the step as the
new ``weight_version``; every rollout sample must then carry that version.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable

import torch.distributed as dist

from megatron_rl.inference.embedded import start_embedded_servers
from megatron_rl.inference.launcher import ServerHandle, start_server_process
from megatron_rl.inference.supervisor import ServerSupervisor
from megatron_rl.rollout.client import RolloutClient, run_sync
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.trajectory import TrajectoryGenerator
from megatron_rl.rollout.types import RolloutRequest, RolloutSample
from megatron_rl.training.engine import MegatronEngine
from megatron_rl.weight_sync.broadcast import DistributedWeightUpdater
from megatron_rl.weight_sync.hf_config import ModelShape
from megatron_rl.weight_sync.sync import WeightSync

logger = logging.getLogger(__name__)


class WeightVersionError(RuntimeError):
    """A rollout sample was generated with weights other than the trainer's policy."""


class RolloutService:
    """Servers, client and weight sync of one rank (most of it lives on rank 0 and on
    the data-group leaders; every rank takes part in the collective export)."""

    def __init__(
        self,
        engine: MegatronEngine,
        run,
        config: RolloutConfig,
        tokenizer,
        *,
        return_routed_experts: bool,
        is_leader: bool,
        sync_dir: str | None,
        keep_versions: int,
    ) -> None:
        self.engine, self.run, self.config, self.tokenizer = engine, run, config, tokenizer
        self.return_routed_experts = return_routed_experts
        self.is_leader = is_leader
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self._tmp = None
        if sync_dir is None:
            if run.checkpoint.save:
                sync_dir = os.path.join(run.checkpoint.save, "weights")
            else:
                self._tmp = tempfile.mkdtemp(prefix="megatron_rl_weights_")
                sync_dir = self._tmp
        self.sync_dir = sync_dir
        rl, mode = run.rl, run.rl.weight_sync_mode(run)
        updater = None
        if mode == "distributed" and self.rank0:
            updater = DistributedWeightUpdater(
                api_key=config.resolved_api_key(), timeout_s=rl.weight_sync_timeout_s,
                bucket_bytes=rl.weight_sync_bucket_mb * 1024**2,
            )  # fmt: skip
        self.weights = WeightSync(engine, run.model, tokenizer, sync_dir, keep=keep_versions,
                                  mode=mode, updater=updater)  # fmt: skip
        """Rank 0 gets the client once it exists (start); the others only export."""
        self.servers = []
        self.supervisor: ServerSupervisor | None = None
        """Rank 0, embedded servers: restarts one that dies (see _restart_server)."""
        self.client: RolloutClient | None = None
        self.version: str | None = None

    def start(self, version: int) -> None:
        """Export the current policy, start or update the servers, connect the clients."""
        urls = list(self.config.urls)
        if not urls:
            path = self.weights.export(str(version))
            if self.rank0:
                self.servers = start_embedded_servers(path, self.config,
                                                      weight_version=str(version),
                                                      log_dir=self._server_log_dir())
                if not self.config.colocate:  # a colocated server lives with this process
                    self.supervisor = ServerSupervisor(self.servers, self._restart_server,
                                                       policy=self.config.on_server_failure)
                urls = [s.url for s in self.servers]
            urls = _broadcast(urls)
        if self.is_leader:
            self.client = RolloutClient(
                self.config, ModelShape.from_model_config(self.run.model), urls=urls,
                return_routed_experts=self.return_routed_experts,
            )
            # Waits for external servers (and a router) to come up, finds a router's
            # workers, checks every server against the model (and r3's routed experts).
            self.client.connect()
        if self.rank0:
            self.weights.client = self.client
        if self.config.urls:
            # External servers hold whatever they were started with: push this policy.
            self.weights.sync(str(version))
        self._note(str(version))

    def generate(self, requests: list[RolloutRequest], batch_id: str,
                 on_sample: Callable[[RolloutSample], None] | None = None) -> list[RolloutSample]:
        assert self.client is not None, "only data-group leaders generate"
        self._check_servers()
        return self.client.generate_batch(requests, batch_id, on_sample=on_sample)

    def generate_trajectories(self, requests: list[RolloutRequest], items: dict,
                              batch_id: str, generator: TrajectoryGenerator,
                              on_sample: Callable[[RolloutSample], None] | None = None,
                              ) -> list[RolloutSample]:
        """Multi-turn rollouts: ``generator``'s function run for every request."""
        assert self.client is not None, "only data-group leaders generate"
        self._check_servers()
        generator.core = self.client.core
        shape = ModelShape.from_model_config(self.run.model)
        route_shape = (len(shape.moe_layers), shape.num_experts_per_tok)
        return run_sync(generator.generate(requests, items, batch_id, route_shape=route_shape,
                                           on_sample=on_sample))

    def _check_servers(self) -> None:
        """Restart a dead embedded server (or raise if it may not be); a colocated one
        that stopped on its own raises, naming why."""
        if self.supervisor is not None:
            self.supervisor.check()
        if self.config.colocate:
            for server in self.servers:
                server.check()

    def check_versions(self, samples: list[RolloutSample], policy: str,
                       expected: str | None = None) -> None:
        """Every sample must come from the weights ``expected`` (default: those the
        trainer last synced; under --rl-rollout-ahead 1 a batch generated ahead expects the
        version before)."""
        if policy == "off":
            return
        want = self.version if expected is None else expected
        stale = [s for s in samples if s.weight_version != want]
        if not stale:
            return
        first = stale[0]
        why = ("the trainer's policy is" if want == self.version
               else f"the trainer's policy is {self.version!r} and the batch was generated ahead by")
        message = (f"{len(stale)} of {len(samples)} rollout samples were generated with weight "
                   f"version {first.weight_version!r} (e.g. {first.request_id} from "
                   f"{first.server_url}), but {why} version {want!r}")
        if policy == "strict":
            raise WeightVersionError(message)
        logger.warning(message)

    def sync(self, version: int) -> dict[str, float]:
        """Export the updated policy and load it on every server (collective)."""
        if self.supervisor is None:
            self._check_servers()
            result = self.weights.sync(str(version))
            self._note(str(version))
        else:
            # A dead server is restarted before the update (not during: the lock), so the
            # update reaches it and a later restart serves this version.
            with self.supervisor.lock:
                self.supervisor.check()
                result = self.weights.sync(str(version))
                self._note(str(version))
        metrics = {"time/sync_export": result.export_s, "time/sync_update": result.update_s,
                   "sync/megabytes": result.bytes / 1e6}
        if self.config.embedded:
            restarts = self.supervisor.restarts if self.supervisor is not None else 0
            metrics["rollout/server_restarts"] = float(restarts)
        return metrics

    def _server_log_dir(self) -> str | None:
        """Embedded servers' logs are kept under --save; without it they are temporary."""
        save = self.run.checkpoint.save
        return os.path.join(save, "rollout_server_logs") if save else None

    def _restart_server(self, old: ServerHandle) -> ServerHandle:
        """A server like ``old`` on its port (the clients keep their URL), serving the
        policy version the trainer last synced."""
        version = self.version
        path = self.weights.path_of(version)
        if not path.is_dir():
            raise RuntimeError(f"policy version {version} is not on disk ({path}) to restart from")
        if self.weights.updater is not None:
            self.weights.updater.reset()  # the new process holds no weight-update group
        config = self.config
        return start_server_process(
            path, port=int(old.url.rsplit(":", 1)[1]), host=config.host,
            api_key=config.resolved_api_key(),
            dtype=config.dtype, max_batch_size=config.max_batch_size, threads=config.threads,
            quantization=config.quantization, weight_version=version,
            startup_timeout_s=config.startup_timeout_s, log_dir=self._server_log_dir(),
        )  # fmt: skip

    def _note(self, version: str) -> None:
        self.version = version
        if self.client is not None:
            # Leaders other than rank 0 learn of the update here; with the path they can
            # reload it on a server that restarts.
            self.client.servers.note_weights(version, self.weights.reload_path(version))

    def close(self, clean: bool = True) -> None:
        """Stop the servers this rank started. ``clean``: every rank got here normally,
        so wait until none is still talking to the servers (after a failure, don't)."""
        if clean and dist.is_initialized():
            dist.barrier()
        if self.supervisor is not None:
            self.supervisor.close()
        if self.weights.updater is not None:
            self.weights.updater.close()
        for server in self.servers:
            server.stop()
        self.servers = []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _broadcast(urls: list[str]) -> list[str]:
    if not dist.is_initialized():
        return urls
    box = [urls]
    dist.broadcast_object_list(box, src=0)
    return box[0]
