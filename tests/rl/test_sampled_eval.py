"""Sampled held-out evaluation (--eval-samples): avg@K and pass@K of K responses per
held-out prompt from the rollout servers, with one sampling seed per (prompt, sample)."""

import pytest
import torch
from rl_fixtures import TINY_RL, launch, read_metrics, steps

from megatron_rl.data.tasks import Task, TaskConfig
from megatron_rl.model.tokenizer import load_tokenizer
from megatron_rl.rollout.types import RolloutSample
from megatron_rl.training.evaluation import sampled_evaluate


def _task() -> Task:
    return Task(TaskConfig(eval_size=4, eval_seed=7), seed=1)


def _answering(tokenizer, task: Task, right: dict[int, int], length_cap: set = frozenset()):
    """A generate() whose sample j of prompt i is correct for j < right[i]; samples in
    ``length_cap`` (prompt, sample) end on the length cap instead of a stop token."""
    items = task.eval_items()
    seen = []

    def generate(requests):
        seen.append([(r.prompt_index, r.sample_index, tuple(r.prompt_ids)) for r in requests])
        out = []
        for r in requests:
            answer = items[r.prompt_index].answer
            text = answer if r.sample_index < right[r.prompt_index] else answer + "9"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            capped = (r.prompt_index, r.sample_index) in length_cap
            out.append(RolloutSample(
                prompt_index=r.prompt_index, sample_index=r.sample_index,
                prompt_ids=r.prompt_ids,
                response_ids=ids if capped else ids + [tokenizer.eos_token_id],
                rollout_logprobs=torch.zeros(len(ids)), finish_reason="length" if capped else "stop",
                request_id=f"eval/p{r.prompt_index}/s{r.sample_index}"))
        return out

    return generate, seen


def test_sampled_accuracy_is_avg_at_k_and_pass_at_k_counts_prompts():
    tokenizer = load_tokenizer("char", 128)
    task = _task()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    generate, seen = _answering(tokenizer, task, {0: 3, 1: 1, 2: 0, 3: 0}, {(3, 2)})
    metrics = sampled_evaluate(generate, task, tokenizer, encode, samples=3)
    assert metrics["eval/sampled_accuracy"] == pytest.approx(4 / 12)
    assert metrics["eval/sampled_reward_mean"] == pytest.approx(4 / 12)
    assert metrics["eval/pass_at_k"] == pytest.approx(2 / 4)
    assert metrics["eval/sampled_truncated_frac"] == pytest.approx(1 / 12)
    # Lengths leave out the stop token, as the greedy evaluation's do.
    items = task.eval_items()
    lengths = [len(items[i].answer) + (j >= r) for i, r in enumerate([3, 1, 0, 0])
               for j in range(3)]
    assert metrics["eval/sampled_response_length_mean"] == pytest.approx(sum(lengths) / 12)
    # The same (prompt, sample) pairs, in the same order, every evaluation: each keeps
    # its request id and so its sampling seed.
    sampled_evaluate(generate, task, tokenizer, encode, samples=3)
    assert seen[0] == seen[1]
    assert [(p, s) for p, s, _ in seen[0]] == [(p, s) for p in range(4) for s in range(3)]


def test_a_short_answer_from_the_servers_is_an_error():
    tokenizer = load_tokenizer("char", 128)
    task = _task()
    generate, _ = _answering(tokenizer, task, {i: 1 for i in range(4)})
    with pytest.raises(RuntimeError, match="7 responses for 8 requests"):
        sampled_evaluate(lambda reqs: generate(reqs)[:-1], task, tokenizer,
                         lambda t: tokenizer(t)["input_ids"], samples=2)


@pytest.mark.slow
def test_unchanged_weights_give_the_same_sampled_accuracy(coldstart, tmp_path):
    """lr 1e-30: the weights after each step are the start's (to the last bit that sampling
    can notice), synced to the server again, so the
    evaluation after step 1 must draw exactly what the one before step 0 drew."""
    save = tmp_path / "rl"
    launch(1, TINY_RL + ["--train-iters", "2", "--eval-interval", "1", "--eval-samples", "3",
                         "--lr", "1e-30", "--load", str(coldstart), "--save", str(save)])
    rows = read_metrics(save)
    by_step = steps(rows)
    names = ("eval/sampled_accuracy", "eval/pass_at_k", "eval/sampled_response_length_mean")
    assert rows[0]["step"] == 0
    for step in (1, 2):
        for name in names:
            assert by_step[step][name] == rows[0][name], (step, name)
    # Sampling, not greedy decoding: 8 prompts x 3 samples give more than one length.
    assert 0.0 <= rows[0]["eval/sampled_accuracy"] <= 1.0
    assert rows[0]["eval/sampled_response_length_mean"] != rows[0]["eval/response_length_mean"]
