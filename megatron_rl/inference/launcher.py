"""Start and stop embedded rollout servers as subprocesses.

:func:`start_server_process` starts one and returns once it answers ``/health``;
:func:`spawn_server_process` returns at once, for several to load side by side (the
training loop's servers: ``inference.embedded``). A handle stops only its own process.

The API key reaches the server through the ``MEGATRON_RL_SERVER_API_KEY`` environment
variable, not the command line (which every user sees in ``ps``). The server is told its
parent's pid and dies with it (``inference.lifetime``). A log file the launcher created in
the temporary directory is deleted when the handle stops; one given as ``log_path`` (or in
``log_dir``) is kept.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict, Unpack

import httpx

logger = logging.getLogger(__name__)

# The package root, so ``python -m megatron_rl.inference.server`` works from any directory.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
API_KEY_ENV = "MEGATRON_RL_SERVER_API_KEY"
"""Environment variable the server reads its API key from when ``--api-key`` is absent."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerHandle:
    """A running server subprocess: ``url``, ``stop()``, ``kill()``; a context manager."""

    def __init__(
        self,
        process: subprocess.Popen,
        url: str,
        log_path: Path,
        args: list[str],
        *,
        owns_log: bool = False,
        api_key: str | None = None,
    ):
        self.process, self.url, self.log_path, self.args = process, url, log_path, args
        self.owns_log = owns_log
        """The log is a temporary file of the launcher's: :meth:`stop` deletes it."""
        self._api_key = api_key

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float) -> None:
        """Return once ``/health`` answers; if the server exits or stays silent past
        ``timeout_s``, kill it and raise with its log's tail."""
        try:
            wait_healthy(self.url, api_key=self._api_key, timeout_s=timeout_s, process=self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            tail = self.log_tail()
            if self.owns_log:
                self.log_path.unlink(missing_ok=True)
            raise RuntimeError(f"{exc}; server log {self.log_path}:\n{tail}") from None
        logger.info("rollout server %s ready (pid %d, log %s)", self.url, self.pid, self.log_path)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (the server ends its batch and exits within seconds), SIGKILL if it
        lingers; then delete the log if it is the launcher's temporary file."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("server %s ignored SIGTERM; killing it", self.url)
                self.process.kill()
                self.process.wait()
        if self.owns_log:
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.url}, pid={self.pid}, alive={self.alive()})"


def wait_healthy(url: str, *, api_key: str | None, timeout_s: float, process=None) -> None:
    """Poll ``url/health`` until it answers 200; fail early if ``process`` exits."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"rollout server {url} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"rollout server {url} did not answer /health within {timeout_s:.0f} s")


class ServerOptions(TypedDict, total=False):
    """:func:`spawn_server_process`'s keyword arguments, for the functions that pass them on."""

    port: int
    host: str
    api_key: str | None
    dtype: str
    quantization: str | None
    max_batch_size: int
    threads: int
    weight_version: str
    extra_args: list[str] | tuple[str, ...]
    log_path: str | os.PathLike | None
    log_dir: str | os.PathLike | None


def start_server_process(
    model_dir: str | os.PathLike,
    *,
    startup_timeout_s: float = 180.0,
    **options: Unpack[ServerOptions],
) -> ServerHandle:
    """Start ``python -m megatron_rl.inference.server`` and wait until it is healthy.

    ``options`` are :func:`spawn_server_process`'s; the server's log tail is in the error
    if the start fails."""
    handle = spawn_server_process(model_dir, **options)
    handle.wait_ready(startup_timeout_s)
    return handle


def spawn_server_process(
    model_dir: str | os.PathLike,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    api_key: str | None = None,
    dtype: str = "bf16",
    quantization: str | None = None,
    max_batch_size: int = 32,
    threads: int = 1,
    weight_version: str = "default",
    extra_args: list[str] | tuple[str, ...] = (),
    log_path: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
) -> ServerHandle:
    """Start ``python -m megatron_rl.inference.server`` and return at once; the handle's
    :meth:`~ServerHandle.wait_ready` waits for it (several servers start side by side).

    ``port=0`` picks a free port. The server's output goes to ``log_path``, else to a new
    file in ``log_dir`` (both kept), else to a temporary file deleted by ``stop()``."""
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
    args = [
        sys.executable, "-m", "megatron_rl.inference.server", "--model-path", str(model_dir),
        "--host", host, "--port", str(port), "--dtype", dtype,
        "--max-running-requests", str(max_batch_size), "--threads", str(threads),
        "--weight-version", weight_version, "--parent-pid", str(os.getpid()),
        "--log-level", "warning",
        *(["--quantization", quantization] if quantization not in (None, "none") else []),
        *extra_args,
    ]  # fmt: skip
    owns_log = log_path is None and log_dir is None
    if log_path is None:
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        fd, log_path = tempfile.mkstemp(
            prefix=f"rollout-server-{port}-", suffix=".log", dir=log_dir
        )
        os.close(fd)
    log_path = Path(log_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerHandle(process, url, log_path, args, owns_log=owns_log, api_key=api_key)
