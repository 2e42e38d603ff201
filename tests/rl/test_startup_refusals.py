"""Configurations that cannot work are refused at start-up, naming the flags; inputs that
would be silently misread (non-finite flags, malformed JSONL, non-finite rewards) raise."""

import json
import math
import os
import subprocess
import sys

import pytest
from rl_fixtures import TINY_RL
from torchrun_launch import ROOT

from megatron_rl.arguments import parse_args
from megatron_rl.config.flags import ConfigError
from megatron_rl.training.rl_data import check_rollouts_fit

MBS = ["--micro-batch-size", "8"]  # required, as in Megatron-LM


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.slow
def test_prompt_plus_new_tokens_beyond_seq_length_is_refused_before_any_rollout(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_rl.py"), *TINY_RL, "--seq-length", "40",
         "--rl-max-new-tokens", "16", "--save", str(tmp_path / "rl")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.splitlines()[-1]
    assert error.startswith("pretrain_rl.py: error: --seq-length 40 cannot hold this run's "
                            "samples: the longest prompt (")
    assert "of --rl-task chain_sum" in error and "with --rl-max-new-tokens 16 makes" in error
    # Nothing was started: no metrics, no checkpoint directory.
    assert not (tmp_path / "rl").exists()


def test_longest_prompt_counts_the_items_the_run_uses(tmp_path):
    rows = [{"prompt": "e" * 5, "answer": "1"},  # held-out (eval) item
            {"prompt": "L" * 50, "answer": "1"},  # training item 0
            {"prompt": "s" * 10, "answer": "1"}, {"prompt": "s" * 12, "answer": "1"},
            {"prompt": "s" * 8, "answer": "1"}]
    task = _jsonl(tmp_path / "t.jsonl", rows)
    base = ["--rl-task", task, "--rl-eval-size", "1", "--rl-group-size", "2",
            "--global-batch-size", "2", "--micro-batch-size", "2", "--seq-length", "64",
            "--rl-prompt-template", "{question}", "--rl-max-new-tokens", "10"]
    # Resumed after the long item, for two more prompts: items 1 and 2 only.
    run = parse_args(MBS + base + ["--train-iters", "3"], world_size=1)
    assert check_rollouts_fit(run, start_step=1, start_position=1) == 12
    # From the start the long item is used: 50 + 10 - 1 = 59 input tokens fit 64 ...
    assert check_rollouts_fit(run) == 50
    # ... and not 58.
    tight = parse_args(MBS + base + ["--train-iters", "3", "--seq-length", "58"], world_size=1)
    with pytest.raises(ConfigError, match=r"--seq-length 58 cannot hold .*training item 0 "
                       r"of --rl-task .*50 tokens.*--rl-max-new-tokens 10 makes 59 input "
                       r"tokens.*Raise --seq-length to 59 or lower --rl-max-new-tokens to 9"):
        check_rollouts_fit(tight)


@pytest.mark.parametrize("flag", ["--lr", "--rl-temperature", "--rl-clip-high", "--adam-eps",
                                  "--rl-rollout-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_flags_are_refused(flag, value):
    with pytest.raises(ConfigError, match=f"{flag} {value}: must be a finite number"):
        parse_args(MBS + [f"{flag}={value}"], world_size=1)
    assert not math.isnan(parse_args(MBS + [], world_size=1).training.lr)


def _reward_task(tmp_path, *extra):
    from megatron_rl.data.tasks import Task

    rows = [{"prompt": "q0", "answer": "1"}, {"prompt": "q1", "answer": "2"}]
    run = parse_args(MBS + ["--rl-task", _jsonl(tmp_path / "r.jsonl", rows), "--rl-eval-size", "1",
                      "--rl-reward-function", "tests.rl.test_startup_refusals:echo_reward",
                      *extra], world_size=1)
    return Task(run.task, seed=0)


def echo_reward(response: str, item) -> float:
    """The response is the reward (a test's stand-in for a buggy reward function)."""
    return float(response) if response not in ("none", "text") else \
        {"none": None, "text": "high"}[response]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("response", ["nan", "inf", "-inf", "none", "text"])
def test_reward_that_is_not_a_finite_number_stops_the_run(tmp_path, binary, response):
    import torch

    from megatron_rl.data.tasks import RewardError
    from megatron_rl.rewards.scoring import score_samples
    from megatron_rl.rollout.types import RolloutSample

    task = _reward_task(tmp_path, "--rl-binary-reward" if binary else "--no-rl-binary-reward")
    item = task.next_items(0, 1)[0][0]

    class Decode:
        def decode(self, ids, skip_special_tokens=True):
            return response

    sample = RolloutSample(prompt_index=0, sample_index=0, prompt_ids=[1], response_ids=[2],
                           rollout_logprobs=torch.zeros(1), request_id="step3-p0-s0")
    with pytest.raises(RewardError, match=r"--rl-reward-function tests.rl.test_startup_refusals:"
                       r"echo_reward returned .* for item 0.*; sample step3-p0-s0"):
        score_samples([sample], {0: item}, task, Decode())


def test_reward_beyond_the_limit_is_named_not_blamed_on_advantages(tmp_path):
    from megatron_rl.data.tasks import RewardError

    task = _reward_task(tmp_path, "--no-rl-binary-reward")
    item = task.next_items(0, 1)[0][0]
    assert task.score("0.5", item) == 0.5 and task.score("-1e29", item) == -1e29
    with pytest.raises(RewardError, match=r"returned 1e\+300 for item 0: rewards must be "
                       r"finite numbers within ±1e\+30"):
        task.score("1e300", item)
    # Binary rewards only need a finite value: 1e300 >= 1 is a full reward.
    assert _reward_task(tmp_path, "--rl-binary-reward").score("1e300", item) == 1.0


@pytest.mark.parametrize("line,expected", [
    ('["prompt", "answer"]', "line 2: need a JSON object with 'prompt' and 'answer', got a list"),
    ('{"prompt": ["a", "b"], "answer": "1"}', "line 2: 'prompt' must be a non-empty string, "
                                             "got ['a', 'b']"),
    ('{"prompt": "q", "answer": null}', "line 2: 'answer' must be a non-empty string or a "
                                        "number, got None"),
    ('{"prompt": "q"}', "line 2: no 'answer' field"),
    ('{"prompt": "q", "answer": "1", "metadata": 3}', "line 2: 'metadata' must be a JSON "
                                                      "object, got 3"),
    ('{"prompt": "q", "answer": 1', "line 2: not JSON"),
])
def test_malformed_jsonl_line_is_named(tmp_path, line, expected):
    from megatron_rl.data.tasks import Task

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q0", "answer": 7}\n' + line + "\n" +
                    '{"prompt": "q2", "answer": "x"}\n')
    run = parse_args(MBS + ["--rl-task", str(path), "--rl-eval-size", "1"], world_size=1)
    with pytest.raises(ConfigError) as caught:
        Task(run.task, seed=0)
    assert str(caught.value).startswith(f"{path} {expected}")
