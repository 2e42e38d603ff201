"""The supervisor's policy on real processes (stand-ins for servers: the policy only needs
a process that lives or dies, a URL and a log): restart within the bound, or fail naming
the server and its log tail."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from megatron_rl.inference.launcher import ServerHandle
from megatron_rl.inference.supervisor import ServerDied, ServerSupervisor


def stand_in(tmp_path, port: int = 30123) -> ServerHandle:
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    log.write_text("loading weights\nserving on port\n")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return ServerHandle(process, f"http://127.0.0.1:{port}", log, [], owns_log=True)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_dead_servers_are_restarted_up_to_the_bound(tmp_path):
    started: list[ServerHandle] = []

    def restart(old: ServerHandle) -> ServerHandle:
        assert not old.alive()
        started.append(stand_in(tmp_path, port=int(old.url.rsplit(":", 1)[1])))
        return started[-1]

    handles = [stand_in(tmp_path)]
    supervisor = ServerSupervisor(handles, restart, max_restarts=2, poll_s=0.05)
    try:
        for round_ in (1, 2):
            handles[0].kill()
            wait_for(lambda r=round_: supervisor.restarts == r and handles[0].alive())
            assert handles[0].url == "http://127.0.0.1:30123"
        supervisor.check()  # nothing wrong yet
        dead = handles[0]
        dead.kill()
        wait_for(lambda: supervisor.failure is not None)
        with pytest.raises(ServerDied, match=r"(?s)127.0.0.1:30123 .*killed by signal 9\) after 2 "
                                             r"restarts.*serving on port"):  # fmt: skip
            supervisor.check()
        assert len(started) == 2
    finally:
        supervisor.close()
        for handle in [*handles, *started]:
            handle.stop()


def test_fail_policy_restarts_nothing_and_names_the_server(tmp_path):
    handles = [stand_in(tmp_path)]
    supervisor = ServerSupervisor(handles, lambda old: pytest.fail("restarted"), policy="fail",
                                  poll_s=0.05)  # fmt: skip
    try:
        log = handles[0].log_path
        handles[0].kill()
        with pytest.raises(ServerDied) as info:
            supervisor.check()
        message = str(info.value)
        assert f"embedded rollout server http://127.0.0.1:30123 (pid {handles[0].pid})" in message
        assert "--rl-rollout-on-server-failure fail" in message and "serving on port" in message
        assert str(log) in message
    finally:
        supervisor.close()
        for handle in handles:
            handle.stop()
    assert not log.exists(), "a stopped handle deletes its temporary log"
