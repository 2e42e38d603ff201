"""Held-out evaluation, scored by the task: greedy decoding with the trainer's own model,
and (RL) K sampled responses per prompt from the rollout servers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from megatron_rl.data.tasks import Task, TaskItem
from megatron_rl.model.tokenizer import PromptEncoder
from megatron_rl.rewards.scoring import score_samples
from megatron_rl.rollout.types import RolloutRequest, RolloutSample
from megatron_rl.training.engine import MegatronEngine
from megatron_rl.training.generate import greedy_generate
from megatron_rl.training.rl_data import build_requests

logger = logging.getLogger(__name__)


def encode_item(tokenizer, item: TaskItem, with_answer: bool = True,
                answer_text: str | None = None,
                encode: PromptEncoder | None = None) -> tuple[list[int], int]:
    """Token ids of prompt (+ answer + eos) and the prompt length; ``answer_text`` replaces
    the reference answer (a teacher's demonstration); ``encode`` renders the prompt (the
    run's chat template; default: the plain text)."""
    prompt = (encode or PromptEncoder(tokenizer))(item.prompt)
    if not with_answer:
        return prompt, len(prompt)
    text = item.answer if answer_text is None else answer_text
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    return prompt + answer + [tokenizer.eos_token_id], len(prompt)


def evaluate(engine: MegatronEngine, task: Task, tokenizer, run) -> dict[str, float]:
    """Greedy held-out accuracy (collective)."""
    items = task.eval_items()
    if not items:
        return {}
    encode = PromptEncoder.for_task(tokenizer, run.task, run.model.tokenizer)
    prompts = [encode_item(tokenizer, item, with_answer=False, encode=encode)[0]
               for item in items]
    outputs = greedy_generate(
        engine, prompts, max_new_tokens=run.evaluation.eval_max_new_tokens,
        eos_id=tokenizer.eos_token_id, micro_batch_size=run.evaluation.eval_micro_batch_size,
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    scores = [task.score(text, item) for text, item in zip(texts, items, strict=True)]
    for text, item in list(zip(texts, items, strict=True))[:3]:
        logger.info("eval sample: %r -> %r (reference %r)", item.prompt, text, item.answer)
    # Accuracy counts fully correct answers; a scorer's partial credit (reasoning-gym gives
    # some for answers that merely contain the reference) shows in eval/score_mean.
    return {"eval/accuracy": sum(1.0 for s in scores if s >= 1.0) / len(scores),
            "eval/score_mean": sum(scores) / len(scores),
            "eval/response_length_mean": sum(len(o) for o in outputs) / len(outputs)}


def sampled_evaluate(generate: Callable[[list[RolloutRequest]], list[RolloutSample]],
                     task: Task, tokenizer, encode: Callable[[str], list[int]],
                     samples: int) -> dict[str, float]:
    """Accuracy of ``samples`` sampled responses per held-out prompt.

    ``generate`` turns the requests into samples (the rollout servers, with the rollouts'
    sampling settings); request ``(prompt i, sample j)`` must keep its sampling seed from
    one evaluation to the next, so that evaluations differ by the weights only."""
    items = dict(enumerate(task.eval_items()))
    if not items or samples < 1:
        return {}
    requests = build_requests(items, encode, samples)
    results = generate(requests)
    if len(results) != len(requests):
        raise RuntimeError(f"sampled evaluation: {len(results)} responses for "
                           f"{len(requests)} requests")
    score_samples(results, items, task, tokenizer)
    correct: dict[int, int] = {}
    for sample in results:
        correct[sample.prompt_index] = (correct.get(sample.prompt_index, 0)
                                        + (sample.reward >= 1.0))
    n = len(results)
    return {
        "eval/sampled_accuracy": sum(correct.values()) / n,
        "eval/pass_at_k": sum(1 for c in correct.values() if c) / len(items),
        "eval/sampled_reward_mean": sum(s.reward for s in results) / n,
        # Like eval/response_length_mean, without the stop token that ended a response.
        "eval/sampled_response_length_mean": sum(
            len(s.response_ids) - (s.finish_reason == "stop") for s in results) / n,
        "eval/sampled_truncated_frac": sum(s.finish_reason == "length" for s in results) / n,
    }
