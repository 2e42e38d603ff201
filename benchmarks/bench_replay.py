"""Routing replay benchmarks: step-time overhead and route memory per rank.

1. Training-step time of the tiny model with R3 replay (every router replays given routes,
   validation, agreement and fidelity measured) divided by the time without replay
   (megatron-core's stock routers: our RouterReplay objects unbound, no replay hook in the
   forward step). Same engine, same micro-batches; the two alternate, starting order
   flipped every pair, and the median of the per-pair ratios is reported, in wall-clock
   and in CPU time of the process (stable when other jobs share the cores). Target: at
   most 1.02. The R2 record pass (forward only, pi_old) is measured the same way.
2. Bytes per stored expert id (``data.routes.route_dtype``).
3. Host bytes of route data each rank keeps for its share of a rollout batch, from
   ``replay.split`` / ``parallel_layout`` on a Qwen3-30B-A3B shaped batch (48 MoE layers, top-8, 128 experts),
   at PP=1, PP=2 and PP=2 x CP=2, next to int32 routes of all layers (what a rank holds
   when routes are not cut).

    python benchmarks/bench_replay.py [--pairs 30] [--micro-batches 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _samples(count: int, model, seed: int):
    from megatron_rl.data.packing import Sample
    from megatron_rl.data.routes import compact

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = int(torch.randint(16, 48, (1,), generator=gen))
        response = int(torch.randint(24, 96, (1,), generator=gen))
        tokens = torch.randint(4, model.vocab_size, (prompt + response,), generator=gen).tolist()
        scores = torch.rand(prompt + response - 1, model.num_moe_layers, model.num_experts,
                            generator=gen)
        routes = compact(scores.argsort(-1)[..., : model.moe_router_topk], model.num_experts)
        out.append(Sample(tokens=tokens, prompt_len=prompt, index=i, routes=routes))
    return out


def _timed(fn) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def _spread(ratios: list[float]) -> str:
    """Median and interquartile range (the noise of a shared machine shows in the range)."""
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return f"{median:.3f} [IQR {q1:.3f}-{q3:.3f}]"


def _instrument(replay) -> list[float]:
    """Accumulate the CPU time spent in the replay's own code during a pass (its
    forward-step hooks, each router's get_replay_topk -- which includes megatron's top-k or
    gather it replaces -- and the fidelity hooks): a view of its cost that other jobs on
    the machine barely disturb."""
    clock = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[0] += time.process_time() - start
        return wrapper

    microbatch = replay.microbatch

    class Timed:  # the context manager's enter and exit both count
        def __init__(self, *args):
            self.inner = microbatch(*args)

        @timed
        def __enter__(self):
            return self.inner.__enter__()

        @timed
        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    replay.microbatch = Timed
    replay.mark_output = timed(replay.mark_output)
    for site in replay.sites:
        bound = site.router.router_replay
        if bound is None:
            continue
        bound.get_replay_topk = timed(bound.get_replay_topk)
        hooks = site.router._forward_hooks
        for handle_id, hook in list(hooks.items()):
            hooks[handle_id] = timed(hook)
    return clock


def step_overhead(args) -> None:
    from megatron_rl.data.packing import set_global_counts, split_microbatches
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import preset
    from megatron_rl.replay.router_replay import RoutingReplay
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.training.forward_step import make_forward_step, sft_loss

    torch.set_num_threads(args.threads)
    model = preset("tiny")
    parallel = ParallelConfig()
    mbs = 4
    training = TrainingConfig(micro_batch_size=mbs, global_batch_size=mbs * args.micro_batches,
                              lr=1e-5, lr_decay_style="constant", train_iters=10 ** 6)
    init_distributed(parallel, model.num_layers, seed=1)
    engine = MegatronEngine(model, parallel, training, routing_replay=True)
    samples = _samples(mbs * args.micro_batches, model, seed=0)
    shape = (model.num_moe_layers, model.moe_router_topk, model.num_experts)
    batches, length = split_microbatches(samples, mbs, pad_multiple=16, route_shape=shape)
    set_global_counts(batches, len(samples), sum(s.response_len for s in samples))
    tokens = sum(s.num_inputs for s in samples)

    def train(replay) -> None:
        step = make_forward_step(sft_loss(), replay)
        engine.train_step(step, batches, seq_length=length, micro_batch_size=mbs)

    # R2's pi_old pass records the trainer's own routes: its micro-batches carry none.
    bare = [dataclasses.replace(b, routes=None) for b in batches]

    def forward(replay) -> None:
        engine.forward_only(make_forward_step(sft_loss(), replay), bare,
                            seq_length=length, micro_batch_size=mbs)

    def stock(run):
        return lambda: _timed(lambda: run(None))

    own_time: list[float] = []

    def replayed(run, mode, instrument=False):
        def go():
            # Binding and unbinding stay outside the timed region: they happen once per run.
            replay = RoutingReplay(engine.chunks, model)
            clock = _instrument(replay) if instrument else None
            try:
                def one_pass():
                    with replay.pass_mode(mode):
                        run(replay)
                    replay.stats()
                    if mode == "record":
                        for batch in bare:
                            replay.take_recorded(batch.key)
                timing = _timed(one_pass)
                if clock is not None:
                    own_time.append(clock[0])
                return timing
            finally:
                replay.close()
        return go

    print(f"tiny model, 1 process, {len(batches)} micro-batches of {mbs} x {length} tokens "
          f"({tokens} real), {args.pairs} pairs, {args.threads} threads")
    for label, base, variant, target in (
        ("training step, R3 replay / no replay", stock(train), replayed(train, "replay"), 1.02),
        ("pi_old pass, R2 record / no replay", stock(forward), replayed(forward, "record"), None),
    ):
        instrumented = replayed(train if "training" in label else forward,
                                "replay" if "training" in label else "record", instrument=True)
        base(), variant()  # warm-up
        own_time.clear()
        walls, cpus, times = [], [], {"base": [], "variant": []}
        for pair in range(args.pairs):
            order = (("base", base), ("variant", variant))
            if pair % 2:
                order = order[::-1]
            got = {}
            for name, fn in order:
                got[name] = fn()
                times[name].append(got[name])
            walls.append(got["variant"][0] / got["base"][0])
            cpus.append(got["variant"][1] / got["base"][1])
        for _ in range(5):
            instrumented()
        share = statistics.median(own_time) / statistics.median(t[1] for t in times["base"])
        best = min(t[1] for t in times["variant"]) / min(t[1] for t in times["base"])
        print(f"{label}: median of per-pair ratios: wall {_spread(walls)}, cpu {_spread(cpus)}"
              + (f" (target <= {target})" if target else "")
              + f"; ratio of best cpu times {best:.3f}; cpu time inside the replay's own "
              f"code (including the top-k it replaces) = {share:.3f} of the no-replay cpu "
              f"time {statistics.median(t[1] for t in times['base']) * 1e3:.1f} ms")


def route_memory() -> None:
    from megatron_rl.data.routes import route_dtype
    from megatron_rl.model.config import preset
    from megatron_rl.parallel_layout import moe_layers, pipeline_layers, stage_moe_positions
    from megatron_rl.replay.split import rank_share_of_microbatch, rank_share_of_sample

    for name in ("tiny", "qwen3-30b-a3b"):
        config = preset(name)
        size = torch.empty(0, dtype=route_dtype(config.num_experts)).element_size()
        print(f"{name}: {config.num_experts} experts -> {route_dtype(config.num_experts)}, "
              f"{size} byte(s) per stored expert id (int32 as returned by SGLang: 4)")

    # A data-parallel rank's share of a Qwen3-30B-A3B rollout: 64 responses (1,024 over
    # DP=16), prompt 512 + response 8,192 tokens -- shapes only (meta tensors).
    config = preset("qwen3-30b-a3b")
    samples, tokens = 64, 512 + 8192 - 1
    dtype = route_dtype(config.num_experts)
    all_layers = moe_layers(config)
    routes = torch.empty(tokens, len(all_layers), config.moe_router_topk, dtype=dtype,
                         device="meta")

    def per_rank(pp: int, cp: int) -> int:
        worst = 0
        for rank in range(pp):
            positions = stage_moe_positions(all_layers, pipeline_layers(config.num_layers, pp, rank))
            if cp == 1:
                share = rank_share_of_sample(routes, positions)
            else:  # CP cuts micro-batch rows (one sample per row, padded to 2 x CP)
                row = -(-tokens // (2 * cp)) * (2 * cp)
                padded = torch.empty(1, row, *routes.shape[1:], dtype=dtype, device="meta")
                share = rank_share_of_microbatch(padded, positions, cp, 0)
            worst = max(worst, share.numel() * share.element_size() * samples)
        return worst

    uncut = samples * tokens * len(all_layers) * config.moe_router_topk * 4
    pp1, pp2, pp2cp2 = per_rank(1, 1), per_rank(2, 1), per_rank(2, 2)
    mb = 1 / 2**20
    print(f"qwen3-30b-a3b route data per rank ({samples} responses x {tokens} tokens): "
          f"int32 all layers {uncut * mb:.1f} MiB; PP=1 {pp1 * mb:.1f} MiB; "
          f"PP=2 {pp2 * mb:.1f} MiB; PP=2 x CP=2 {pp2cp2 * mb:.1f} MiB")
    print(f"ratios: PP=2 / PP=1 = {pp2 / pp1:.3f}; PP=2xCP=2 / PP=1 = {pp2cp2 / pp1:.3f}; "
          f"PP=1 / int32 uncut = {pp1 / uncut:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    route_memory()
    step_overhead(args)


if __name__ == "__main__":
    main()
