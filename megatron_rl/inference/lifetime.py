"""The embedded server's lifetime: it dies with the process that started it, and stops
within seconds of SIGTERM even mid-generation.

A server started by a trainer (``--parent-pid``) asks Linux for a signal when its parent
dies (``prctl(PR_SET_PDEATHSIG)``) and also polls its parent id, for the cases the signal
misses (not Linux, or the signal raced the start). Linux sends the parent-death signal when
the *thread* that started the child exits, not only the process, so the signal is SIGUSR1
and its handler checks whether the parent process is really gone before stopping.

Stopping sets uvicorn's exit flag, ends the running batch at its next step (its requests
get 503), and arms a timer that ends the process outright if the graceful path stalls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` when the parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except OSError:
        return False


class Lifetime:
    """Calls ``stop()`` once: on SIGTERM/SIGINT (through uvicorn), or when the parent dies.

    ``stop`` must return quickly (set flags); if the process is still alive ``hard_exit_s``
    later, it exits with status 1 without cleanup (a stuck forward pass cannot block it).
    """

    def __init__(self, stop: Callable[[], None], *, hard_exit_s: float = 10.0):
        self._stop, self.hard_exit_s = stop, hard_exit_s
        self._stopping = threading.Event()

    def request_stop(self, reason: str) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        logger.warning("stopping: %s", reason)
        self._stop()
        threading.Thread(target=self._hard_exit, name="hard-exit", daemon=True).start()

    def _hard_exit(self) -> None:
        time.sleep(self.hard_exit_s)
        logger.error("still running %.0f s after the stop request: exiting now", self.hard_exit_s)
        logging.shutdown()
        os._exit(1)

    def watch_parent(self, parent_pid: int, poll_s: float = 0.5) -> None:
        """Stop when ``parent_pid`` is no longer this process's parent (it died)."""
        if os.getppid() != parent_pid:
            self.request_stop(f"parent process {parent_pid} is gone before the server started")
            return

        def on_signal(signum, frame) -> None:
            if os.getppid() != parent_pid:
                self.request_stop(f"parent process {parent_pid} died")

        # Main thread only (signal handlers); the poll below covers the other cases.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, on_signal)
            set_parent_death_signal(signal.SIGUSR1)
            if os.getppid() != parent_pid:  # died between the check and the prctl
                self.request_stop(f"parent process {parent_pid} died")
                return

        def poll() -> None:
            while not self._stopping.is_set():
                if os.getppid() != parent_pid:
                    self.request_stop(f"parent process {parent_pid} died")
                    return
                time.sleep(poll_s)

        threading.Thread(target=poll, name="parent-watch", daemon=True).start()
