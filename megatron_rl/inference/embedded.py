"""The training loop's embedded rollout servers (``--rl-rollout-url`` empty).

``--rl-rollout-num-servers`` server processes (``inference.launcher``), started side by side
and then waited for, or with ``--rl-rollout-colocate`` one server in the trainer's own
process (``inference.colocated``). Kept apart from the launcher so that the launcher,
which the server itself imports, imports neither the server nor the colocated path.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from megatron_rl.inference.launcher import ServerHandle, free_port, spawn_server_process
from megatron_rl.rollout.config import RolloutConfig

if TYPE_CHECKING:
    from megatron_rl.inference.colocated import ColocatedServer


def start_embedded_servers(
    model_dir: str | os.PathLike,
    config: RolloutConfig,
    *,
    weight_version: str = "default",
    extra_args: list[str] | tuple[str, ...] = (),
    log_dir: str | os.PathLike | None = None,
) -> list[ServerHandle] | list[ColocatedServer]:
    """Start ``config.num_servers`` embedded servers for the training loop, serving
    ``model_dir`` as ``weight_version`` (``extra_args`` go to each server's command line;
    logs in ``log_dir`` are kept, temporary ones are deleted when a handle stops). With
    ``config.colocate`` the one server is served from this process
    (``inference.colocated``; its log is this process's)."""
    if config.colocate:
        if extra_args:
            raise ValueError(f"a colocated server has no command line for {list(extra_args)}")
        # Imported here: the HTTP stack joins this process only when it serves from it.
        from megatron_rl.inference.colocated import start_colocated_server

        return [start_colocated_server(
            model_dir, port=config.port, host=config.host, api_key=config.resolved_api_key(),
            dtype=config.dtype, quantization=config.quantization,
            max_batch_size=config.max_batch_size, weight_version=weight_version,
            startup_timeout_s=config.startup_timeout_s,
        )]  # fmt: skip
    # All processes first, then the waits: the servers load side by side. No server has
    # bound its port when the next is picked, so the picks are kept apart explicitly.
    api_key = config.resolved_api_key()
    ports = {config.port}  # a fixed port means one server (RolloutConfig checks it)
    if not config.port:
        ports = set()
        while len(ports) < config.num_servers:
            ports.add(free_port(config.host))
    handles: list[ServerHandle] = []
    try:
        for port in sorted(ports):
            handles.append(spawn_server_process(
                model_dir, port=port, host=config.host, api_key=api_key, dtype=config.dtype,
                quantization=config.quantization, max_batch_size=config.max_batch_size,
                threads=config.threads, weight_version=weight_version,
                extra_args=extra_args, log_dir=log_dir,
            ))  # fmt: skip
        for handle in handles:
            handle.wait_ready(config.startup_timeout_s)
    except BaseException:
        for handle in handles:
            handle.stop()
        raise
    return handles
