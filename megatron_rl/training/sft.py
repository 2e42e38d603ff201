"""Cold start: supervised training on a task's reference answers.

The tiny policy first learns the task's format (as the paper's models do after
cold-start SFT): prompt -> answer -> end of sequence. The stage saves a megatron-core
distributed checkpoint that the RL stage loads, resumes from its own checkpoints, and
reports held-out accuracy with greedy decoding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from megatron_rl.arguments import RunConfig
from megatron_rl.data.packing import Sample, set_global_counts, split_microbatches
from megatron_rl.data.tasks import Task
from megatron_rl.distributed import init_distributed, is_rank0
from megatron_rl.metrics.stats import all_reduce_stats, merge_stats, results
from megatron_rl.metrics.writer import MetricsWriter
from megatron_rl.model.tokenizer import PromptEncoder, load_tokenizer
from megatron_rl.training import checkpoint as ckpt
from megatron_rl.training.engine import MegatronEngine, data_parallel_info
from megatron_rl.training.evaluation import encode_item, evaluate
from megatron_rl.training.forward_step import make_forward_step, sft_loss

logger = logging.getLogger(__name__)


def run_sft(run: RunConfig) -> dict[str, Any]:
    """The cold-start stage; returns the final metrics."""
    init_distributed(run.parallel, run.model.num_layers, run.training.seed)
    tokenizer = load_tokenizer(run.model.tokenizer, run.model.vocab_size)
    task = Task(run.task, seed=run.training.seed)
    # The cold start learns the prompts as RL and evaluation will show them.
    encode = PromptEncoder.for_task(tokenizer, run.task, run.model.tokenizer)
    engine = MegatronEngine(run.model, run.parallel, run.training)
    step, position = 0, 0
    cp = run.checkpoint
    source = ckpt.find_load_source(cp, "sft")
    if source is not None:
        common = ckpt.load_checkpoint(
            engine, source.directory, step=source.step,
            load_optimizer=not (cp.no_load_optim or cp.finetune),
            load_rng=not (cp.no_load_rng or cp.finetune),
        )
        if source.resume:
            step, position = common["step"], common.get("data_position", 0)
    writer = MetricsWriter(
        cp.save, tensorboard_dir=run.logging.tensorboard_dir,
        wandb_project=run.logging.wandb_project, wandb_exp_name=run.logging.wandb_exp_name,
        wandb_mode=run.logging.wandb_mode, config=_flat(run), filename="sft_metrics.jsonl",
        resume_step=step,
    )
    dp_rank, dp_size = data_parallel_info()
    t = run.training
    forward_step = make_forward_step(sft_loss())
    final: dict[str, Any] = {}
    if step == 0:
        final = evaluate(engine, task, tokenizer, run)
        writer.write(0, final)
        if is_rank0():
            logger.info("step 0 held-out accuracy %.3f", final.get("eval/accuracy", float("nan")))
    while step < t.train_iters:
        started = time.perf_counter()
        items, position = task.next_items(position, t.global_batch_size)
        encoded = [encode_item(tokenizer, item, answer_text=task.demonstration(item),
                               encode=encode) for item in items]
        samples = [Sample(tokens=ids, prompt_len=p, index=i) for i, (ids, p) in enumerate(encoded)]
        mine = samples[dp_rank::dp_size]
        batches, length = split_microbatches(mine, t.micro_batch_size,
                                             max_length=run.model.seq_length, length_of=samples)
        set_global_counts(batches, len(samples), sum(s.response_len for s in samples))
        result = engine.train_step(forward_step, batches, seq_length=length,
                                   micro_batch_size=t.micro_batch_size,
                                   loss_of=lambda out: out["loss"])
        step += 1
        stats = all_reduce_stats(merge_stats([o["stats"] for o in result.outputs]))
        metrics = {**results(stats), "train/grad_norm": result.grad_norm, "train/lr": result.lr,
                   "train/skipped": int(result.skipped),
                   "time/step": time.perf_counter() - started}
        interval = run.evaluation.eval_interval
        if (interval and step % interval == 0) or step == t.train_iters:
            metrics.update(evaluate(engine, task, tokenizer, run))
        writer.write(step, metrics)
        if is_rank0() and (step % run.logging.log_interval == 0 or step == t.train_iters):
            logger.info("sft step %d/%d nll %.4f grad %.3f lr %.2e%s", step, t.train_iters,
                        metrics.get("sft/nll", float("nan")), result.grad_norm, result.lr,
                        f" acc {metrics['eval/accuracy']:.3f}" if "eval/accuracy" in metrics else "")
        if cp.save and ((cp.save_interval and step % cp.save_interval == 0)
                        or step == t.train_iters):
            ckpt.save_checkpoint(engine, cp.save, step, {"data_position": position,
                                                         "stage": "sft"}, keep_last=cp.keep_last)
            if is_rank0():
                tokenizer.save_pretrained(cp.save)
        final = metrics
    writer.close()
    return final


def _flat(run: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"stage": run.stage}
    for name in ("model", "parallel", "training", "task"):
        for key, value in asdict(getattr(run, name)).items():
            out[f"{name}.{key}"] = value
    return out
