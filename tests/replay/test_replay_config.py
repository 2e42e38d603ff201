"""``--routing-replay``: flags, per-pass modes and the start-up refusals."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from megatron_rl.config.flags import ConfigError, add_config_flags, config_from_flags
from megatron_rl.distributed import ParallelConfig
from megatron_rl.model.config import PRESETS
from megatron_rl.replay.config import ReplayConfig

TINY = PRESETS["tiny"]


def parse(argv: list[str]) -> ReplayConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ReplayConfig)
    return config_from_flags(ReplayConfig, parser.parse_args(argv))


def test_flag_and_help():
    assert parse([]).routing_replay == "none"
    assert parse(["--routing-replay", "r3"]).routing_replay == "r3"
    with pytest.raises(SystemExit):
        parse(["--routing-replay", "r4"])
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ReplayConfig)
    assert "inference engine chose" in parser.format_help()


@pytest.mark.parametrize("mode, old_pass, update", [
    ("none", "observe", "off"), ("r2", "record", "replay"), ("r3", "replay", "replay")])
def test_pass_modes(mode, old_pass, update):
    config = ReplayConfig(routing_replay=mode)
    assert config.old_logprob_mode(have_rollout_routes=True) == old_pass
    assert config.update_mode() == update
    assert config.needs_rollout_routes == (mode == "r3")
    if mode == "none":
        assert config.old_logprob_mode(have_rollout_routes=False) == "off"


@pytest.mark.parametrize("change, message", [
    ({"moe_router_fusion": True}, "--moe-router-fusion"),
    ({"moe_token_dispatcher_type": "flex"}, "flex"),
    ({"moe_layer_freq": "[0,0,0,0]"}, "needs MoE layers"),
])
@pytest.mark.parametrize("mode", ["r2", "r3"])
def test_startup_refusals(change, message, mode):
    model = TINY.replace(**change)
    with pytest.raises(ConfigError, match=message) as err:
        ReplayConfig(routing_replay=mode).validate(SimpleNamespace(model=model))
    assert f"--routing-replay {mode}" in str(err.value)
    ReplayConfig(routing_replay="none").validate(SimpleNamespace(model=model))  # no replay: fine


def test_provider_refuses_replay_it_cannot_do_and_always_enables_routers_replay():
    from megatron_rl.model.provider import transformer_config

    with pytest.raises(ConfigError, match="fused router"):
        transformer_config(TINY.replace(moe_router_fusion=True), ParallelConfig(),
                           routing_replay=True, use_te=False)
    config = transformer_config(TINY, ParallelConfig(), use_te=False)
    assert config.moe_enable_routing_replay and config.moe_router_pre_softmax is False


@pytest.mark.parametrize("change, message", [
    ({"moe_router_fusion": True}, "moe_router_fusion"),
    ({"moe_token_dispatcher_type": "flex"}, "flex dispatcher"),
    ({"moe_expert_capacity_factor": 1.0}, "token dropping"),
    ({"moe_router_load_balancing_type": "sinkhorn"}, "sinkhorn"),
])
def test_binding_refuses_megatron_settings_that_undo_replay(change, message):
    from megatron_rl.replay.binding import ReplayBindingError, check_routers_replayable

    base = dict(moe_router_fusion=False, moe_token_dispatcher_type="alltoall",
                moe_expert_capacity_factor=None, moe_router_load_balancing_type="aux_loss")
    check_routers_replayable(SimpleNamespace(**base))
    with pytest.raises(ReplayBindingError, match=message):
        check_routers_replayable(SimpleNamespace(**{**base, **change}))


def test_one_table_decides_when_replay_can_be_exact():
    """The start-up check (flags) and the pass-time check (TransformerConfig) state the
    same reasons, from REPLAY_BLOCKERS."""
    from megatron_rl.replay.binding import ReplayBindingError, check_routers_replayable
    from megatron_rl.replay.config import REPLAY_BLOCKERS, check_model_supports_replay

    base = dict(moe_router_fusion=False, moe_token_dispatcher_type="alltoall",
                moe_expert_capacity_factor=None, moe_router_load_balancing_type="aux_loss",
                num_experts=16, num_moe_layers=3)
    bad = {"moe_router_fusion": True, "moe_token_dispatcher_type": "flex",
           "moe_expert_capacity_factor": 1.0, "moe_router_load_balancing_type": "sinkhorn"}
    assert {b.attribute for b in REPLAY_BLOCKERS} == set(bad)
    for blocker in REPLAY_BLOCKERS:
        config = SimpleNamespace(**{**base, blocker.attribute: bad[blocker.attribute]})
        with pytest.raises(ConfigError) as at_start:
            check_model_supports_replay(config, flag="--routing-replay r3")
        with pytest.raises(ReplayBindingError) as at_pass:
            check_routers_replayable(config)
        assert blocker.why in str(at_start.value) and blocker.flag in str(at_start.value)
        assert blocker.why in str(at_pass.value)
