"""The README documents every objective and exactly the metrics the code emits."""

from __future__ import annotations

import pathlib
import re

import torch
from loss_batches import make_batch, run_split, split

from megatron_rl.advantages import group_mean, rollout_stats
from megatron_rl.loss import METRICS, OBJECTIVES, ObjectiveConfig, derived_metrics
from megatron_rl.metrics.stats import merge_stats, results

DOC = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _objective_metrics_section() -> str:
    """The metric table of the README's Objectives section (the loop has its own)."""
    text = DOC.read_text()
    objectives = text[text.index("\n## Objectives"):]
    objectives = objectives[: objectives.index("\n## ", 1)]
    return objectives[objectives.index("\n### Metrics"):]


def _documented_metrics() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+/[a-z0-9_]+)` \| (.+) \|$", _objective_metrics_section(),
                      re.M)
    return {name: text.replace("\\|", "|") for name, text in rows}


def _emitted_metrics() -> set[str]:
    names: set[str] = set()
    lengths = [3, 4, 2]
    batch = make_batch(-torch.rand(sum(lengths), dtype=torch.float64), lengths)
    configs = [ObjectiveConfig(objective=objective) for objective in OBJECTIVES]
    configs.append(ObjectiveConfig(kl_coef=0.1, entropy_coef=0.01))  # the reference terms
    for config in configs:
        _, stats = run_split(batch, split(batch, "whole"), -torch.rand(9, dtype=torch.float64),
                             config)
        reduced = results(merge_stats(stats))
        names |= set(reduced) | set(derived_metrics(reduced))
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    rollout = results(rollout_stats(rewards, groups, group_mean(rewards, groups), torch.tensor([3, 4, 2, 5])))
    return names | set(rollout) | set(derived_metrics(rollout))


def test_metric_table_matches_code():
    documented = _documented_metrics()
    assert documented == METRICS
    assert _emitted_metrics() == set(METRICS)


def test_required_names_exist():
    for name in ("train/clipfrac", "train/entropy", "train/staleness_kl", "mismatch/kl",
                 "mismatch/kl_k3", "rollout/reward_mean"):
        assert name in _emitted_metrics()


def test_every_objective_documented():
    text = DOC.read_text()
    for name in OBJECTIVES:
        assert f"| `{name}`" in text, name
