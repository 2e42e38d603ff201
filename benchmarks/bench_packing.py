"""Host-side batching against the passes that consume it.

An RL step of N updates lays its rollout batch out as micro-batches (``data.packing``)
1 + N times: once for the pi_old pass and once for each update's mini-batch. This measures
``split_microbatches`` on a batch shaped like the study's (prompts x G responses, the
responses of one prompt laid out over one copy of it, rollout routes carried for R3)
against the pi_old pass (forward only) and a training step over the same micro-batches,
on the tiny model in one process. The three alternate, order flipped every round; the
medians of the per-round ratios are printed, and the share of an RL step's compute,
(1 + N) x batching / (pi_old + N x training step), at N = 1 (the largest share) and 8.
Target: at most 0.02 of an RL step at N = 1. The passes run without a replay hook and with
a plain cross-entropy loss, a little cheaper than the RL loop's: the shares printed are
upper bounds.

    python benchmarks/bench_packing.py [--prompts 64] [--responses 8] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _samples(prompts: int, responses: int, model, seed: int):
    """``responses`` samples per prompt, sharing its tokens, with random routes."""
    from megatron_rl.data.packing import Sample
    from megatron_rl.data.routes import compact

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _prompt in range(prompts):
        prompt_len = int(torch.randint(16, 48, (1,), generator=gen))
        prompt = torch.randint(4, model.vocab_size, (prompt_len,), generator=gen).tolist()
        # A prompt's tokens are routed once: its responses carry the same routes there.
        prompt_scores = torch.rand(len(prompt) - 1, model.num_moe_layers, model.num_experts,
                                   generator=gen)
        for _response in range(responses):
            length = int(torch.randint(8, 64, (1,), generator=gen))
            tokens = prompt + torch.randint(4, model.vocab_size, (length,), generator=gen).tolist()
            scores = torch.cat([prompt_scores, torch.rand(length, model.num_moe_layers,
                                                          model.num_experts, generator=gen)])
            routes = compact(scores.argsort(-1)[..., : model.moe_router_topk], model.num_experts)
            out.append(Sample(tokens=tokens, prompt_len=prompt_len, index=len(out),
                              routes=routes))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--responses", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from megatron_rl.data.packing import set_global_counts, split_microbatches
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import preset
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.training.forward_step import make_forward_step, sft_loss

    torch.set_num_threads(args.threads)
    model = preset("tiny")
    mbs = args.micro_batch_size
    samples = _samples(args.prompts, args.responses, model, seed=0)
    count = -(-len(samples) // mbs)
    training = TrainingConfig(micro_batch_size=mbs, global_batch_size=mbs * count, lr=1e-6,
                              lr_decay_style="constant", train_iters=10 ** 6)
    init_distributed(ParallelConfig(), model.num_layers, seed=1)
    engine = MegatronEngine(model, ParallelConfig(), training, routing_replay=True)
    shape = (model.num_moe_layers, model.moe_router_topk, model.num_experts)

    def batch():
        return split_microbatches(samples, mbs, pad_multiple=8, route_shape=shape,
                                  share_prompts=True)

    batches, length = batch()
    set_global_counts(batches, len(samples), sum(s.response_len for s in samples))
    step = make_forward_step(sft_loss())
    rows = batches[0].tokens.shape[0]
    runs = {
        "batching": batch,
        "pi_old pass": lambda: engine.forward_only(step, batches, seq_length=length,
                                                   micro_batch_size=rows),
        "training step": lambda: engine.train_step(step, batches, seq_length=length,
                                                   micro_batch_size=rows),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        order = list(runs.items())
        for name, fn in order[::-1] if r % 2 else order:
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    print(f"tiny model, 1 process, {args.threads} thread(s): {len(samples)} samples "
          f"({args.prompts} prompts x {args.responses}), {len(batches)} micro-batches of "
          f"{rows} x {length} tokens, {args.rounds} rounds, cpu time of the process")
    for name in runs:
        print(f"  {name:14s} median {statistics.median(times[name]) * 1e3:9.1f} ms")
    rounds = list(zip(times["batching"], times["pi_old pass"], times["training step"],
                      strict=True))
    shares = {
        "pi_old pass": ([b / p for b, p, _ in rounds], None),
        "training step": ([b / t for b, _, t in rounds], None),
        **{f"RL step, N = {n}": ([(1 + n) * b / (p + n * t) for b, p, t in rounds],
                                 0.02 if n == 1 else None) for n in (1, 8)},
    }
    for consumer, (ratios, target) in shares.items():
        print(f"batching / {consumer}: median of per-round ratios "
              f"{statistics.median(ratios):.4f} (min {min(ratios):.4f}, max {max(ratios):.4f})"
              + (f", target <= {target}" if target else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
