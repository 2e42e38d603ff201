"""Worker: the first update standing in for its mini-batch's pi_old pass changes nothing.

For the two pi_old routings it applies to (``observe``: no replay, routers observed
against the rollout's routes; ``replay``: R3) and N = 1, 2 updates per step: from the
same saved weights and optimizer state, run the trainer half of an RL step twice --

  full:     pi_old pass over all samples, then N updates;
  shortcut: pi_old pass over mini-batches 2..N only, then N updates, the first scoring
            its own pi_old (rl_passes.policy_updates(first_as_old_mode=...)),

and write, per variant, the micro-batches each pass scored, the loss and gradient norm of
every update, the step's reduced statistics (pi_old pass and updates merged, as the RL
loop does) and a checksum of the final weights.
"""

import argparse
import json
import os

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from replay_common import samples_with_routes

    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.loss import ObjectiveConfig
    from megatron_rl.metrics.stats import all_reduce_stats, merge_stats, results
    from megatron_rl.model.config import PRESETS
    from megatron_rl.replay.router_replay import RoutingReplay
    from megatron_rl.training import checkpoint as ckpt
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.training.rl_passes import BatchLayout, old_logprobs, policy_updates

    model = PRESETS["tiny"].replace(seq_length=32)
    parallel = ParallelConfig()
    training = TrainingConfig(micro_batch_size=2, global_batch_size=8, lr=1e-3,
                              lr_decay_style="constant", clip_grad=1e6, train_iters=10)
    init_distributed(parallel, model.num_layers, seed=1234)
    engine = MegatronEngine(model, parallel, training, routing_replay=True)
    replay = RoutingReplay(engine.chunks, model)
    moe, k, E = model.moe_layer_indices(), model.moe_router_topk, model.num_experts
    layout = BatchLayout(micro_batch_size=2, seq_length=32, pack=False, pad_id=0,
                         route_shape=(len(moe), k, E))
    objective = ObjectiveConfig()

    scored: list[int] = []
    forward_only = engine.forward_only

    def counting(step, batches, **kw):
        scored.append(len(batches))
        return forward_only(step, batches, **kw)

    engine.forward_only = counting

    def fresh_samples():
        samples = samples_with_routes(8, 11, len(moe), k, E)
        gen = torch.Generator().manual_seed(5)
        for s in samples:
            s.advantage = float(torch.randn(1, generator=gen))
        return samples

    # The rollout's logprobs: the model's own, perturbed (a real training-inference gap).
    probe = fresh_samples()
    old_logprobs(engine, probe, layout, replay=replay, replay_mode="observe", carry_routes=True)
    gen = torch.Generator().manual_seed(6)
    rollout = [s.old_logprobs + 0.05 * torch.randn(s.old_logprobs.shape, generator=gen)
               for s in probe]

    # One update first, so that the saved optimizer holds Adam moments to restore (a
    # checkpoint without them would leave each variant the previous one's).
    for s, mu in zip(probe, rollout, strict=True):
        s.rollout_logprobs = mu.clamp(max=0.0)
    policy_updates(engine, probe, layout, objective, 1, replay=replay, replay_mode="off")
    saved = os.path.join(args.out, "ckpt")
    ckpt.save_checkpoint(engine, saved, 1, {})

    report = {}
    for mode in ("observe", "replay"):
        for n in (1, 2):
            for variant in ("full", "shortcut"):
                ckpt.load_checkpoint(engine, saved)
                samples = fresh_samples()
                for s, mu in zip(samples, rollout, strict=True):
                    s.rollout_logprobs = mu.clamp(max=0.0)
                scored.clear()
                tail = samples[len(samples) // n :] if variant == "shortcut" else samples
                stats = old_logprobs(engine, tail, layout, replay=replay, replay_mode=mode,
                                     carry_routes=True)
                passes = list(scored)
                outcomes = policy_updates(
                    engine, samples, layout, objective, n, replay=replay,
                    replay_mode="replay" if mode == "replay" else "off",
                    first_as_old_mode=mode if variant == "shortcut" else None,
                )
                for _, update_stats in outcomes:
                    stats = merge_stats([stats, update_stats])
                weights = torch.cat([q.detach().double().flatten()
                                     for c in engine.chunks for q in c.parameters()])
                report[f"{mode}/N{n}/{variant}"] = {
                    "old_pass_microbatches": passes,
                    "loss": [float(sum(float(o["loss"]) for o in r.outputs)) for r, _ in outcomes],
                    "grad_norm": [r.grad_norm for r, _ in outcomes],
                    "stats": results(all_reduce_stats(stats)),
                    "weights_sum": float(weights.sum()),
                    "weights_abs_sum": float(weights.abs().sum()),
                }
    with open(os.path.join(args.out, "rank0.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
