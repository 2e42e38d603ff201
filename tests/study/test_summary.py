"""Per-run figures, seed aggregation and plots, on hand-made metrics files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_rl.study.grid import Config, RunSpec
from megatron_rl.study.plots import line_styles, plot_study, seed_band, smooth
from megatron_rl.study.summary import (
    RunSummary,
    load_metrics,
    markdown_table,
    summarize,
    write_csv,
)


def write_run(directory: Path, rewards: list[float], accuracy: dict[int, float],
              extra: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "eval/accuracy": accuracy[0]}]
    for step, reward in enumerate(rewards, 1):
        row = {"step": step, "rollout/reward_mean": reward, "train/entropy": 0.5,
               "mismatch/kl": 1e-3, "mismatch/router_agreement": 0.98, "time/step": 2.0}
        if step in accuracy:
            row.update({"eval/accuracy": accuracy[step], "time/eval": 1.0, "time/step": 3.0})
        lines.append({**row, **(extra or {})})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return directory


def test_resumed_steps_keep_their_last_row_and_cut_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 1, "a": 3}\n{"step": 2')
    assert [(r["step"], r["a"]) for r in load_metrics(path)] == [(0, 1), (1, 3)]


def test_run_figures_are_counted_in_gradient_updates(tmp_path):
    spec = RunSpec(Config("minirl", 2, "r3"), 1)
    rows = load_metrics(write_run(tmp_path / "r", [0.2, 0.4, 0.6, 0.8],
                                  {0: 0.5, 2: 0.6, 4: 0.7}) / "metrics.jsonl")
    s = RunSummary.from_rows(spec, rows, tail=0.25)
    assert (s.steps, s.updates) == (4, 8)
    assert (s.initial_accuracy, s.final_accuracy, s.best_accuracy) == (0.5, 0.7, 0.7)
    assert s.reward_last == pytest.approx(0.8)  # updates 7-8: the last step only
    assert s.step_s == pytest.approx(2.0)  # evaluation time left out
    assert math.isnan(s.replay_fidelity)
    assert not s.collapsed


@pytest.mark.parametrize("rewards, accuracy, collapsed", [
    ([0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], {0: 0.8, 8: 0.78}, False),
    ([0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.2, 0.1], {0: 0.8, 8: 0.78}, True),   # reward halves
    ([0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], {0: 0.8, 8: 0.3}, True),    # accuracy halves
    ([0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.0, 0.0], {0: 0.04, 8: 0.0}, False),  # too small
])
def test_collapse_indicator(tmp_path, rewards, accuracy, collapsed):
    spec = RunSpec(Config("minirl_no_is", 1, "none"), 1)
    rows = load_metrics(write_run(tmp_path / "r", rewards, accuracy) / "metrics.jsonl")
    assert RunSummary.from_rows(spec, rows).collapsed is collapsed


@pytest.mark.parametrize("sampled, collapsed", [
    ({0: 0.40, 4: 0.45, 8: 0.50}, False),
    ({0: 0.40, 4: 0.45, 8: 0.15}, True),   # the sampled accuracy falls below half its best
])
def test_sampled_accuracy_figures_and_collapse(tmp_path, sampled, collapsed):
    spec = RunSpec(Config("minirl", 1, "none"), 1)
    write_run(tmp_path / "r", [0.4] * 8, {0: 0.6, 4: 0.6, 8: 0.6})
    path = tmp_path / "r" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["step"] in sampled:
            row["eval/sampled_accuracy"] = sampled[row["step"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = RunSummary.from_rows(spec, load_metrics(path))
    assert (s.initial_sampled_accuracy, s.final_sampled_accuracy) == (0.40, sampled[8])
    assert s.collapsed is collapsed


@pytest.mark.parametrize("late_kl, collapsed", [
    (4e-3, False),    # within the stable runs' range
    (8e-3, False),    # 8x the start, but below the floor
    (5e-2, True),     # 50x the start and above the floor
])
def test_a_training_inference_kl_blow_up_counts_as_a_collapse(tmp_path, late_kl, collapsed):
    spec = RunSpec(Config("minirl_no_is", 1, "none"), 1)
    write_run(tmp_path / "r", [0.6] * 8, {0: 0.8, 8: 0.8})
    path = tmp_path / "r" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["step"] >= 7:
            row["mismatch/kl"] = late_kl
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = RunSummary.from_rows(spec, load_metrics(path))
    assert s.collapsed is collapsed
    assert s.collapse_reason == ("kl" if collapsed else "")


def test_seeds_are_averaged_per_configuration_and_written(tmp_path):
    runs = []
    for seed, acc in ((1, 0.6), (2, 0.8)):
        spec = RunSpec(Config("minirl", 1, "r2"), seed)
        runs.append((spec, write_run(tmp_path / spec.name, [0.5] * 4, {0: 0.7, 4: acc},
                                     {"replay/fidelity": 1.0})))
    lonely = RunSpec(Config("grpo", 1, "none"), 1)
    runs.append((lonely, write_run(tmp_path / lonely.name, [0.5] * 4, {0: 0.7, 4: 0.7})))
    runs.append((RunSpec(Config("grpo", 4, "none"), 1), tmp_path / "never_ran"))
    summaries = summarize(runs)
    assert [s.config.name for s in summaries] == ["minirl_n1_r2", "grpo_n1_none"]
    both = summaries[0]
    assert both.mean["final_accuracy"] == pytest.approx(0.7)
    assert both.std["final_accuracy"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(summaries[1].std["final_accuracy"])  # one seed: no spread
    table = markdown_table(summaries)
    assert "| minirl | 1 | r2 | 2 | 0.700 ± 0.000 | 0.700 ± 0.141 |" in table
    assert "| grpo | 1 | none | 1 | 0.700 | 0.700 |" in table
    write_csv(summaries, tmp_path / "s.csv")
    header, first = (tmp_path / "s.csv").read_text().splitlines()[:2]
    assert header.startswith("objective,n,replay,seeds,collapsed,initial_accuracy_mean")
    assert first.startswith("minirl,1,r2,2,0,")


def test_plots_have_a_panel_per_n(tmp_path):
    runs = []
    for n in (1, 2):
        for seed in (1, 2):
            spec = RunSpec(Config("minirl", n, "r3"), seed)
            runs.append((spec, write_run(tmp_path / spec.name, [0.4, 0.5], {0: 0.5, 2: 0.6},
                                         {"replay/fidelity": 1.0})))
    written = plot_study(runs, tmp_path / "plots")
    names = {p.name for p in written}
    assert "overview.png" in names and "replay_fidelity.png" in names
    assert len(names) == 7
    from PIL import Image

    width, height = Image.open(tmp_path / "plots" / "eval_accuracy.png").size
    assert width > height  # two panels side by side


def test_plots_can_have_a_panel_per_replay_mode(tmp_path):
    runs = []
    for objective in ("minirl", "grpo"):
        for replay in ("none", "r2", "r3"):
            spec = RunSpec(Config(objective, 8, replay), 1)
            extra = {"replay/fidelity": 1.0} if replay != "none" else {}
            runs.append((spec, write_run(tmp_path / spec.name, [0.4, 0.5], {0: 0.5, 2: 0.6},
                                         extra)))
    from PIL import Image

    by_n = plot_study(runs, tmp_path / "by_n")
    by_replay = plot_study(runs, tmp_path / "by_replay", panels="replay")
    assert {p.name for p in by_replay} == {p.name for p in by_n}
    # One N: one panel; three replay modes: three panels side by side.
    one = Image.open(tmp_path / "by_n" / "eval_accuracy.png").size
    three = Image.open(tmp_path / "by_replay" / "eval_accuracy.png").size
    assert three[1] == one[1] and three[0] > 2.5 * one[0]


def test_many_lines_are_keyed_by_colour_and_style(tmp_path):
    """A panel per N holding objectives x replay modes: the colour says the objective, the
    line style the replay mode, one key names them; one varying key: a colour a line."""
    grid = [Config(o, n, r) for o in ("minirl", "grpo") for n in (1, 8)
            for r in ("none", "r2", "r3")]
    styles, key = line_styles(grid, "n")
    assert len(set(styles.values())) == len(grid) // 2  # N is the panel, not a style
    for a in grid:
        for b in grid:
            assert (styles[a][0] == styles[b][0]) == (a.objective == b.objective)
            assert (styles[a][1] == styles[b][1]) == (a.replay == b.replay)
    assert [name for name, _, _ in key] == ["minirl", "grpo", "no replay", "R2", "R3"]
    by_replay, key = line_styles(grid, "replay")  # the other key is N
    assert [name for name, _, _ in key][2:] == ["N = 1", "N = 8"]
    assert by_replay[Config("grpo", 8, "r2")][1] == by_replay[Config("minirl", 8, "none")][1]

    panel = [Config("minirl", n, r) for n in (2, 8) for r in ("none", "r2", "r3")]
    styles, key = line_styles(panel, "n")
    assert key == [] and {s for _, s in styles.values()} == {"-"}
    assert len({c for c, _ in styles.values()}) == 3  # a colour per replay mode

    runs = []
    for config in grid:
        spec = RunSpec(config, 1)
        extra = {"replay/fidelity": 1.0} if config.replay != "none" else {}
        runs.append((spec, write_run(tmp_path / spec.name, [0.4, 0.5], {0: 0.5, 2: 0.6}, extra)))
    written = {p.name for p in plot_study(runs, tmp_path / "plots")}
    assert "overview.png" in written and "eval_accuracy.png" in written


def test_smoothing_and_seed_band():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    xs, mean, low, high = seed_band([([1, 2, 3], [1.0, 2.0, 3.0]), ([1, 2], [3.0, 4.0])])
    assert (xs, mean, low, high) == ([1, 2], [2.0, 3.0], [1.0, 2.0], [3.0, 4.0])
