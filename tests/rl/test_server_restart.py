"""A run whose embedded server is SIGKILLed mid-run restarts it and finishes."""

import signal
import subprocess
import time

import psutil
import pytest
from rl_fixtures import TINY_RL, read_metrics, start, steps


def _server_of(run: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(run.pid).children(recursive=True):
        try:
            if "megatron_rl.inference.server" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.slow
def test_killed_embedded_server_is_restarted_and_the_run_goes_on(coldstart, tmp_path):
    save = tmp_path / "run"
    run = start(1, [*TINY_RL, "--train-iters", "4", "--load", str(coldstart),
                    "--save", str(save)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = save / "metrics.jsonl"
        while time.monotonic() < deadline and run.poll() is None:
            if metrics.is_file() and metrics.read_text().strip():  # step 0's evaluation
                break
            time.sleep(0.2)
        server = _server_of(run)
        assert server is not None and run.poll() is None, "no server to kill mid-run"
        server.send_signal(signal.SIGKILL)
        out, _ = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            for proc in [*psutil.Process(run.pid).children(recursive=True)]:
                proc.kill()
            run.kill()
            run.wait()
    assert run.returncode == 0, out[-6000:]
    rows = steps(read_metrics(save))
    assert sorted(rows) == [1, 2, 3, 4]
    assert [rows[s]["rollout/server_restarts"] for s in (1, 2, 3, 4)] == [1, 1, 1, 1]
    assert "died (killed by signal 9); restarting it (restart 1 of at most 3)" in out
    # Both servers' logs are kept with the run (--save); each version checked strictly.
    assert len(list((save / "rollout_server_logs").glob("*.log"))) == 2
    assert all(rows[s]["rollout/policy_version"] == s for s in rows)
