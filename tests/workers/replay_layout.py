"""Worker: routing replay of the tiny model at one parallel layout.

Runs, on a fixed set of samples that each carry random valid routes:

A. a record pass (R2's pi_old pass) -- free routing, routes kept per micro-batch;
B. a replay of those recorded routes -- logits must equal A's bitwise;
C. a replay of the samples' random routes (R3) -- logits must differ from A's; every
   router call returns exactly the given experts;
D. a training step replaying the random routes (with activation recompute if asked):
   forward and recomputed router calls return the given experts of their own
   micro-batch; the router weights receive gradients;
E. after that update, a replay of A's recorded routes (R2's updates): the experts used
   are the recorded ones;
F. an observe pass with A's routes: the trainer's own top-k now differs for some tokens.

Writes per rank the checks and the per-sample results (recorded routes, logprobs) that
the test compares with the single-process reference, and the reduced statistics.
"""

import argparse
import json
import os

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--vpp-layers", type=int, default=None)
    p.add_argument("--dispatcher", default="allgather")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--pack", action="store_true")
    p.add_argument("--stage-routes", action="store_true",
                   help="feed micro-batches only this stage's MoE layers")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--save", default=None)
    p.add_argument("--load", default=None)
    args = p.parse_args()

    from megatron.core import parallel_state as ps
    from replay_common import RouterObserver, expected_map, per_sample_loss, samples_with_routes

    from megatron_rl.data.packing import set_global_counts, split_microbatches
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.metrics.stats import all_reduce_stats, results
    from megatron_rl.model.config import PRESETS
    from megatron_rl.replay.binding import unwrap
    from megatron_rl.replay.router_replay import RoutingReplay
    from megatron_rl.replay.split import rank_share_of_microbatch, routes_by_sample
    from megatron_rl.training import checkpoint as ckpt
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.training.forward_step import make_forward_step

    model = PRESETS["tiny"].replace(moe_token_dispatcher_type=args.dispatcher, seq_length=32)
    if args.recompute:
        model = model.replace(recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1)
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep, sequence_parallel=args.tp > 1,
        num_layers_per_virtual_pipeline_stage=args.vpp_layers,
    )
    training = TrainingConfig(micro_batch_size=2, global_batch_size=8, lr=2e-4,
                              lr_decay_style="constant", clip_grad=1e6, train_iters=10)
    init_distributed(parallel, model.num_layers, seed=1234)
    engine = MegatronEngine(model, parallel, training, routing_replay=True)
    if args.load:
        ckpt.load_checkpoint(engine, args.load)
    if args.save:
        ckpt.save_checkpoint(engine, args.save, 0, {})

    replay = RoutingReplay(engine.chunks, model)
    observer = RouterObserver(engine.chunks)
    E, k = model.num_experts, model.moe_router_topk
    moe = model.moe_layer_indices()
    tp_size, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    checks: dict[str, bool] = {}

    def check(name: str, ok: bool) -> None:
        checks[name] = checks.get(name, True) and bool(ok)

    samples = samples_with_routes(args.samples, 7, len(moe), k, E)
    mine = samples[dp_rank::dp_size]
    batches, length = split_microbatches(
        mine, 2, pad_multiple=4 * tp_size, max_length=model.seq_length, pack=args.pack,
        route_shape=(len(moe), k, E), length_of=samples,
    )
    total_tokens = sum(s.response_len for s in samples)
    set_global_counts(batches, len(samples), total_tokens)
    given_full = {b.key: b.routes for b in batches}
    positions = replay.stage_moe_positions()
    check("stage_positions", [moe[j] for j in positions] == replay.stage_moe_layers())

    def feed(routes_by_key: dict, stage_cut: bool) -> None:
        for b in batches:
            routes = routes_by_key[b.key]
            b.routes = rank_share_of_microbatch(routes, positions) if stage_cut else routes

    def run(mode: str, *, train: bool = False):
        step = observer.wrap(make_forward_step(per_sample_loss(), replay))
        with replay.pass_mode(mode):
            if train:
                result = engine.train_step(step, batches, seq_length=length, micro_batch_size=2,
                                           loss_of=lambda o: o["loss"])
                outputs = result.outputs
            else:
                result = None
                outputs = engine.forward_only(step, batches, seq_length=length,
                                              micro_batch_size=2)
        stats = results(all_reduce_stats(replay.stats()))
        return outputs, observer.take(), stats, result

    def forced(calls: list[dict], routes_by_key: dict, *, recompute_expected: bool) -> bool:
        """Every forward router call returned the target of its own micro-batch, each
        (micro-batch, layer) exactly once; recomputed calls, if any, each a target."""
        ok = True
        seen: dict[tuple[int, int], int] = {}
        recomputed: dict[int, int] = {}
        for call in calls:
            position = moe.index(call["layer"])
            if call["key"] is not None:
                want = expected_map(routes_by_key[call["key"]], position, E, tp_size, tp_rank)
                ok &= torch.equal(call["map"], want)
                seen[(call["key"], call["layer"])] = seen.get((call["key"], call["layer"]), 0) + 1
            else:
                recomputed[call["layer"]] = recomputed.get(call["layer"], 0) + 1
                ok &= any(
                    torch.equal(call["map"], expected_map(r, position, E, tp_size, tp_rank))
                    for r in routes_by_key.values()
                )
        mine_layers = replay.stage_moe_layers()
        ok &= seen == {(b.key, layer): 1 for b in batches for layer in mine_layers}
        if recompute_expected:
            ok &= recomputed == {layer: len(batches) for layer in mine_layers}
        else:
            ok &= not recomputed
        return bool(ok)

    # A: record (free routing); the micro-batches carry the random routes, so the pass also
    # measures how often free routing agrees with them.
    feed(given_full, args.stage_routes)
    out_a, calls_a, stats_a, _ = run("record")
    recorded = {b.key: replay.take_recorded(b.key) for b in batches}
    check("recorded_shape", all(
        tuple(recorded[b.key].shape) == (2, length, len(positions), k) for b in batches))
    check("recorded_dtype", all(r.dtype == torch.uint8 for r in recorded.values()))
    # What free routing chose, expanded back to all MoE layers for the forcing checks.
    recorded_full = {}
    for key, routes in recorded.items():
        full = given_full[key].clone()
        full[:, :, positions] = routes
        recorded_full[key] = full
    check("record_matches_free_routing", all(
        torch.equal(c["map"], expected_map(recorded_full[c["key"]], moe.index(c["layer"]), E,
                                           tp_size, tp_rank))
        for c in calls_a))
    per_sample_recorded = {}
    for b in batches:
        for index, routes in routes_by_sample(b, recorded[b.key]).items():
            per_sample_recorded[index] = {moe[j]: routes[:, i].tolist()
                                          for i, j in enumerate(positions)}

    # B: replaying the recorded routes reproduces free routing bitwise.
    feed(recorded_full, True)
    out_b, calls_b, stats_b, _ = run("replay")
    check("replay_recorded_forced", forced(calls_b, recorded_full, recompute_expected=False))
    check("replay_recorded_bitwise", all(
        torch.equal(a["logits"], b["logits"]) for a, b in zip(out_a, out_b, strict=True)))

    # C: replaying other (random) routes changes the logits.
    feed(given_full, args.stage_routes)
    out_c, calls_c, stats_c, _ = run("replay")
    check("replay_random_forced", forced(calls_c, given_full, recompute_expected=False))
    check("replay_random_changes_logits", all(
        not torch.equal(a["logits"], c["logits"]) for a, c in zip(out_a, out_c, strict=True)))
    replay_logprobs = {i: v for o in out_c for i, v in o["per_sample"].items()}
    free_logprobs = {i: v for o in out_a for i, v in o["per_sample"].items()}
    # Gates under replay are the softmax over the replayed experts' live logits.
    softmax_ok = True
    for call in calls_c:
        router = call["router"]
        logits = router.gating(call["input"]).view(-1, E)
        ids = call["map"].nonzero()[:, 1].view(-1, k)
        gates = torch.softmax(logits.gather(1, ids), dim=-1)
        softmax_ok &= torch.allclose(call["probs"].gather(1, ids), gates, rtol=1e-6, atol=0)
        softmax_ok &= bool((call["probs"].count_nonzero(dim=1) <= k).all())
    check("gates_softmax_over_replayed_logits", softmax_ok)

    # D: a training step under replay (recompute re-runs the routers inside backward).
    out_d, calls_d, stats_d, result = run("replay", train=True)
    check("train_forced", forced(calls_d, given_full, recompute_expected=args.recompute))
    grads = []
    for chunk in engine.model:
        for name, param in chunk.named_parameters():
            if name.endswith("router.weight"):
                grad = getattr(param, "main_grad", None)
                grads.append(float(grad.abs().sum()) if grad is not None else 0.0)
    check("router_weights_have_gradients", bool(grads) and all(g > 0 for g in grads))
    train_loss = sum(float(o["loss"]) for o in out_d)

    # E: R2 update after a weight change: the recorded experts are used.
    feed(recorded_full, True)
    out_e, calls_e, stats_e, _ = run("replay")
    check("r2_after_update_forced", forced(calls_e, recorded_full, recompute_expected=False))

    # F: observing only: the routers choose freely, compared with the recorded routes.
    out_f, calls_f, stats_f, _ = run("observe")
    check("observe_routes_freely", all(c["key"] is not None for c in calls_f))

    rank = torch.distributed.get_rank()
    record = {
        "rank": rank,
        "last_stage": last_stage,
        "tp_rank": tp_rank,
        "checks": checks,
        "recorded": {str(i): {str(layer): r for layer, r in v.items()}
                     for i, v in per_sample_recorded.items()},
        "replay_logprobs": {str(i): v for i, v in replay_logprobs.items()},
        "free_logprobs": {str(i): v for i, v in free_logprobs.items()},
        "train_loss": train_loss,
        "grad_norm": result.grad_norm,
        "stats": {"record": stats_a, "replay_recorded": stats_b, "replay_random": stats_c,
                  "train": stats_d, "r2_update": stats_e, "observe": stats_f},
        "chunks": len(engine.model),
        "bound_layers": replay.stage_moe_layers(),
        "unwrapped": [type(unwrap(c)).__name__ for c in engine.model],
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
