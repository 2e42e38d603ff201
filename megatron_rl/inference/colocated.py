"""The embedded server inside the trainer's process (``--rl-rollout-colocate``).

A server process imports torch, transformers and its HTTP stack again (about 400 MB
before it loads a weight); colocated, the trainer's rank 0 serves the same engine and the
same HTTP API from a thread, so that memory is held once, as a colocated SGLang engine
shares its GPU with the trainer (slime's ``--colocate``, verl's hybrid engine). Nothing
else changes for the trainer: its client talks HTTP to the server's URL, weights are
loaded through ``/update_weights_from_disk``, and every request is served as the
separate process would serve it (same engine, same numerics: the engine's bf16 products
are scoped to its own thread, see ``inference.bf16_gemm``).

What a thread cannot give: the server shares the trainer's torch threads (torch's
thread count is per process), and it lives and dies with the trainer, so there is
nothing to restart: a server thread that stops on its own is reported by :meth:`check`,
with the exception that ended it.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import uvicorn

from megatron_rl.inference.engine import GenerationEngine
from megatron_rl.inference.launcher import free_port, wait_healthy
from megatron_rl.inference.server import StoppableServer, create_app

logger = logging.getLogger(__name__)


class ColocatedServerStopped(RuntimeError):
    """The colocated server's thread ended while the trainer still needed it."""


class ColocatedServer:
    """An engine and its HTTP API served by a thread of this process; ``url``, ``stop()``."""

    def __init__(self, engine: GenerationEngine, *, host: str, port: int,
                 api_key: str | None, startup_timeout_s: float):
        self.engine = engine
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(create_app(engine, api_key=api_key), host=host, port=port,
                                log_level="warning", access_log=False,
                                timeout_graceful_shutdown=3)  # fmt: skip
        self._server = StoppableServer(config, engine)
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"colocated-server-{port}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not self._server.started and time.monotonic() < deadline:
                self.check()  # a server that could not start says why at once
                time.sleep(0.02)
            wait_healthy(self.url, api_key=api_key, timeout_s=max(deadline - time.monotonic(), 1))
        except Exception:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return os.getpid()

    def _serve(self) -> None:
        try:
            self._server.run()  # off the main thread uvicorn installs no signal handlers
        except BaseException as exc:  # reported by check(), never lost
            self._error = exc
            logger.exception("colocated rollout server %s failed", self.url)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def check(self) -> None:
        """Raise :class:`ColocatedServerStopped` if the server stopped on its own."""
        if self._stopping or self.alive():
            return
        why = repr(self._error) if self._error is not None else "its thread ended"
        if not self._server.started:
            why = f"before it served ({why}; the log above says why, e.g. the port is taken)"
        else:
            why = f"while serving: {why}"
        raise ColocatedServerStopped(f"colocated rollout server {self.url} stopped {why}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """End the running batch, stop serving, wait for the thread, close the engine."""
        self._stopping = True
        self._server.stop_now()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning("colocated rollout server %s did not stop within %.0f s",
                           self.url, timeout_s)  # fmt: skip
        self.engine.close(timeout_s=5)

    def __enter__(self) -> ColocatedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ColocatedServer({self.url}, alive={self.alive()})"


def start_colocated_server(
    model_dir: str | os.PathLike,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    dtype: str = "bf16",
    quantization: str | None = None,
    max_batch_size: int = 32,
    weight_version: str = "default",
    startup_timeout_s: float = 180.0,
) -> ColocatedServer:
    """Serve ``model_dir`` from this process (``port=0``: a free port); returns once
    ``/health`` answers. The arguments mean what they mean for ``start_server_process``."""
    engine = GenerationEngine(
        model_dir, dtype=dtype, max_batch_size=max_batch_size, weight_version=weight_version,
        quantization=None if quantization in (None, "none") else quantization,
    )  # fmt: skip
    try:
        server = ColocatedServer(engine, host=host, port=port or free_port(host),
                                 api_key=api_key, startup_timeout_s=startup_timeout_s)
    except Exception:
        engine.close(timeout_s=5)
        raise
    logger.info("colocated rollout server %s ready (in process %d)", server.url, os.getpid())
    return server


__all__ = ["ColocatedServer", "ColocatedServerStopped", "start_colocated_server"]
