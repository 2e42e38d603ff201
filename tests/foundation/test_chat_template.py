"""--rl-chat-template: prompts rendered by the tokenizer's own chat template (a small
Qwen3-style template written here, with its enable_thinking switch), the same in
rollouts, evaluation, the cold start and the start-up length check; tokenizers without a
template are refused by name."""

from __future__ import annotations

import json

import pytest

from megatron_rl.arguments import parse_args
from megatron_rl.config.flags import ConfigError
from megatron_rl.data.tasks import Task
from megatron_rl.model.tokenizer import PromptEncoder, build_char_tokenizer, load_tokenizer
from megatron_rl.training.evaluation import encode_item
from megatron_rl.training.rl_data import build_requests, check_rollouts_fit

# Qwen3's layout: <|im_start|>role\ncontent<|im_end|>\n per message; the generation prompt
# opens the assistant turn, and enable_thinking=false closes an empty think block at once.
QWEN3_STYLE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


# --micro-batch-size has no default (as in Megatron-LM).
MBS = ["--micro-batch-size", "4"]


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A saved tokenizer directory whose tokenizer carries the template."""
    tokenizer = build_char_tokenizer(128)
    tokenizer.chat_template = QWEN3_STYLE
    path = tmp_path_factory.mktemp("qwen3_style_tokenizer")
    tokenizer.save_pretrained(path)
    return path


def _jsonl(path, n: int = 6) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.mark.parametrize("thinking", [True, False])
def test_prompt_ids_are_the_templates_generation_prompt(templated, thinking):
    tokenizer = load_tokenizer(str(templated), 128)
    encode = PromptEncoder(tokenizer, chat_template=True, enable_thinking=thinking)
    ids = encode("3+4=")
    messages = [{"role": "user", "content": "3+4="}]
    reference = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              enable_thinking=thinking)
    assert ids == list(reference["input_ids"])
    think = "" if thinking else "<think>\n\n</think>\n\n"
    assert tokenizer.decode(ids) == f"<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n{think}"
    assert encode.many(["3+4=", "1+1="]) == [ids, encode("1+1=")]
    # Without the switch the prompt is the text's own ids.
    plain = PromptEncoder(tokenizer)
    assert plain("3+4=") == tokenizer("3+4=", add_special_tokens=False)["input_ids"]


def test_rollouts_evaluation_and_cold_start_share_the_template(templated, tmp_path):
    run = parse_args([*MBS, "--tokenizer", str(templated), "--rl-chat-template",
                      "--no-rl-enable-thinking", "--rl-task", _jsonl(tmp_path / "t.jsonl"),
                      "--rl-eval-size", "2", "--rl-prompt-template", "{question}"],
                     world_size=1)
    assert (run.task.chat_template, run.task.enable_thinking) == (True, False)
    tokenizer = load_tokenizer(run.model.tokenizer, run.model.vocab_size)
    encode = PromptEncoder.for_task(tokenizer, run.task, run.model.tokenizer)
    task = Task(run.task, seed=0)
    item = task.next_items(0, 1)[0][0]
    want = tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}],
                                         add_generation_prompt=True,
                                         enable_thinking=False)["input_ids"]
    requests = build_requests({0: item}, encode, group_size=2)
    assert [r.prompt_ids for r in requests] == [want, want]
    prompt, length = encode_item(tokenizer, item, with_answer=False, encode=encode)
    assert (prompt, length) == (want, len(want))
    full, length = encode_item(tokenizer, item, encode=encode)
    answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
    assert full == want + answer + [tokenizer.eos_token_id] and length == len(want)


def test_length_check_counts_the_templated_prompt(templated, tmp_path):
    task = _jsonl(tmp_path / "t.jsonl")
    base = ["--tokenizer", str(templated), "--rl-task", task, "--rl-eval-size", "1",
            "--rl-group-size", "2", "--global-batch-size", "2", "--micro-batch-size", "2",
            "--rl-prompt-template", "{question}", "--rl-max-new-tokens", "8",
            "--train-iters", "2"]
    plain = check_rollouts_fit(parse_args(base, world_size=1))
    overhead = len("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")
    assert plain == len("0+0=")
    run = parse_args(base + ["--rl-chat-template"], world_size=1)
    assert check_rollouts_fit(run) == plain + overhead
    thinking_off = len("<think>\n\n</think>\n\n")
    need = plain + overhead + thinking_off + 8 - 1
    tight = parse_args(base + ["--rl-chat-template", "--no-rl-enable-thinking",
                               "--seq-length", str(need - 1)], world_size=1)
    with pytest.raises(ConfigError, match=f"makes {need} input tokens"):
        check_rollouts_fit(tight)


def test_a_tokenizer_without_a_template_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="--rl-chat-template: tokenizer 'char' .*has no "
                                          "chat template"):
        parse_args([*MBS, "--rl-chat-template"], world_size=1)
    build_char_tokenizer(128).save_pretrained(tmp_path)
    # A directory is only read at start-up; the refusal then names it.
    run = parse_args([*MBS, "--tokenizer", str(tmp_path), "--rl-chat-template"],
                     world_size=1)
    tokenizer = load_tokenizer(run.model.tokenizer, run.model.vocab_size)
    with pytest.raises(ConfigError, match=f"--rl-chat-template: tokenizer '{tmp_path}' has "
                                          "no chat template"):
        PromptEncoder.for_task(tokenizer, run.task, run.model.tokenizer)
