"""Grid expansion and the commands each run gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.study.grid import Config, GridError, RunSpec, configs_of, expand, parse_grid
from megatron_rl.study.settings import SettingsError, StudySettings, coldstart_args, run_args


def _pairs(args: list[str]) -> dict[str, str | None]:
    """flag -> value (None for a flag without one); a later flag wins, as in argparse."""
    out: dict[str, str | None] = {}
    for i, token in enumerate(args):
        if token.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[token] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _flag(args: list[str], name: str) -> str | None:
    return _pairs(args)[name]


def test_missing_keys_take_every_value():
    configs = parse_grid("objectives=minirl")
    assert len(configs) == 4 * 3
    assert {c.n for c in configs} == {1, 2, 4, 8}
    assert {c.replay for c in configs} == {"none", "r2", "r3"}
    assert len(parse_grid("")) == 4 * 4 * 3


def test_product_and_union_without_repeats():
    sweep = parse_grid("objectives=minirl n=1,4 replay=none,r2,r3")
    ablation = parse_grid("objectives=minirl,minirl_no_is,grpo n=1 replay=none")
    specs = expand([sweep, ablation], seeds=[2, 1])
    configs = configs_of(specs)
    # minirl n=1 none is in both products and runs once per seed.
    assert len(configs) == 6 + 2
    assert len(specs) == 2 * len(configs)
    assert len({s.name for s in specs}) == len(specs)
    # Seed first: a half-done study holds every configuration of the first seed.
    assert [s.seed for s in specs[: len(configs)]] == [2] * len(configs)
    assert specs[0].name == "minirl_n1_none_s2"


@pytest.mark.parametrize("text, fragment", [
    ("objectives=ppo", "not one of"),
    ("n=3", "not one of"),
    ("n=x", "valid int"),
    ("replay=r4", "not one of"),
    ("n=1 n=2", "twice"),
    ("objective minirl", "expected"),
    ("n=", "empty"),
])
def test_bad_grids_are_refused(text, fragment):
    with pytest.raises(GridError, match=fragment):
        parse_grid(text)


def test_seeds_must_be_distinct_and_present():
    grid = parse_grid("objectives=minirl n=1 replay=none")
    with pytest.raises(GridError):
        expand([grid], seeds=[])
    with pytest.raises(GridError):
        expand([grid], seeds=[1, 1])


def test_off_policiness_grows_the_rollout_batch_at_a_fixed_budget_of_updates():
    s = StudySettings(prompts_per_update=4, group_size=8, updates=16, eval_every=8)
    cold, out = Path("/c"), Path("/o")
    args = {n: run_args(s, RunSpec(Config("minirl", n, "r2"), 7), cold, out) for n in (1, 4)}
    for n, a in args.items():
        assert _flag(a, "--rl-mini-batch-size") == "32"
        assert _flag(a, "--global-batch-size") == str(32 * n)
        assert _flag(a, "--train-iters") == str(16 // n)
        assert _flag(a, "--eval-interval") == str(8 // n)
        assert _flag(a, "--routing-replay") == "r2"
        assert _flag(a, "--seed") == _flag(a, "--rl-rollout-seed") == "7"
        assert _flag(a, "--rl-rollout-dtype") == "bf16"
        assert _flag(a, "--rl-rollout-quantization") == "none"
    # Nothing but N's own flags differs between the two runs (nothing tuned per run).
    pairs = {n: _pairs(a) for n, a in args.items()}
    assert pairs[1].keys() == pairs[4].keys()
    differing = {k for k in pairs[1] if pairs[1][k] != pairs[4][k]}
    assert differing == {"--global-batch-size", "--train-iters", "--eval-interval",
                         "--save-interval"}


def test_extra_flags_reach_every_run_last():
    s = StudySettings(extra_args=("--rl-is-cap", "2"))
    a = run_args(s, RunSpec(Config("grpo", 1, "none"), 1), Path("/c"), Path("/o"))
    assert a[-2:] == ["--rl-is-cap", "2"]


def test_a_cold_start_can_stop_early_on_a_longer_schedule():
    full = coldstart_args(StudySettings(coldstart_iters=800), Path("/c"))
    early = coldstart_args(StudySettings(coldstart_iters=650, coldstart_decay_iters=800),
                           Path("/c"))
    assert _flag(full, "--lr-decay-iters") == _flag(early, "--lr-decay-iters") == "800"
    assert (_flag(full, "--train-iters"), _flag(early, "--train-iters")) == ("800", "650")
    # Same data, seed and schedule otherwise: step 650 of the full run, stopped there.
    differing = {k for k, v in _pairs(full).items() if _pairs(early)[k] != v}
    assert differing == {"--train-iters", "--eval-interval", "--save-interval"}


@pytest.mark.parametrize("fields, ns", [
    ({"coldstart_iters": 800, "coldstart_decay_iters": 600}, [1]),
    ({"eval_samples": -1}, [1]),
    ({"updates": 6}, [1, 4]),
    ({"eval_every": 2}, [4]),
    ({"group_size": 1}, [1]),
    ({"micro_batch_size": 24, "prompts_per_update": 4, "group_size": 8}, [1]),
])
def test_settings_that_do_not_fit_the_grid(fields, ns):
    with pytest.raises(SettingsError):
        StudySettings(**fields).validate(ns)


def test_default_settings_fit_the_full_grid():
    StudySettings().validate([1, 2, 4, 8])
