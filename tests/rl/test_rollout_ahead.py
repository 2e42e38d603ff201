"""--rl-rollout-ahead without a launch: the batch generated ahead round-trips through a
checkpoint as data, the version check takes exactly the expected older version, the
background generation overlaps the caller's compute, and K > 1 is refused. (The loop end
to end, resume included: test_resume_and_faults.py.)"""

import asyncio
import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.arguments import parse_args
from megatron_rl.config.flags import ConfigError
from megatron_rl.metrics.stats import Stat
from megatron_rl.rollout.client import run_sync
from megatron_rl.rollout.types import RolloutSample
from megatron_rl.training.rollout_ahead import (
    AheadGeneration,
    RolloutBatch,
    batch_files,
    common_entry,
    load_batch,
    save_batch,
)
from megatron_rl.training.rollout_service import RolloutService, WeightVersionError

MBS = ["--micro-batch-size", "4"]


def _sample(i: int, version: str = "4", routes: bool = True) -> RolloutSample:
    g = torch.Generator().manual_seed(i)
    prompt, response = [5, 6, 7 + i], [8 + i, 9, 2]
    return RolloutSample(
        prompt_index=i // 2, sample_index=i % 2, prompt_ids=prompt, response_ids=response,
        rollout_logprobs=-torch.rand(len(response), generator=g),
        routes=torch.randint(0, 16, (len(prompt) + len(response) - 1, 3, 4), generator=g,
                             dtype=torch.uint8) if routes else None,
        finish_reason="stop", weight_version=version, prompt_tokens=3, completion_tokens=3,
        latency_s=0.25, server_url="http://127.0.0.1:1", request_id=f"step6/p{i // 2}/s{i % 2}",
        reward=float(i % 2), advantage=0.1 * i - 0.3,
        metadata={"answer": "12", "response_text": "~12", "nested": {"terms": [3, 9]}})


def test_batch_round_trips_through_a_checkpoint_directory(tmp_path):
    samples = [_sample(i, routes=i != 3) for i in range(4)]
    batch = RolloutBatch(step=6, version=4, samples=samples,
                         stats={"rollout/reward_mean": Stat(2.0, 4.0),
                                "rollout/latency_max": Stat(0.25, 4.0, "max")},
                         scalars={"dynamic_sampling/rounds": 2.0}, generate_s=1.5)
    save_batch(str(tmp_path), batch, dp_rank=1)
    entry = common_entry(batch, dp_size=2)
    # The JSON part is plain data, and the tensors keep their dtypes.
    assert json.loads(open(batch_files(str(tmp_path), 1)[1]).read())["version"] == 4
    back = load_batch(str(tmp_path), entry, dp_rank=1, dp_size=2, is_leader=True)
    assert (back.step, back.version, back.ahead, back.generate_s) == (6, 4, True, 1.5)
    assert back.stats == batch.stats and back.scalars == batch.scalars
    for got, want in zip(back.samples, samples, strict=True):
        for name in ("prompt_index", "sample_index", "prompt_ids", "response_ids",
                     "finish_reason", "weight_version", "request_id", "reward", "advantage",
                     "metadata", "server_url", "latency_s"):
            assert getattr(got, name) == getattr(want, name), name
        assert torch.equal(got.rollout_logprobs, want.rollout_logprobs)
        assert got.rollout_logprobs.dtype == torch.float32
        if want.routes is None:
            assert got.routes is None
        else:
            assert got.routes.dtype == torch.uint8 and torch.equal(got.routes, want.routes)
    # Ranks that are not data-group leaders hold no samples and read no files.
    other = load_batch(str(tmp_path / "nowhere"), entry, dp_rank=0, dp_size=2, is_leader=False)
    assert other.samples is None and other.version == 4
    with pytest.raises(ValueError, match="split over 2 data-parallel ranks; this run has 4"):
        load_batch(str(tmp_path), entry, dp_rank=1, dp_size=4, is_leader=True)
    with pytest.raises(FileNotFoundError, match="rollout_ahead_dp000.safetensors is missing"):
        load_batch(str(tmp_path), entry, dp_rank=0, dp_size=2, is_leader=True)


def test_version_check_takes_exactly_the_expected_older_version(caplog):
    service = SimpleNamespace(version="5")  # the trainer last synced version 5
    check = RolloutService.check_versions
    check(service, [_sample(0, "4"), _sample(1, "4")], "strict", expected="4")
    for wrong in ("5", "3", None):
        with pytest.raises(WeightVersionError,
                           match=f"weight version {wrong!r} .*policy is '5' and the batch was "
                                 f"generated ahead by version '4'"):
            check(service, [_sample(0, "4"), _sample(1, wrong)], "strict", expected="4")
    with pytest.raises(WeightVersionError, match="'4' .*the trainer's policy is version '5'"):
        check(service, [_sample(0, "4")], "strict")  # on-policy: only the synced version
    with caplog.at_level(logging.WARNING):
        check(service, [_sample(0, "3")], "warn", expected="4")
    assert "generated with weight version '3'" in caplog.text
    check(service, [_sample(0, "3")], "off", expected="4")


def test_background_generation_overlaps_the_callers_compute():
    """The client waits on the servers inside its own event loop, so a trainer computing
    meanwhile hides the wait (torch releases the GIL in its kernels): the caller computes
    while the generation is under way, and the generation's result is then ready. Judged by
    what happened inside the generation's window, not by wall-clock thresholds (a loaded
    machine may start the thread late, which is no failure of the overlap)."""
    window: dict[str, float] = {}
    finished = threading.Event()

    def generate() -> RolloutBatch:
        window["start"] = time.perf_counter()
        run_sync(asyncio.sleep(0.3))  # the servers generating
        window["end"] = time.perf_counter()
        finished.set()
        return RolloutBatch(step=2, version=0, samples=[],
                            generate_s=window["end"] - window["start"])

    a = torch.randn(256, 256)
    job = AheadGeneration(generate, step=2)
    stamps = []
    while not finished.is_set():
        a = torch.tanh(a @ a)
        stamps.append(time.perf_counter())
    batch = job.result()
    during = [t for t in stamps if window["start"] < t < window["end"]]
    assert batch.ahead and batch.generate_s >= 0.3
    assert len(during) >= 2, f"the caller computed {len(during)} times while generation ran"


def test_generation_errors_reach_the_trainer_naming_the_step():
    def fail() -> RolloutBatch:
        raise ConnectionError("server gone")

    with pytest.raises(RuntimeError, match="rollout batch of step 7 ahead failed: server gone"):
        AheadGeneration(fail, step=7).result()


def test_rollout_ahead_flag():
    assert parse_args(MBS, world_size=1).rl.rollout_ahead == 0
    assert parse_args([*MBS, "--rl-rollout-ahead", "1"], world_size=1).rl.rollout_ahead == 1
    for k in ("2", "-1"):
        with pytest.raises(ConfigError, match=f"--rl-rollout-ahead {k}: only 0 .* and 1"):
            parse_args([*MBS, "--rl-rollout-ahead", k], world_size=1)
