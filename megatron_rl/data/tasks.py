"""Prompt sources: reasoning-gym datasets (procedural, offline) or JSONL files.

A task is an indexable, deterministic sequence of items (prompt text, reference answer,
scorer data). The training stream walks it by position -- the position is saved in
checkpoints -- and never yields an item of the held-out evaluation set.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.import_path import load_callable
from megatron_rl.config.run_view import RunView


@dataclass(kw_only=True, frozen=True)
class TaskConfig:
    """Which task the policy learns and how prompts are written."""

    flag_prefix: ClassVar[str] = "--rl-"

    task: str = "chain_sum"
    """A reasoning-gym dataset name, or a .jsonl file with "prompt" and "answer" fields."""
    task_config: str = '{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}'
    """JSON settings passed to reasoning_gym.create_dataset (ignored for JSONL)."""
    task_size: int = 100_000
    """Items in the procedural training set (the stream cycles through it)."""
    eval_size: int = 128
    """Held-out items for evaluation (excluded from training)."""
    eval_seed: int | None = None
    """Seed of the held-out set of a reasoning-gym task; default --seed + 1000003. Give
    the cold start and the RL runs started from it the same value when their --seed
    differ: the held-out set is then one set, excluded from every stage's training.
    Otherwise an RL run's held-out problems may have been in the cold start's training
    stream (small tasks such as 1-digit chain_sum have only a few thousand distinct
    problems), and its 'held-out' accuracy measures recall."""
    prompt_template: str = "{question} "
    """Python format string turning an item's question into the prompt."""
    chat_template: bool = False
    """Render each prompt (after --rl-prompt-template) as a user turn through the
    tokenizer's chat template, with the assistant's generation prompt appended
    (apply_chat_template(..., add_generation_prompt=True)), in rollouts, evaluation and the
    cold start alike. A tokenizer without a chat template (the tiny preset's 'char') is
    refused."""
    enable_thinking: bool = True
    """With --rl-chat-template: the template's enable_thinking switch (Qwen3: off renders
    an empty <think></think> block, so the model answers without reasoning)."""
    reward_function: str | None = None
    """A user reward function as module:function(response_text, item) -> float; default is
    the task's own scorer."""
    reward_url: str | None = None
    """A remote reward service (http(s)://host:port/path) that scores the samples in place of
    the task's scorer, one request per prompt's group (protocol: megatron_rl/rewards/remote.py
    and the README); for reward models that need GPUs of their own."""
    reward_concurrency: int = 8
    """With --rl-reward-url: most requests in flight to the reward service at once."""
    reward_retries: int = 3
    """With --rl-reward-url: retries of a request that meets a connection error, a timeout or
    a 5xx answer (a 4xx answer fails the step at once)."""
    reward_timeout_s: float = field(default=60.0, metadata={"flag": "--rl-reward-timeout"})
    """With --rl-reward-url: seconds one request may take before it counts as failed."""
    reward_api_key_file: str | None = None
    """With --rl-reward-url: file holding the service's API key (sent as 'Authorization:
    Bearer <key>'; chmod 600). Default: $MEGATRON_RL_REWARD_API_KEY, if set."""
    sft_teacher: str | None = field(default=None, metadata={"flag": "--sft-teacher"})
    """The cold start's demonstrator as module:function(item) -> answer text; default: the
    reference answer. megatron_rl.data.teachers holds imperfect teachers, for studying
    what RL can correct that imitation taught."""
    binary_reward: bool = True
    """Reward 1 for a response the scorer fully accepts, else 0 (the paper's binary
    reward); off: the scorer's own value, which for reasoning-gym includes partial credit
    for answers that merely contain the reference."""

    def validate(self, run: RunView) -> None:
        self.check()
        if self.chat_template and run.model.tokenizer == "char":
            raise ConfigError("--rl-chat-template: tokenizer 'char' (the tiny preset's "
                              "character tokenizer) has no chat template; point --tokenizer "
                              "at a Hugging Face tokenizer directory that has one")

    def check(self) -> None:
        """The task settings' own consistency (no other component needed)."""
        if "{question}" not in self.prompt_template:
            raise ConfigError("--rl-prompt-template must contain {question}")
        if self.task_size < 1 or self.eval_size < 0:
            raise ConfigError("--rl-task-size must be >= 1 and --rl-eval-size >= 0")
        if self.reward_url is not None:
            if self.reward_function is not None:
                raise ConfigError("--rl-reward-url and --rl-reward-function both give the "
                                  "rewards: give one")
            if not self.reward_url.startswith(("http://", "https://")):
                raise ConfigError(f"--rl-reward-url {self.reward_url!r} must be an http:// or "
                                  "https:// URL")
        if self.reward_concurrency < 1 or self.reward_retries < 0 or self.reward_timeout_s <= 0:
            raise ConfigError("--rl-reward-concurrency must be >= 1, --rl-reward-retries >= 0 "
                              "and --rl-reward-timeout > 0")
        if self.task.endswith(".jsonl"):
            if not os.path.isfile(self.task):
                raise ConfigError(f"--rl-task {self.task}: no such file")
        else:
            try:
                json.loads(self.task_config)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--rl-task-config is not valid JSON: {exc}") from exc


# Advantages are float32 in the loss and rewards enter them linearly: far below float32's
# range, and far above any reward scale in use.
REWARD_LIMIT = 1e30


class RewardError(ValueError):
    """A reward function's value that is not a usable reward (not a number, NaN, inf,
    beyond ±REWARD_LIMIT): a bug in the function, which stops the run."""


@dataclass(frozen=True)
class TaskItem:
    """One prompt with what is needed to score a response to it."""

    index: int
    prompt: str
    answer: str
    entry: dict[str, Any]


