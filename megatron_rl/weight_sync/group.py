"""The weight-update process group: trainer rank 0 and every rank of every rollout server.

Both sides build it from a ``TCPStore`` and the backend's process group directly, never
through ``torch.distributed.init_process_group`` or its group registry, so the trainer's
megatron default group and the server's own state stay untouched, and a group can be
dropped and rebuilt (after a server restart) without tearing anything else down.

The store keys follow the layout SGLang's side gets from ``init_custom_process_group``
(a ``PrefixStore`` named after the group over the rendezvous store, then torch's own
``<group_name>/`` and ``<device>/`` prefixes), so a trainer built here meets a real SGLang
server in the same rendezvous. Rank 0 (the trainer) hosts the store.
"""

from __future__ import annotations

import datetime
import logging
import socket
import urllib.parse

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


class UpdateGroup:
    """One rank's membership of a weight-update group; rank 0 broadcasts, the rest receive."""

    def __init__(
        self,
        *,
        backend: str,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        group_name: str,
        timeout_s: float,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"weight-update backend {backend!r} is not one of {BACKENDS}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("weight-update backend 'nccl' needs CUDA; this process has none")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the group's world size {world_size}")
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.group_name = group_name
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(
            master_address, int(master_port), world_size, is_master=rank == 0,
            timeout=timeout, wait_for_workers=False,
        )  # fmt: skip
        # SGLang's init_custom_process_group, then torch's _new_process_group_helper.
        base = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, self.store))
        if backend == "gloo":
            # torch registers one gloo backend for all devices, under the first one's prefix.
            self._backends = [
                dist.ProcessGroupGloo(dist.PrefixStore("cpu/", base), rank, world_size, timeout)
            ]
            self.device = torch.device("cpu")
        else:
            options = dist.ProcessGroupNCCL.Options()
            options.is_high_priority_stream = False
            options._timeout = timeout
            self._backends = [
                dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", base), rank, world_size, options)
            ]
            self.device = torch.device("cuda", torch.cuda.current_device())

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        """Start broadcasting ``tensor`` from rank 0 into every rank's ``tensor``; the
        caller waits on the returned work."""
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        return self._backends[0].broadcast([tensor], options)

    def close(self) -> None:
        for backend in self._backends:
            shutdown = getattr(backend, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except RuntimeError as exc:  # a peer that died already: nothing to release
                    logger.debug("weight-update group %s shutdown: %s", self.group_name, exc)
        self._backends = []
        self.store = None


def free_port(address: str) -> int:
    """A TCP port free on ``address`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address if address != "localhost" else "127.0.0.1", 0))
        return sock.getsockname()[1]


def address_towards(url: str) -> str:
    """This machine's address on the route to ``url``'s host (what the servers must dial
    to reach the trainer's store); 127.0.0.1 for a server on this machine."""
    host = urllib.parse.urlparse(url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, 9))  # UDP: no packet is sent, the route is looked up
        except OSError as exc:
            raise ValueError(
                f"no route from this machine to the rollout server {url}: {exc}"
            ) from None
        return sock.getsockname()[0]
