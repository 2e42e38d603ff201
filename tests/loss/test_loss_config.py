"""Flags of ObjectiveConfig, its validation, and the objective registry."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from megatron_rl.arguments import RunConfig
from megatron_rl.config.flags import ConfigError, add_config_flags, config_from_flags, field_help
from megatron_rl.loss import OBJECTIVES, ObjectiveConfig, compute_loss, get_objective
from megatron_rl.loss.config import OBJECTIVE_DEFAULTS
from megatron_rl.loss.objectives import minirl


def parse(*argv: str) -> ObjectiveConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ObjectiveConfig)
    return config_from_flags(ObjectiveConfig, parser.parse_args(list(argv)))


def test_defaults_are_the_papers():
    config = parse()
    assert config.objective == "minirl"
    assert (config.clip_low, config.clip_high, config.is_cap) == (0.2, 0.27, 5.0)
    assert config.correction_in_force() == "tis"
    assert config.estimator_in_force() == "group_mean"
    config.validate(RunConfig())


def test_every_field_has_help():
    for field in dataclasses.fields(ObjectiveConfig):
        assert field_help(ObjectiveConfig, field.name), field.name


def test_flags_parse():
    config = parse("--rl-objective", "gspo", "--rl-is-cap", "none", "--rl-correction", "none",
                   "--rl-correction-level", "sequence", "--rl-cispo-clip-low", "0.3")
    assert config.objective == "gspo"
    assert config.is_cap is None
    assert config.correction == "none" and config.correction_in_force() == "none"
    assert config.correction_level == "sequence"
    assert config.cispo_clip_low == 0.3
    with pytest.raises(SystemExit):
        parse("--rl-correction", "bogus")


@pytest.mark.parametrize("objective", ["grpo", "gspo", "cispo"])
def test_auto_picks_the_papers_estimator_and_correction(objective):
    config = ObjectiveConfig(objective=objective)
    assert config.estimator_in_force() == "group_mean_std"
    assert config.correction_in_force() == "none"
    assert ObjectiveConfig(objective=objective, correction="tis").correction_in_force() == "tis"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(objective="nope"), "--rl-objective 'nope' is unknown; choose one of minirl"),
        (dict(clip_low=1.0), r"--rl-clip-low must be in \[0, 1\)"),
        (dict(clip_high=-0.1), "--rl-clip-high must be a finite number >= 0"),
        (dict(grpo_clip=1.5), r"--rl-grpo-clip must be in \[0, 1\)"),
        (dict(is_cap=0.0), "--rl-is-cap must be a positive number or none"),
        (dict(mis_low=2.0, mis_high=1.0), "--rl-mis-low 2.0 and --rl-mis-high 1.0 must satisfy"),
        (dict(icepop_alpha=-1.0), "--rl-icepop-alpha -1.0 and --rl-icepop-beta 5.0 must satisfy"),
        (dict(objective="minirl_no_is", correction="tis"), "minirl_no_is has no training-inference weight"),
        (dict(advantage_estimator="median"), "--rl-advantage-estimator 'median' is unknown"),
        (dict(advantage_std_eps=-1.0), "--rl-advantage-std-eps must be >= 0"),
        (dict(cispo_clip_low=1.0), r"--rl-cispo-clip-low must be in \[0, 1\)"),
        (dict(objective="loss_batches:nothing"), "--rl-objective 'loss_batches:nothing': 'loss_batches' has no attribute"),
        (dict(advantage_estimator="no_such_mod_q:f"), "--rl-advantage-estimator 'no_such_mod_q:f': cannot import"),
        (dict(kl_coef=-0.1), "--rl-kl-coef must be a finite number >= 0, got -0.1"),
        (dict(kl_coef=float("nan")), "--rl-kl-coef must be a finite number >= 0, got nan"),
        (dict(kl_coef=float("inf")), "--rl-kl-coef must be a finite number >= 0, got inf"),
        (dict(entropy_coef=-1e-3), "--rl-entropy-coef must be a finite number >= 0"),
        (dict(entropy_coef=float("nan")), "--rl-entropy-coef must be a finite number >= 0"),
        (dict(kl_estimator="k4"), "--rl-kl-estimator 'k4' is unknown; choose k1, k2 or k3"),
        # No --load in RunConfig(): a reference policy needs a checkpoint to start from.
        (dict(kl_coef=0.1), "--rl-kl-coef 0.1 needs --load: the reference policy is the checkpoint"),
    ],
)
def test_validate_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ObjectiveConfig(**changes).validate(RunConfig())


def test_reference_flags():
    config = parse("--rl-kl-coef", "0.05", "--rl-kl-estimator", "k2", "--rl-entropy-coef", "0.01")
    assert (config.kl_coef, config.kl_estimator, config.entropy_coef) == (0.05, "k2", 0.01)
    assert config.uses_reference
    run = RunConfig()
    config.validate(run.replace(checkpoint=dataclasses.replace(run.checkpoint, load="/ckpt/cold")))
    assert not parse().uses_reference and parse().kl_estimator == "k3"
    with pytest.raises(SystemExit):
        parse("--rl-kl-estimator", "k4")


def test_registry_matches_config_table():
    assert set(OBJECTIVES) == set(OBJECTIVE_DEFAULTS)
    assert get_objective("minirl") is minirl


def test_unknown_objective_lists_choices():
    with pytest.raises(ValueError, match="unknown objective 'minrl'; choose one of minirl, minirl_no_is"):
        get_objective("minrl")


def test_user_objective_by_import_path():
    config = ObjectiveConfig(objective="loss_batches:custom_objective")
    config.validate(RunConfig())
    lp = torch.tensor([-1.0, -2.0, -4.0], requires_grad=True)
    from megatron_rl.loss import LossInputs

    inputs = LossInputs(
        logprobs=lp, old_logprobs=lp.detach(), rollout_logprobs=lp.detach(),
        advantages=torch.ones(3), loss_mask=torch.tensor([True, True, False]),
        sample_ids=torch.tensor([0, 0, 0]), num_samples=1, response_lengths=torch.tensor([2]),
        global_num_samples=1, global_num_tokens=2,
    )
    out = compute_loss(inputs, config)
    assert float(out.loss.detach()) == pytest.approx(-(-1.0 - 2.0) / 2)
    # The shared statistics come for free around a user objective.
    assert "mismatch/kl" in out.stats and "train/loss" in out.stats


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("loss_batches:missing", "'loss_batches' has no attribute 'missing'"),
        ("loss_batches:GARBAGE", "is a Tensor, not a callable"),
        ("loss_batches:", "is not of the form"),
    ],
)
def test_bad_import_paths(path, message):
    with pytest.raises(ValueError, match=message):
        get_objective(path)
