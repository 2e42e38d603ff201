"""Tokenizer needs no download; tasks are deterministic and keep held-out items out."""

import json

import pytest

from megatron_rl.config.flags import ConfigError
from megatron_rl.data.tasks import Task, TaskConfig
from megatron_rl.model.tokenizer import build_char_tokenizer, load_tokenizer


def test_char_tokenizer_round_trips_and_saves_in_hf_format(tmp_path):
    tok = build_char_tokenizer(128)
    assert len(tok) == 128
    text = "State the final answer: 7 + 8 = 15\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path), 128)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.eos_token_id == tok.eos_token_id


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="below the"):
        build_char_tokenizer(16)
    with pytest.raises(FileNotFoundError, match="no downloads at run time"):
        load_tokenizer("Qwen/Qwen3-30B-A3B-Base", 151936)


def test_task_stream_is_deterministic_and_excludes_held_out():
    config = TaskConfig(eval_size=32)
    a, b = Task(config, seed=5), Task(config, seed=5)
    items_a, pos_a = a.next_items(0, 50)
    items_b, pos_b = b.next_items(0, 50)
    assert [i.prompt for i in items_a] == [i.prompt for i in items_b] and pos_a == pos_b
    # Resuming from a position continues the same stream.
    tail, _ = a.next_items(pos_a, 5)
    both, _ = b.next_items(0, 55)
    assert [i.prompt for i in both[50:]] == [i.prompt for i in tail]
    held = {i.entry["question"] for i in a.eval_items()}
    assert len(a.eval_items()) == 32
    assert not held & {i.entry["question"] for i in a.next_items(0, 2000)[0]}


def test_one_eval_seed_gives_stages_of_different_seeds_one_held_out_set():
    """A cold start (seed 1234) and an RL run (seed 1): with their own held-out sets the
    RL run's 'held-out' problems are in the cold start's training stream (1-digit
    chain_sum has a few thousand distinct problems); with one --rl-eval-seed they are
    one set, excluded from both streams."""
    def questions(items):
        return {i.entry["question"] for i in items}

    coldstart, rl = Task(TaskConfig(), seed=1234), Task(TaskConfig(), seed=1)
    leaked = questions(rl.eval_items()) & questions(coldstart.next_items(0, 20_000)[0])
    assert len(leaked) > 64
    shared = TaskConfig(eval_seed=77)
    coldstart, rl = Task(shared, seed=1234), Task(shared, seed=1)
    held = questions(rl.eval_items())
    assert held == questions(coldstart.eval_items()) and len(held) > 100
    assert not held & questions(coldstart.next_items(0, 20_000)[0])
    assert not held & questions(rl.next_items(0, 20_000)[0])


def test_task_scores_with_reasoning_gym():
    task = Task(TaskConfig(), seed=1)
    item = task.next_items(0, 1)[0][0]
    assert task.score(item.answer, item) == 1.0
    assert task.score(" " + item.answer + " ", item) == 1.0
    assert task.score("not a number", item) == 0.0
    # reasoning-gym gives partial credit to an answer containing the reference; the
    # binary reward (default, as in the paper) does not.
    padded = "1" + item.answer
    partial = Task(TaskConfig(binary_reward=False), seed=1)
    assert 0.0 < partial.score(padded, item) < 1.0
    assert task.score(padded, item) == 0.0


def test_jsonl_task_and_user_reward(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(6)))
    task = Task(TaskConfig(task=str(path), eval_size=2,
                           reward_function="tests.foundation.rewards_fixture:length_reward",
                           binary_reward=False),
                seed=0)
    items, _ = task.next_items(0, 4)
    assert [i.prompt for i in items] == ["q2 ", "q3 ", "q4 ", "q5 "]
    assert task.score("abc", items[0]) == 3.0


def test_bad_task_inputs(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        Task(TaskConfig(task=str(tmp_path / "missing.jsonl")), seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl line 1: no 'answer' field"):
        Task(TaskConfig(task=str(bad), eval_size=0), seed=0)
    with pytest.raises(ConfigError, match="unknown_task"):
        Task(TaskConfig(task="unknown_task"), seed=0)
    with pytest.raises(ConfigError, match="module:function"):
        Task(TaskConfig(reward_function="nocolon"), seed=0)


def bad_teacher(item):
    return None


def test_teacher_errors_name_the_flag_and_the_item():
    with pytest.raises(ConfigError, match="--sft-teacher"):
        Task(TaskConfig(sft_teacher="megatron_rl.data.teachers:nope"), seed=0)
    task = Task(TaskConfig(sft_teacher=f"{__name__}:bad_teacher"), seed=0)
    item = task.next_items(0, 1)[0][0]
    with pytest.raises(ConfigError, match=f"training item {item.index}"):
        task.demonstration(item)


def test_hedging_teacher_hedges_most_answers_and_the_binary_reward_rejects_them():
    task = Task(TaskConfig(sft_teacher="megatron_rl.data.teachers:hedging_teacher"), seed=3)
    items, _ = task.next_items(0, 1000)
    shown = [task.demonstration(i) for i in items]
    hedged = [i for s, i in zip(shown, items, strict=True) if s == "~" + i.answer]
    assert all(s in (i.answer, "~" + i.answer) for s, i in zip(shown, items, strict=True))
    assert 0.70 < len(hedged) / len(items) < 0.80
    assert shown == [task.demonstration(i) for i in items]
    item = hedged[0]
    assert task.score("~" + item.answer, item) == 0.0
    assert task.score(item.answer, item) == 1.0
    # Without the binary reward reasoning-gym's partial credit shows through.
    partial = Task(TaskConfig(binary_reward=False), seed=3)
    assert 0.0 < partial.score("~" + item.answer, item) < 1.0
