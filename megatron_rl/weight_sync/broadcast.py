"""Weight update over a process group: SGLang's ``/init_weights_update_group`` and
``/update_weights_from_distributed``, no files.

Trainer rank 0 and every rank of every server form one group (:mod:`.group`: NCCL
between GPUs, gloo otherwise). SGLang numbers a server's ranks ``rank_offset + tp_rank``,
so server ``i`` brings its ``tp_size`` ranks (read from its ``/server_info``) at
``rank_offset_i = 1 + sum of the tp sizes before it``; rank 0 is the trainer. Servers
whose ranks that formula cannot number -- pipeline stages (``pp_size > 1``: every stage
has the same tp ranks) or data-parallel replicas without DP attention (``dp_size > 1``:
every replica has the same tp ranks) -- are refused before anything is sent: their ranks
would collide and the group would hang. Use disk sync with them.

For each bucket of about ``bucket_bytes`` the trainer posts the names, dtypes and shapes
to every server while it broadcasts the tensors in that order; the last bucket carries
the weight version and the cache flush. The group is built once and rebuilt when the set
of servers changes, when a server reports another weight version than the one last
pushed (it restarted), after :meth:`DistributedWeightUpdater.reset` (the trainer restarted
a server) and after any failed update.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpx
import torch

from megatron_rl.weight_sync.group import UpdateGroup, address_towards, free_port

logger = logging.getLogger(__name__)

REFUSAL_GRACE_S = 5.0
"""How long the other servers get to answer once one refused an update."""


@dataclass(frozen=True)
class BroadcastStats:
    tensors: int
    bytes: int
    buckets: int
    seconds: float
    """The whole push, gathering the tensors included."""
    send_seconds: float
    """Broadcasting and the servers' answers alone."""


@dataclass(frozen=True)
class ServerRanks:
    """What one server brings to the group, from its ``/server_info``."""

    url: str
    tp_size: int
    device: str


def server_ranks(url: str, info: dict) -> ServerRanks:
    """Check a server's ``/server_info`` answer; ValueError (naming the server) for a
    layout whose weight-update ranks SGLang would number twice."""
    if "tp_size" not in info:
        raise ValueError(
            f"{url}/server_info has no tp_size: is it a router? Weight updates go to each "
            "server itself"
        )
    tp, pp, dp = int(info["tp_size"]), int(info.get("pp_size", 1)), int(info.get("dp_size", 1))
    if pp > 1:
        raise ValueError(
            f"{url} runs pp_size {pp}: SGLang gives every pipeline stage the weight-update "
            "ranks rank_offset + tp_rank, so its stages would collide; use --rl-weight-sync disk"
        )
    if dp > 1 and not info.get("enable_dp_attention", False):
        raise ValueError(
            f"{url} runs dp_size {dp} without DP attention: every replica takes the "
            "weight-update ranks rank_offset + tp_rank, so they would collide; start one "
            "server per replica or use --rl-weight-sync disk"
        )
    return ServerRanks(url, tp, str(info.get("device") or "cuda"))


def group_requests(
    servers: Sequence[ServerRanks],
    *,
    master_address: str,
    master_port: int,
    group_name: str,
    backend: str,
) -> list[tuple[str, dict]]:
    """(url, body) of ``/init_weights_update_group`` for every server."""
    world_size = 1 + sum(s.tp_size for s in servers)
    out, offset = [], 1
    for server in servers:
        out.append((server.url, {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": offset, "world_size": world_size, "group_name": group_name,
            "backend": backend,
        }))  # fmt: skip
        offset += server.tp_size
    return out


def update_request(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    group_name: str,
    version: str | None,
    last: bool,
    flush_cache: bool = True,
) -> dict:
    """Body of ``/update_weights_from_distributed`` announcing one bucket."""
    body = {
        "names": [name for name, _ in tensors],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in tensors],
        "shapes": [list(t.shape) for _, t in tensors],
        "group_name": group_name,
        "flush_cache": flush_cache and last,
    }
    if last and version is not None:
        body["weight_version"] = str(version)
    return body


