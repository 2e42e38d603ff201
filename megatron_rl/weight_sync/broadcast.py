"""Weight update over a collective group: SGLang's ``/init_weights_update_group`` and
``/update_weights_from_distributed`` (GPU clusters; faster than writing to disk).

Trainer rank 0 and every tensor-parallel rank of every server form one process group
(NCCL on GPUs): rank 0 is the trainer, server ``i`` takes ranks ``rank_offset_i ..
rank_offset_i + world_size_i - 1``. For each bucket of tensors the trainer posts the
names, dtypes and shapes to every server, which then receive the tensors by broadcast
from rank 0 in that order and load them. The last bucket carries the weight version and
the cache flush, so a server switches version only once it holds every tensor.

The group is separate from the trainer's own ``torch.distributed`` world, so it is
built with torch's rendezvous and process-group helper, as SGLang's own
``init_custom_process_group`` does on the server side. A server that refuses a bucket
without joining its broadcast leaves the broadcast to time out (``timeout_s``): SGLang's
protocol has no way to say "stop" once the broadcast started.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import inspect
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpx
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def init_external_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: datetime.timedelta,
) -> dist.ProcessGroup:
    """A process group with processes outside this job's world (here: inference servers)."""
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefixed = c10d.PrefixStore(group_name, store)
    # The options keyword was renamed across torch releases (pg_options -> backend_options).
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options_key = "backend_options" if "backend_options" in params else "pg_options"
    group, _ = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        prefixed,
        group_name=group_name,
        timeout=timeout,
        **{options_key: None},
    )
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


@dataclass(frozen=True)
class BroadcastStats:
    tensors: int
    bytes: int
    buckets: int
    seconds: float


class DistributedWeightUpdater:
    """Pushes weights from trainer rank 0 to SGLang servers over a collective group."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        master_address: str,
        master_port: int,
        server_world_sizes: Sequence[int] | None = None,
        group_name: str = "megatron_rl_weight_sync",
        backend: str = "nccl",
        api_key: str | None = None,
        timeout_s: float = 600.0,
        bucket_bytes: int = 512 * 1024**2,
        flush_cache: bool = True,
    ):
        """``server_world_sizes``: ranks each server brings (its tensor-parallel size x
        pipeline size; default 1 each)."""
        if not urls:
            raise ValueError("DistributedWeightUpdater needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.sizes = list(server_world_sizes or [1] * len(self.urls))
        if len(self.sizes) != len(self.urls) or min(self.sizes) < 1:
            raise ValueError(
                f"server_world_sizes {self.sizes} must give one size >= 1 per URL "
                f"({len(self.urls)} URLs)"
            )
        self.master_address, self.master_port = master_address, int(master_port)
        self.group_name, self.backend = group_name, backend
        self.api_key, self.timeout_s = api_key, timeout_s
        self.bucket_bytes, self.flush_cache = bucket_bytes, flush_cache
        self.group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return 1 + sum(self.sizes)

    # ---- request bodies (SGLang's InitWeightsUpdateGroupReqInput and
    # UpdateWeightsFromDistributedReqInput) ---------------------------------------------

    def init_group_requests(self) -> list[tuple[str, dict]]:
        """(url, body) of ``/init_weights_update_group`` for every server."""
        out, offset = [], 1
        for url, size in zip(self.urls, self.sizes, strict=True):
            out.append(
                (
                    url,
                    {
                        "master_address": self.master_address,
                        "master_port": self.master_port,
                        "rank_offset": offset,
                        "world_size": self.world_size,
                        "group_name": self.group_name,
                        "backend": self.backend,
                    },
                )
            )
            offset += size
        return out

    def update_request(
        self, tensors: Sequence[tuple[str, torch.Tensor]], *, version: str | None, last: bool
    ) -> dict:
        """Body of ``/update_weights_from_distributed`` announcing one bucket."""
        body = {
            "names": [name for name, _ in tensors],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in tensors],
            "shapes": [list(t.shape) for _, t in tensors],
            "group_name": self.group_name,
            "flush_cache": self.flush_cache and last,
        }
        if last and version is not None:
            body["weight_version"] = str(version)
        return body

    # ---- the real thing ---------------------------------------------------------------

    def _post(self, url: str, path: str, body: dict) -> str | None:
        """None on success, else a description naming the server."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = httpx.post(
                f"{url}{path}", json=body, headers=headers, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            return f"{url}{path}: {type(exc).__name__}: {exc}"
        try:
            success = response.json().get("success", True)
        except (ValueError, AttributeError):
            success = True
        if response.status_code != 200 or success is False:
            return f"{url}{path}: HTTP {response.status_code}: {response.text[:300]}"
        return None

    def _call_all(self, requests: list[tuple[str, str, dict]], work) -> None:
        """Post to every server while ``work()`` runs here (the servers block on the
        collective until this side joins it)."""
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(self._post, *r) for r in requests]
            work()
            errors = [e for e in (f.result() for f in futures) if e]
        if errors:
            raise RuntimeError("distributed weight update failed: " + "; ".join(errors))

    def connect(self) -> None:
        """Create the group with every server (call once, on trainer rank 0)."""
        timeout = datetime.timedelta(seconds=self.timeout_s)

        def join() -> None:
            self.group = init_external_group(
                self.backend,
                f"tcp://{self.master_address}:{self.master_port}",
                self.world_size,
                0,
                self.group_name,
                timeout,
            )

        self._call_all(
            [(u, "/init_weights_update_group", b) for u, b in self.init_group_requests()], join
        )
        logger.info(
            "weight update group %s: %d ranks (%s)", self.group_name, self.world_size, self.backend
        )

    def push(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> BroadcastStats:
        """Send every tensor, in buckets of about ``bucket_bytes``; the last bucket sets
        ``version`` and flushes the servers' caches."""
        if self.group is None:
            raise RuntimeError("call connect() before push()")
        started = time.perf_counter()
        bucket: list[tuple[str, torch.Tensor]] = []
        size = count = total = buckets = 0
        for name, tensor in tensors:
            if bucket and size + tensor.numel() * tensor.element_size() > self.bucket_bytes:
                self._send(bucket, version=None, last=False)
                buckets, bucket, size = buckets + 1, [], 0
            bucket.append((name, tensor.contiguous()))
            size += tensor.numel() * tensor.element_size()
            total += tensor.numel() * tensor.element_size()
            count += 1
        self._send(bucket, version=version, last=True)
        return BroadcastStats(count, total, buckets + 1, time.perf_counter() - started)

    def _send(
        self, bucket: list[tuple[str, torch.Tensor]], *, version: str | None, last: bool
    ) -> None:
        body = self.update_request(bucket, version=version, last=last)

        def broadcast() -> None:
            for _, tensor in bucket:
                dist.broadcast(tensor, group=self.group, group_src=0)
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        self._call_all(
            [(u, "/update_weights_from_distributed", body) for u in self.urls], broadcast
        )

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
