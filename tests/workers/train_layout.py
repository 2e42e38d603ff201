"""Worker: train the tiny model a few SFT steps at one parallel layout.

Writes, per rank, the global loss and gradient norm of every step (and optionally the
rank's parameters and optimiser state) so tests can compare layouts with the
single-process reference. Launched by tests through torchrun.
"""

import argparse
import json
import os

import torch


def fixed_samples(count: int, seed: int):
    from megatron_rl.data.packing import Sample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        prompt = int(torch.randint(4, 12, (1,), generator=gen))
        response = int(torch.randint(2, 9, (1,), generator=gen))
        tokens = torch.randint(4, 100, (prompt + response,), generator=gen).tolist()
        samples.append(Sample(tokens=tokens, prompt_len=prompt, index=i))
    return samples


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--vpp-layers", type=int, default=None)
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--load", default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--own-schedule", action="store_true",
                   help="load the optimiser state but keep this run's learning rate")
    p.add_argument("--save", default=None)
    p.add_argument("--save-at", type=int, default=None, help="save after this many steps")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--start-step", type=int, default=0, help="index of the first step's data")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--dump-at", type=int, default=None,
                   help="write parameters/optimizer state after this many steps (0: at start)")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--dispatcher", default="allgather")
    args = p.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_rl.data.packing import set_global_counts, split_microbatches
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.metrics.stats import Stat, all_reduce_stats
    from megatron_rl.model.config import PRESETS
    from megatron_rl.training import checkpoint as ckpt
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.training.forward_step import make_forward_step, sft_loss

    model = PRESETS["tiny"].replace(moe_token_dispatcher_type=args.dispatcher)
    if args.recompute:
        model = model.replace(recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1)
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep, sequence_parallel=args.tp > 1,
        num_layers_per_virtual_pipeline_stage=args.vpp_layers,
    )
    training = TrainingConfig(micro_batch_size=args.micro_batch_size, global_batch_size=8,
                              lr=args.lr, lr_decay_style="constant", clip_grad=1e6,
                              use_distributed_optimizer=args.dist_opt, train_iters=10)
    init_distributed(parallel, model.num_layers, seed=1234)
    engine = MegatronEngine(model, parallel, training)
    if args.load:
        ckpt.load_checkpoint(engine, args.load, load_scheduler=not args.own_schedule)
    rank = torch.distributed.get_rank()

    def dump() -> None:
        params = {n: p.detach().clone() for c in engine.chunks for n, p in c.named_parameters()}
        torch.save({"params": params, "optimizer": engine.optimizer.state_dict()},
                   os.path.join(args.out, f"dump{rank}.pt"))

    if args.save and args.save_at == 0:
        ckpt.save_checkpoint(engine, args.save, 0, {})
    if args.dump_at == 0:
        dump()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    forward_step = make_forward_step(sft_loss())
    losses, norms = [], []
    for step in range(args.steps):
        samples = fixed_samples(8, seed=100 + args.start_step + step)
        mine = samples[dp_rank::dp_size]
        batches, length = split_microbatches(mine, args.micro_batch_size, pad_multiple=4,
                                             length_of=samples)
        set_global_counts(batches, len(samples), sum(s.response_len for s in samples))
        result = engine.train_step(forward_step, batches, seq_length=length,
                                   micro_batch_size=args.micro_batch_size,
                                   loss_of=lambda o: o["loss"])
        local = sum(float(o["loss"]) for o in result.outputs)
        stats = {"loss": Stat(local, 1.0 if result.outputs else 0.0, "sum")}
        total = all_reduce_stats(stats)["loss"].value
        # The loss exists on the last pipeline stage only; every DP replica of it counted.
        losses.append(total / max(1, ps.get_tensor_model_parallel_world_size()))
        norms.append(result.grad_norm)
        if args.save and args.save_at == step + 1:
            ckpt.save_checkpoint(engine, args.save, step + 1, {})
        if args.dump_at == step + 1:
            dump()
    import multiprocessing

    from megatron_rl import cpu_adaptation

    # Processes still alive that this one started (a checkpoint writer's helpers).
    children = [p.name for p in multiprocessing.active_children()]
    record = {"losses": losses, "grad_norms": norms, "rank": rank,
              "redirect_sites": cpu_adaptation.redirect_sites(), "children": children,
              "adapted": cpu_adaptation.is_active()}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