class DistributedWeightUpdater:
    """Pushes weights from trainer rank 0 to rollout servers over a process group."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        bucket_bytes: int = 512 * 1024**2,
        flush_cache: bool = True,
        group_name: str = "megatron_rl_weight_sync",
        master_address: str | None = None,
    ):
        """``master_address``: where the servers reach this process (default: this
        machine's address on the route to the first server)."""
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.api_key, self.timeout_s = api_key, timeout_s
        self.bucket_bytes, self.flush_cache = bucket_bytes, flush_cache
        self.group_name, self.master_address = group_name, master_address
        self.group: UpdateGroup | None = None
        self.servers: list[ServerRanks] = []
        self.version: str | None = None
        """Version the group's servers received last (None before the first push)."""
        self.connects = 0
        """How many times the group was built."""
        # One client for every call: a new one per call builds an SSL context (~10 ms).
        self.http = httpx.Client(headers=self._headers(), timeout=self.timeout_s)

    # ---- HTTP ----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _get(self, url: str, *paths: str) -> dict:
        """The first of ``paths`` that answers (SGLang renamed some, keeping the old names)."""
        for path in paths:
            response = self.http.get(f"{url}{path}", timeout=30.0)
            if response.status_code != 404:
                response.raise_for_status()
                return response.json()
        raise ValueError(f"{url} answers none of {list(paths)}")

    def _post(self, url: str, path: str, body: dict) -> str | None:
        """None on success, else a description naming the server."""
        try:
            response = self.http.post(f"{url}{path}", json=body)
        except httpx.HTTPError as exc:
            return f"{url}{path}: {type(exc).__name__}: {exc}"
        try:
            success = response.json().get("success", True)
        except (ValueError, AttributeError):
            success = True
        if response.status_code != 200 or success is False:
            return f"{url}{path}: HTTP {response.status_code}: {response.text[:300]}"
        return None

    def _collective(self, requests: list[tuple[str, str, dict]], start_work) -> None:
        """Post to every server while this side's part of the collective runs.
        ``start_work()`` starts it and returns ``done()`` (True once finished). A server
        that answers an error before joining would leave this side waiting until the
        group's timeout: give up as soon as one does, after giving the others
        ``REFUSAL_GRACE_S`` to answer too, so the error names every server that refused
        (each usually refuses the same bucket at once) and those that did not answer."""
        pool = concurrent.futures.ThreadPoolExecutor(len(requests))
        try:
            futures = {pool.submit(self._post, *r): r[0] for r in requests}
            done = start_work()
            while not done():
                if any(f.done() and f.result() for f in futures):
                    # Abandoned mid-collective: the caller drops the group (push closes it).
                    concurrent.futures.wait(futures, timeout=REFUSAL_GRACE_S)
                    failed = [
                        (f.result() if f.done() else f"{url}: no answer {REFUSAL_GRACE_S:g} s "
                         "after another server refused the update")
                        for f, url in futures.items() if not f.done() or f.result()
                    ]  # fmt: skip
                    raise RuntimeError("; ".join(failed))
                time.sleep(0.001)
            errors = [e for e in (f.result() for f in futures) if e]
        finally:
            # A server still inside the abandoned collective answers when its group times
            # out; its thread must not hold the trainer until then.
            pool.shutdown(wait=False, cancel_futures=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    # ---- the group -----------------------------------------------------------------

    def layouts(self, urls: Sequence[str]) -> list[ServerRanks]:
        return [server_ranks(u, self._get(u, "/server_info", "/get_server_info")) for u in urls]

    def connect(self, urls: Sequence[str]) -> None:
        """(Re)build the group with the servers at ``urls``."""
        if not urls:
            raise ValueError("no rollout server to update")
        self.close()
        servers = self.layouts([u.rstrip("/") for u in urls])
        backend = (
            "nccl"
            if torch.cuda.is_available() and all(s.device == "cuda" for s in servers)
            else "gloo"
        )
        address = self.master_address or address_towards(servers[0].url)
        port = free_port(address)
        requests = group_requests(
            servers, master_address=address, master_port=port, group_name=self.group_name,
            backend=backend,
        )  # fmt: skip
        # A server still holding a group of this name (e.g. from before a trainer restart)
        # lets it go first; one that never joined answers "does not exist".
        for server in servers:
            self._post(server.url, "/destroy_weights_update_group", {"group_name": self.group_name})
        pool = concurrent.futures.ThreadPoolExecutor(1)
        joined = pool.submit(
            UpdateGroup, backend=backend, master_address=address, master_port=port, rank=0,
            world_size=1 + sum(s.tp_size for s in servers), group_name=self.group_name,
            timeout_s=self.timeout_s,
        )  # fmt: skip
        pool.shutdown(wait=False)  # the group's construction blocks until every rank joined
        self._collective(
            [(u, "/init_weights_update_group", b) for u, b in requests],
            lambda: lambda: joined.done() and joined.result() is not None,
        )
        self.group, self.servers, self.version = joined.result(), servers, None
        self.connects += 1
        logger.info(
            "weight-update group %s: %d servers, %d ranks, %s, master %s:%d", self.group_name,
            len(servers), self.group.world_size, backend, address, port,
        )  # fmt: skip

    def ensure_connected(self, urls: Sequence[str]) -> list[str]:
        """Make the group hold the servers among ``urls`` that answer ``/model_info``
        (ValueError if none does), rebuilding it unless it holds exactly those, each still
        on the version pushed last; returns them."""
        versions: dict[str, str | None] = {}
        for url in (u.rstrip("/") for u in urls):
            try:
                versions[url] = self._get(url, "/model_info", "/get_model_info").get(
                    "weight_version"
                )
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning("weight sync leaves out %s, which does not answer: %s", url, exc)
        if not versions:
            raise ValueError(f"no rollout server answers /model_info: {list(urls)}")
        live = list(versions)
        if self.group is not None and live == [s.url for s in self.servers]:
            changed = {u: v for u, v in versions.items() if v != self.version}
            if self.version is None or not changed:
                return live
            logger.warning(
                "servers %s report weight versions %s, not %s (restarted?): rebuilding the "
                "weight-update group", sorted(changed), sorted(map(str, changed.values())),
                self.version,
            )  # fmt: skip
        self.connect(live)
        return live

    def reset(self) -> None:
        """Rebuild the group before the next push (e.g. a server was restarted)."""
        self.close()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group, self.servers, self.version = None, [], None

    # ---- pushing -------------------------------------------------------------------

    def push(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> BroadcastStats:
        """Send every tensor, in buckets of about ``bucket_bytes``; the last bucket sets
        ``version`` and flushes the servers' caches. Any failure drops the group (the
        next push rebuilds it) and raises RuntimeError naming the servers."""
        if self.group is None:
            raise RuntimeError("call connect() before push()")
        started = time.perf_counter()
        sending = 0.0
        bucket: list[tuple[str, torch.Tensor]] = []
        size = count = total = buckets = 0
        try:
            for name, tensor in tensors:
                nbytes = tensor.numel() * tensor.element_size()
                if bucket and size + nbytes > self.bucket_bytes:
                    sending += self._send(bucket, version=None, last=False)
                    buckets, bucket, size = buckets + 1, [], 0
                bucket.append((name, tensor.detach().to(self.group.device).contiguous()))
                size, total, count = size + nbytes, total + nbytes, count + 1
            sending += self._send(bucket, version=version, last=True)
        except BaseException:
            self.close()
            raise
        self.version = str(version)
        return BroadcastStats(count, total, buckets + 1, time.perf_counter() - started, sending)

    def _send(
        self, bucket: list[tuple[str, torch.Tensor]], *, version: str | None, last: bool
    ) -> float:
        started = time.perf_counter()
        body = update_request(
            bucket, group_name=self.group_name, version=version, last=last,
            flush_cache=self.flush_cache,
        )  # fmt: skip
        group = self.group

        def broadcast():
            works = [group.broadcast(tensor) for _, tensor in bucket]

            def done() -> bool:
                if not all(w.is_completed() for w in works):
                    return False
                for work in works:
                    work.wait()  # raises what failed
                if group.device.type == "cuda":
                    torch.cuda.synchronize()
                return True

            return done

        requests = [(s.url, "/update_weights_from_distributed", body) for s in self.servers]
        self._collective(requests, broadcast)
        return time.perf_counter() - started
