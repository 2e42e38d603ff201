"""--rl-reward-url: a real reward service process on loopback (the reference server with
misbehaving endpoints beside it), scoring as samples arrive, and one RL step scored by it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from rl_fixtures import TINY_RL, launch, read_metrics, steps
from torchrun_launch import ROOT, free_port

from megatron_rl.data.tasks import RewardError, Task, TaskConfig
from megatron_rl.model.tokenizer import load_tokenizer
from megatron_rl.rewards import GroupScorer, RemoteRewards, RewardServiceError
from megatron_rl.rollout.types import RolloutSample

GROUP = 3


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    log = tmp_path_factory.mktemp("reward") / "requests.jsonl"
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("reward_service_app.py")),
                             "--port", str(port), "--log", str(log)], cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "reward service died"
            time.sleep(0.2)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def batch():
    """Four prompts x GROUP responses: right, wrong and unparsable answers."""
    task = Task(TaskConfig(task_size=1000, eval_size=0), seed=7)
    tokenizer = load_tokenizer("char", 128)
    items = {i: item for i, item in enumerate(task.next_items(0, 4)[0])}
    texts = {i: [item.answer, str(int(item.answer) + 1), "no idea"] for i, item in items.items()}
    return task, tokenizer, items, texts


def samples_of(batch, tag="b"):
    _, tokenizer, items, texts = batch
    return [_decoded(tokenizer, s) for s in samples_of_raw(batch, tag)]


def _decoded(tokenizer, sample):
    sample.metadata["response_text"] = tokenizer.decode(sample.response_ids,
                                                        skip_special_tokens=True)
    return sample


def samples_of_raw(batch, tag="b"):
    _, tokenizer, items, texts = batch
    return [RolloutSample(prompt_index=i, sample_index=j, prompt_ids=[1],
                          response_ids=tokenizer.encode(text, add_special_tokens=False),
                          rollout_logprobs=torch.zeros(1), request_id=f"{tag}/p{i}/s{j}")
            for i in items for j, text in enumerate(texts[i])]


def score(batch, samples, remote=None):
    task, tokenizer, items, _ = batch
    scorer = GroupScorer(items, GROUP, task, tokenizer, remote=remote)
    for s in samples[:-1]:  # the last group completes only in finish()
        scorer.on_sample(s)
    return scorer.finish(samples)


def remote(url, **kw):
    return RemoteRewards(url, **{"concurrency": 4, "retries": 3, "timeout_s": 10,
                                 "api_key": None, "backoff_s": 0.05, **kw})


def test_service_rewards_equal_the_local_scorer(service, batch):
    url, log = service
    local, far = samples_of_raw(batch), samples_of_raw(batch)
    score(batch, local)
    client = remote(f"{url}/score")
    try:
        times = score(batch, far, client)
        assert [s.reward for s in far] == [s.reward for s in local]
        assert {s.reward for s in far} == {0.0, 1.0}
        assert 0.0 <= times["time/reward_wait"] <= times["time/reward"]
        # One request per group, with the protocol's fields.
        rows = [json.loads(line)["samples"] for line in log.read_text().splitlines()]
        assert [len(r) for r in rows] == [GROUP] * 4
        assert set(rows[0][0]) == {"id", "index", "prompt", "question", "response", "answer",
                                   "metadata"}
        # A server that fails twice (503) and then answers is retried.
        flaky = samples_of(batch)
        client.score(flaky[:GROUP], batch[2])
        assert [s.reward for s in flaky[:GROUP]] == [s.reward for s in local[:GROUP]]
    finally:
        client.close()


def test_service_errors_are_named(service, batch):
    url, _ = service
    bad = remote(f"{url}/bad")
    nan = remote(f"{url}/nan")
    gone = remote(f"http://127.0.0.1:{free_port()}/score", retries=1)
    try:
        with pytest.raises(RewardServiceError, match="HTTP 400.*rejects this prompt format"):
            score(batch, samples_of_raw(batch), bad)
        with pytest.raises(RewardError, match=r"nan for sample b/p0/s2 \(item"):
            nan.score(samples_of(batch)[:GROUP], batch[2])
        with pytest.raises(RewardServiceError, match="failed 2 times; last: ConnectError"):
            gone.score(samples_of(batch)[:GROUP], batch[2])
    finally:
        for client in (bad, nan, gone):
            client.close()


def test_concurrency_bound(service, batch):
    url, _ = service
    client = remote(f"{url}/slow", concurrency=2)
    try:
        t0 = time.perf_counter()
        futures = [client.submit([s], batch[2]) for s in samples_of(batch)[:6]]
        for f in futures:
            f.result()
        assert time.perf_counter() - t0 >= 0.55  # 6 requests of 0.2 s, 2 at a time
        assert httpx.get(f"{url}/inflight").json() == {"most": 2}
    finally:
        client.close()


@pytest.mark.slow
def test_rl_step_scored_by_the_service(service, coldstart, tmp_path):
    url, log = service
    log.write_text("")
    save = tmp_path / "rl"
    launch(1, TINY_RL + ["--train-iters", "1", "--load", str(coldstart), "--save", str(save),
                         "--rl-reward-url", f"{url}/score", "--rl-reward-concurrency", "2"])
    row = steps(read_metrics(save))[1]
    rows = [r for line in log.read_text().splitlines() for r in json.loads(line)["samples"]]
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16
    # The service's rewards are the local scorer's on the same responses.
    task = Task(TaskConfig(), seed=0)
    from megatron_rl.rewards.server import score_batch

    local = score_batch(task, rows)[0]
    assert row["rollout/reward_mean"] == pytest.approx(sum(local) / 16)
    assert 0.0 <= row["time/reward_wait"] <= row["time/reward"]


def test_reward_flags_refused_with_the_flag_named():
    with pytest.raises(Exception, match="--rl-reward-url and --rl-reward-function both"):
        TaskConfig(reward_url="http://x/score", reward_function="m:f").check()
    with pytest.raises(Exception, match="must be an http:// or https:// URL"):
        TaskConfig(reward_url="localhost:8500/score").check()
    with pytest.raises(Exception, match="--rl-reward-concurrency must be >= 1"):
        TaskConfig(reward_concurrency=0).check()