class Task:
    """Training stream and held-out set of one task."""

    def __init__(self, config: TaskConfig, seed: int) -> None:
        config.check()
        self.config = config
        if config.task.endswith(".jsonl"):
            self._train, self._eval, self._score = _jsonl_task(config)
        else:
            self._train, self._eval, self._score = _reasoning_gym_task(config, seed)
        self._held_out = {self._eval[i]["question"] for i in range(len(self._eval))}
        self._reward_fn = load_function(config.reward_function) if config.reward_function \
            else None
        self._teacher = load_function(config.sft_teacher, what="--sft-teacher") \
            if config.sft_teacher else None

    def _item(self, source, index: int) -> TaskItem:
        entry = source[index]
        return TaskItem(
            index=index,
            prompt=self.config.prompt_template.format(question=entry["question"]),
            answer=str(entry["answer"]),
            entry=entry,
        )

    def next_items(self, position: int, count: int) -> tuple[list[TaskItem], int]:
        """``count`` training items from stream ``position``; returns the new position."""
        items = []
        size = len(self._train)
        skipped = 0
        while len(items) < count:
            entry_index = position % size
            position += 1
            if self._train[entry_index]["question"] in self._held_out:
                skipped += 1
                if skipped > size:
                    raise ConfigError("every training item is in the held-out set")
                continue
            items.append(self._item(self._train, entry_index))
        return items, position

    def eval_items(self) -> list[TaskItem]:
        return [self._item(self._eval, i) for i in range(len(self._eval))]

    def train_size(self) -> int:
        """Items in the training set (the stream cycles through them)."""
        return len(self._train)

    def demonstration(self, item: TaskItem) -> str:
        """The answer the cold start imitates for ``item``."""
        if self._teacher is None:
            return item.answer
        answer = self._teacher(item)
        if not isinstance(answer, str) or not answer:
            raise ConfigError(f"--sft-teacher {self.config.sft_teacher} returned {answer!r} "
                              f"for training item {item.index} ({item.prompt!r}); it must "
                              "return a non-empty string")
        return answer

    def score(self, response: str, item: TaskItem) -> float:
        """Reward of a response: the user's function or the task's own scorer.

        Raises :class:`RewardError` for a value that is not a finite number (before
        --rl-binary-reward could turn NaN into 0 and inf into 1) or lies beyond
        ±REWARD_LIMIT."""
        if self._reward_fn is not None:
            value = self._reward_fn(response, item)
            source = f"--rl-reward-function {self.config.reward_function}"
        else:
            value = self._score(response.strip(), item.entry)
            source = f"the scorer of --rl-task {self.config.task}"
        try:
            score = float(value)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"{source} returned {value!r} ({type(value).__name__}) for item "
                              f"{item.index}: a reward must be a number") from exc
        if not math.isfinite(score) or (not self.config.binary_reward
                                        and abs(score) > REWARD_LIMIT):
            raise RewardError(f"{source} returned {score!r} for item {item.index}: rewards "
                              f"must be finite numbers within ±{REWARD_LIMIT:g}")
        if self.config.binary_reward:
            return 1.0 if score >= 1.0 else 0.0
        return score


def _reasoning_gym_task(config: TaskConfig, seed: int):
    import reasoning_gym

    settings = json.loads(config.task_config)
    try:
        train = reasoning_gym.create_dataset(
            config.task, size=config.task_size, seed=seed, **settings
        )
        held = reasoning_gym.create_dataset(
            config.task, size=max(config.eval_size, 1),
            seed=seed + 1_000_003 if config.eval_seed is None else config.eval_seed, **settings
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"--rl-task {config.task!r} with {settings}: {exc}") from exc
    held_entries = [held[i] for i in range(config.eval_size)]
    return train, held_entries, train.score_answer


def _jsonl_task(config: TaskConfig):
    if not os.path.isfile(config.task):
        raise ConfigError(f"--rl-task {config.task}: no such file")
    entries = []
    with open(config.task) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{config.task} line {line_no}: not JSON ({exc})") from exc
            entries.append(_jsonl_entry(record, f"{config.task} line {line_no}"))
    if len(entries) <= config.eval_size:
        raise ConfigError(
            f"{config.task} has {len(entries)} items, not more than --rl-eval-size "
            f"{config.eval_size}"
        )
    held = entries[: config.eval_size]
    train = entries[config.eval_size:]

    def exact_match(response: str, entry: dict) -> float:
        return 1.0 if response.strip() == entry["answer"].strip() else 0.0

    return train, held, exact_match


def _jsonl_entry(record: Any, where: str) -> dict[str, Any]:
    """One JSONL record as a task entry; anything else is refused naming ``where``
    (a null answer would otherwise become the text "None", a list prompt its repr)."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: need a JSON object with 'prompt' and 'answer', got a "
                          f"{type(record).__name__}")
    missing = [key for key in ("prompt", "answer") if key not in record]
    if missing:
        raise ConfigError(f"{where}: no {' or '.join(map(repr, missing))} field")
    prompt, answer = record["prompt"], record["answer"]
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if (isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or answer == ""
            or (isinstance(answer, float) and not math.isfinite(answer))):
        raise ConfigError(f"{where}: 'answer' must be a non-empty string or a number, got "
                          f"{answer!r}")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ConfigError(f"{where}: 'metadata' must be a JSON object, got {metadata!r}")
    return {"question": prompt, "answer": str(answer), "metadata": metadata}


def load_function(path: str, what: str = "--rl-reward-function") -> Callable:
    """Import ``module:function`` (a user's reward function or teacher)."""
    try:
        return load_callable(path, what=what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
