"""The cluster topology end to end: the real sglang-router (0.3.2, a Rust binary that runs
on CPU) in front of two embedded servers; pretrain_rl.py sends /generate to the router and
weight updates to each server (--rl-rollout-worker-urls); one server is killed mid-run.

One router, two servers and one training launch, shared by every check here."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import time

import httpx
import pytest
from rl_fixtures import TINY_RL, read_metrics, start, steps
from torchrun_launch import free_port

from megatron_rl.inference.launcher import start_server_process, wait_healthy
from megatron_rl.model.config import preset
from megatron_rl.rollout.client import RolloutClient
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.protocol import RolloutServerError
from megatron_rl.weight_sync.hf_config import ModelShape, save_random_checkpoint

pytestmark = pytest.mark.slow
pytest.importorskip("sglang_router", reason="pip install sglang-router==0.3.2 (the dev extra)")


class Router:
    """``python -m sglang_router.launch_router`` on loopback; stops only its own process."""

    def __init__(self, workers: list[str], log_path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        # Health checks every second, so the router stops routing to a dead worker soon.
        args = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers,
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warn",
                "--health-check-interval-secs", "1", "--health-failure-threshold", "1"]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, api_key=None, timeout_s=60, process=self.process)
        # The router answers /health before it has registered every worker (under load one
        # can be missing from /workers for seconds): wait until it lists them all.
        deadline = time.monotonic() + 60
        while True:
            listed = {w["url"] for w in httpx.get(f"{self.url}/workers", timeout=5).json()["workers"]}
            if listed >= set(workers):
                break
            assert time.monotonic() < deadline, f"the router lists {listed}, not {workers}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def cluster(tmp_path):
    init = save_random_checkpoint(preset("tiny"), tmp_path / "init", seed=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        workers = list(pool.map(lambda _: start_server_process(init, startup_timeout_s=240),
                                range(2)))
    router = None
    try:
        router = Router([w.url for w in workers], tmp_path / "router.log")
        yield router, workers
    finally:
        if router is not None:
            router.stop()
        for worker in workers:
            worker.stop()


def test_router_for_generation_workers_for_weights_one_worker_killed(cluster, coldstart,
                                                                     tmp_path):
    router, workers = cluster
    urls = [w.url for w in workers]
    shape = ModelShape.from_model_config(preset("tiny"))

    # The router is recognised by what it answers, and refused without its workers.
    with pytest.raises(RolloutServerError, match=rf"{router.url} is an sglang-router.*add "
                                                 rf"--rl-rollout-worker-urls.*{urls[0]}"):
        RolloutClient(RolloutConfig(urls=(router.url,)), shape).connect()
    # Routed experts do not survive sglang-router 0.3.2 (it drops return_routed_experts):
    # r3 through it is refused at start-up, saying why.
    with pytest.raises(RolloutServerError, match="drops the request's return_routed_experts"):
        RolloutClient(RolloutConfig(urls=(router.url,), worker_urls=tuple(urls)), shape,
                      return_routed_experts=True).connect()

    save = tmp_path / "rl"
    args = [*TINY_RL, "--train-iters", "3",
           # Routes cannot come back through the router: r2 replays the trainer's own,
           # and the router-agreement metric (which needs the rollout's) is off.
           "--routing-replay", "r2", "--no-rl-router-agreement", "--rl-rollout-url", router.url,
           "--rl-rollout-worker-urls", *urls, "--rl-rollout-retries", "3",
           "--rl-rollout-retry-backoff", "0.3", "--load", str(coldstart), "--save", str(save)]
    log_path = tmp_path / "train.log"
    with open(log_path, "wb") as log:
        proc = start(1, args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (save / "metrics.jsonl").is_file() or 1 not in steps(read_metrics(save)):
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "step 1 never finished"
            time.sleep(0.2)
        workers[1].kill()  # after step 1's weight sync: steps 2 and 3 run without it
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert proc.returncode == 0, output[-6000:]

    by_step = steps(read_metrics(save))
    assert sorted(by_step) == [1, 2, 3]
    for step, row in by_step.items():
        assert row["rollout/policy_version"] == step
        assert row["replay/fidelity"] == 1.0
    # Every sample came back once (the client checks the batch one to one and raises
    # otherwise), from the policy of its step, through the router.
    assert "results do not match" not in output
    # The dead worker is reported by URL (by the client's control calls with disk sync, by
    # the weight-update group with distributed sync); the live one ends on the last version.
    assert re.search(rf"{re.escape(urls[1])}.*(is down|does not answer)", output), output[-3000:]
    info = httpx.get(f"{urls[0]}/model_info", timeout=10).json()
    assert info["weight_version"] == "3"
