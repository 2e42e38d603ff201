"""Keeps the embedded servers a run started alive: one that dies is started again on its
port, serving the policy the trainer last synced, a bounded number of times.

A background thread polls the server processes, so a server that dies during a rollout is
back while the client still retries its requests (same URL; the client's health probes let
it rejoin). The owner holds :attr:`ServerSupervisor.lock` while it changes the servers'
weights, so a restart never races an update and always serves the newest version. With
``policy='fail'`` (``--rl-rollout-on-server-failure fail``) nothing is restarted: the next
:meth:`check` raises :class:`ServerDied` naming the server and its log tail.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from megatron_rl.inference.launcher import ServerHandle

logger = logging.getLogger(__name__)


class ServerDied(RuntimeError):
    """An embedded server died and is not (or no longer) restarted."""


def _describe(handle: ServerHandle) -> str:
    code = handle.process.returncode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"embedded rollout server {handle.url} (pid {handle.pid}) died ({how})"


class ServerSupervisor:
    """Restarts dead servers of ``handles`` (a list it updates in place) with ``restart``.

    ``restart(old) -> ServerHandle`` starts a replacement on ``old``'s port; it is called
    with :attr:`lock` held."""

    def __init__(
        self,
        handles: list[ServerHandle],
        restart: Callable[[ServerHandle], ServerHandle],
        *,
        policy: str = "continue",
        max_restarts: int = 3,
        poll_s: float = 0.5,
    ):
        if policy not in ("continue", "fail"):
            raise ValueError(f"policy must be 'continue' or 'fail', got {policy!r}")
        self.handles, self._restart = handles, restart
        self.policy, self.max_restarts, self.poll_s = policy, max_restarts, poll_s
        self.restarts = 0
        self.failure: str | None = None
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="server-supervisor", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`ServerDied` if a server died for good; restart any dead one now."""
        self.revive()
        if self.failure is not None:
            raise ServerDied(self.failure)

    def revive(self) -> None:
        """Restart the servers that died (under :attr:`lock`), within the bounds."""
        with self.lock:
            for i, handle in enumerate(self.handles):
                if handle.alive() or self.failure is not None or self._stop.is_set():
                    continue
                what = _describe(handle)
                tail = f"last lines of its log {handle.log_path}:\n{handle.log_tail()}"
                if self.policy == "fail":
                    self.failure = f"{what} (--rl-rollout-on-server-failure fail); {tail}"
                elif self.restarts >= self.max_restarts:
                    self.failure = f"{what} after {self.restarts} restarts (the most); {tail}"
                if self.failure is not None:
                    logger.error(self.failure)
                    continue
                self.restarts += 1
                logger.warning("%s; restarting it (restart %d of at most %d); %s",
                               what, self.restarts, self.max_restarts, tail)  # fmt: skip
                handle.stop()  # already dead: only deletes its temporary log
                try:
                    self.handles[i] = self._restart(handle)
                except Exception as exc:
                    self.failure = f"{what}, and restarting it failed: {exc}"
                    logger.error(self.failure)
                    continue
                logger.warning("embedded rollout server %s is back (pid %d)",
                               self.handles[i].url, self.handles[i].pid)  # fmt: skip

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.revive()
            except Exception:  # never let the watcher die silently
                logger.exception("server supervisor failed")

    def close(self) -> None:
        """Stop watching (before the owner stops the servers on purpose)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
