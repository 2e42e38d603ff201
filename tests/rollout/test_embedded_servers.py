"""The trainer's embedded servers (--rl-rollout-num-servers): started side by side, each
healthy and serving its own process; a start that fails leaves no process behind."""

from __future__ import annotations

import httpx
import pytest
from rollout_env import API_KEY

from megatron_rl.inference import embedded, launcher
from megatron_rl.rollout.config import RolloutConfig

pytestmark = pytest.mark.slow  # server processes


@pytest.fixture
def spawned(monkeypatch):
    """Every handle spawn_server_process returns, and how many existed at each wait."""
    seen = {"handles": [], "at_wait": []}
    spawn, wait = launcher.spawn_server_process, launcher.ServerHandle.wait_ready

    def spawn_and_record(*args, **kwargs):
        handle = spawn(*args, **kwargs)
        seen["handles"].append(handle)
        return handle

    def wait_and_record(self, timeout_s):
        seen["at_wait"].append(len(seen["handles"]))
        return wait(self, timeout_s)

    monkeypatch.setattr(embedded, "spawn_server_process", spawn_and_record)
    monkeypatch.setattr(launcher.ServerHandle, "wait_ready", wait_and_record)
    return seen


def test_two_servers_start_side_by_side_and_serve(checkpoints, spawned):
    config = RolloutConfig(num_servers=2, api_key=API_KEY, startup_timeout_s=240)
    handles = embedded.start_embedded_servers(checkpoints.main, config, weight_version="3")
    try:
        # Both processes existed before the first wait: their loading overlapped.
        assert spawned["at_wait"] == [2, 2]
        assert len({h.pid for h in handles}) == len({h.url for h in handles}) == 2
        for handle in handles:
            info = httpx.get(f"{handle.url}/get_model_info", timeout=30,
                             headers={"Authorization": f"Bearer {API_KEY}"})
            assert info.status_code == 200 and info.json()["weight_version"] == "3"
    finally:
        for handle in handles:
            handle.stop()
    assert not any(h.alive() for h in handles)


def test_a_failed_start_stops_every_server_and_says_why(tmp_path, spawned):
    config = RolloutConfig(num_servers=2, startup_timeout_s=240)
    with pytest.raises(RuntimeError, match=r"exited with code [1-9].*server log .*\n"):
        embedded.start_embedded_servers(tmp_path / "no-such-model", config)
    assert len(spawned["handles"]) == 2
    assert not any(h.alive() for h in spawned["handles"])


def test_server_options_name_every_spawn_keyword():
    """start_server_process passes ServerOptions on to spawn_server_process: the two lists
    of keywords (and their annotations) must not drift apart."""
    import inspect

    spawn = inspect.signature(launcher.spawn_server_process).parameters
    keywords = {name: p.annotation for name, p in spawn.items() if name != "model_dir"}
    options = {name: getattr(t, "__forward_arg__", t)  # the launcher's annotations are strings
               for name, t in launcher.ServerOptions.__annotations__.items()}
    assert options == keywords
