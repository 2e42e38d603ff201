"""Worker (1 process): binding routes to routers by layer identity.

Two models in one process each get their own routes; MTP routers get none (free
routing) while the decoder's get theirs; dense models and megatron settings that cannot
replay are refused; megatron's process-global RouterReplay list holds none of our
routers; route sets of the wrong shape, missing routes and misuse are refused with
clear errors. Writes a dict of named checks (and error messages) to rank0.json.
"""

import argparse
import json
import os

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplay
    from replay_common import RouterObserver, expected_map, samples_with_routes

    from megatron_rl.data.packing import split_microbatches
    from megatron_rl.data.routes import RouteError
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model import provider
    from megatron_rl.model.config import PRESETS
    from megatron_rl.replay.binding import ReplayBindingError
    from megatron_rl.replay.bound_router import BoundRouterReplay, ReplayError
    from megatron_rl.replay.router_replay import RoutingReplay
    from megatron_rl.training.forward_step import make_forward_step

    model = PRESETS["tiny"]
    parallel = ParallelConfig()
    init_distributed(parallel, model.num_layers, seed=1234)
    E, k = model.num_experts, model.moe_router_topk
    moe = model.moe_layer_indices()
    checks: dict[str, bool] = {}
    errors: dict[str, str] = {}

    def enter(replay, mode):
        with replay.pass_mode(mode):
            pass

    def refused(name: str, error: type, fn) -> None:
        try:
            fn()
        except error as exc:
            checks[name] = True
            errors[name] = str(exc)
        else:
            checks[name] = False

    def routers(chunks):
        return [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]

    def loss(batch, output):
        return output.float().sum() * 0, {}

    def forward(replay, chunk, batch, mode, **kw):
        step = make_forward_step(loss, replay)
        with torch.no_grad(), replay.pass_mode(mode):
            chunk.eval()
            return step(iter([batch]), chunk)

    def batch_of(seed, **kw):
        samples = samples_with_routes(2, seed, len(moe), k, E)
        batches, _ = split_microbatches(samples, 2, pad_multiple=4, route_shape=(len(moe), k, E))
        return batches[0]

    # -- two models in one process, each with its own routes --------------------------
    model_a = provider.build_model(model, parallel)
    model_b = provider.build_model(model, parallel)
    registry = RouterReplay.global_router_replay_instances
    ours = {id(r.router_replay) for r in routers(model_a + model_b)}
    checks["provider_leaves_global_list_clean"] = not ours & {id(r) for r in registry}
    replay_a = RoutingReplay(model_a, model)
    replay_b = RoutingReplay(model_b, model)
    bound = routers(model_a + model_b)
    checks["bound_by_layer"] = all(
        isinstance(r.router_replay, BoundRouterReplay)
        and r.router_replay.layer_number == r.layer_number
        and r.router_replay.site.position == moe.index(r.layer_number - 1)
        for r in bound
    )
    checks["bound_not_in_global_list"] = not {id(r.router_replay) for r in bound} & {
        id(r) for r in registry}
    checks["dense_layer_unbound"] = replay_a.stage_moe_layers() == moe == [1, 2, 3]
    refused("second_binding_refused", ReplayBindingError, lambda: RoutingReplay(model_a, model))

    observer = RouterObserver(model_a + model_b)
    batch_a, batch_b = batch_of(11), batch_of(12)
    # Interleaved: A, B, A again -- each model must use its own routes every time.
    for replay, chunks, batch in ((replay_a, model_a, batch_a), (replay_b, model_b, batch_b),
                                  (replay_a, model_a, batch_a)):
        forward(replay, chunks[0], batch, "replay")
        calls = observer.take()
        own = {id(r) for r in routers(chunks)}
        checks.setdefault("two_models_own_routes", True)
        checks["two_models_own_routes"] &= len(calls) == len(moe) and all(
            id(c["router"]) in own
            and torch.equal(c["map"], expected_map(batch.routes, moe.index(c["layer"]), E, 1, 0))
            for c in calls
        )
    stats = replay_a.stats()
    checks["stats_per_model"] = stats["replay/fidelity"].count == 2 * len(moe) * int(
        (batch_a.sample_ids >= 0).sum())

    # -- validation and misuse ----------------------------------------------------------
    wrong_layers = batch_of(13)
    wrong_layers.routes = wrong_layers.routes[:, :, :2].clone()
    refused("wrong_layer_count_refused", RouteError,
            lambda: forward(replay_a, model_a[0], wrong_layers, "replay"))
    missing = batch_of(14)
    missing.routes = None
    refused("missing_routes_refused", RouteError,
            lambda: forward(replay_a, model_a[0], missing, "replay"))
    duplicated = batch_of(15)
    duplicated.routes[0, 3, 1, 1] = duplicated.routes[0, 3, 1, 0]
    refused("duplicate_ids_refused_before_use", RouteError,
            lambda: forward(replay_a, model_a[0], duplicated, "replay"))
    refused("forward_outside_pass_refused", ReplayError,
            lambda: make_forward_step(loss, replay_a)(iter([batch_a]), model_a[0]))
    refused("unknown_chunk_refused", ReplayBindingError,
            lambda: forward(replay_a, model_b[0], batch_a, "replay"))
    refused("take_unrecorded_refused", KeyError, lambda: replay_a.take_recorded(99))
    refused("unknown_mode_refused", ValueError, lambda: enter(replay_a, "forced"))
    forward(replay_a, model_a[0], batch_a, "record")
    after = replay_a.take_recorded(batch_a.key)
    checks["record_then_take"] = tuple(after.shape) == (*batch_a.tokens.shape, len(moe), k)
    with torch.no_grad(), replay_a.pass_mode("record"):
        make_forward_step(loss, replay_a)(iter([batch_a]), model_a[0])
        inside = replay_a.take_recorded(batch_a.key)
    checks["take_inside_record_pass"] = torch.equal(inside, after)

    def take_during_replay():
        with replay_a.pass_mode("replay"):
            replay_a.take_recorded(0)

    refused("take_in_replay_pass_refused", ReplayError, take_during_replay)

    # -- close() gives megatron's objects back --------------------------------------------
    originals = [orig for _, orig in replay_b._originals]
    replay_b.close()
    checks["close_restores"] = [r.router_replay for r in routers(model_b)] == originals
    checks["rebind_after_close"] = isinstance(
        RoutingReplay(model_b, model).sites[0].router.router_replay, BoundRouterReplay)

    # -- MTP: decoder routers get routes, the MTP router none -----------------------------
    config = provider.transformer_config(model, parallel)
    config.mtp_num_layers = 1
    spec = provider.layer_spec(config, False)
    mtp_model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings, position_embedding_type="rope",
        mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False),
    )
    replay_m = RoutingReplay([mtp_model], model)
    mtp_sites = [s for s in replay_m.sites if s.is_mtp]
    checks["mtp_found_and_unbound"] = (
        len(mtp_sites) == 1 and mtp_sites[0].router.router_replay is None
        and mtp_sites[0].layer == model.num_layers
        and replay_m.stage_moe_layers() == moe
    )
    observer_m = RouterObserver([mtp_model])
    batch = batch_of(16)
    step = make_forward_step(loss, replay_m)
    mtp_model.eval()
    with torch.no_grad(), replay_m.pass_mode("replay"), replay_m.microbatch(batch, mtp_model):
        mtp_model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels)
    del step
    calls = observer_m.take()
    decoder = [c for c in calls if c["layer"] < model.num_layers]
    mtp = [c for c in calls if c["layer"] >= model.num_layers]
    checks["mtp_decoder_forced"] = len(decoder) == len(moe) and all(
        torch.equal(c["map"], expected_map(batch.routes, moe.index(c["layer"]), E, 1, 0))
        for c in decoder)
    free_ok = len(mtp) == 1
    for c in mtp:
        logits = c["router"].gating(c["input"]).view(-1, E)
        free = torch.zeros_like(c["map"]).scatter_(1, logits.topk(k, dim=1).indices, True)
        free_ok &= torch.equal(c["map"], free)
    checks["mtp_routes_freely"] = free_ok
    checks["mtp_not_in_stats"] = not any(
        name.endswith(f"layer_{model.num_layers}") for name in replay_m.stats())

    # -- models that cannot replay --------------------------------------------------------
    dense = provider.build_model(model.replace(moe_layer_freq="[0,0,0,0]"), parallel)
    replay_d = RoutingReplay(dense, model.replace(moe_layer_freq="[0,0,0,0]"))
    checks["dense_has_no_sites"] = replay_d.sites == [] and replay_d.stage_moe_positions() == []
    refused("dense_replay_refused", ReplayError, lambda: enter(replay_d, "replay"))
    fused = provider.build_model(model.replace(moe_router_fusion=True), parallel)
    replay_f = RoutingReplay(fused, model)
    refused("fused_replay_refused", ReplayBindingError,
            lambda: enter(replay_f, "replay"))
    refused("fused_observe_refused", ReplayError, lambda: enter(replay_f, "observe"))

    with open(os.path.join(args.out, "rank0.json"), "w") as handle:
        json.dump({"checks": checks, "errors": errors}, handle)


if __name__ == "__main__":
    main()
