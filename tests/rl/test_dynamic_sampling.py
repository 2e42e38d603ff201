"""Dynamic sampling (--rl-filter-groups): the filter rule, the rounds, the exact batch size,
the data position and the metrics, with fake generation; multi-rank agreement with one
thread per data-parallel rank."""

from __future__ import annotations

import threading

import pytest
import torch

from megatron_rl.arguments import parse_args
from megatron_rl.config.flags import ConfigError
from megatron_rl.data.tasks import TaskItem
from megatron_rl.rollout.types import RolloutSample
from megatron_rl.training.dynamic_sampling import (
    DynamicSampler,
    DynamicSamplingConfig,
    GroupPool,
    plan_extra_prompts,
    rewards_differ,
)

G = 4


def _sample(prompt: int, j: int, reward: float) -> RolloutSample:
    return RolloutSample(prompt_index=prompt, sample_index=j, prompt_ids=[1, 2],
                         response_ids=[3], rollout_logprobs=torch.zeros(1), reward=reward)


def _group(prompt: int, rewards: list[float]) -> list[RolloutSample]:
    return [_sample(prompt, j, r) for j, r in enumerate(rewards)]


class Stream:
    """A task stream whose item k yields a mixed group iff k is in ``useful``."""

    def __init__(self, useful: set[int]):
        self.useful = useful
        self.position = 0
        self.generated: list[list[int]] = []  # item indices of each generate() call
        self.lock = threading.Lock()

    def draw(self, count: int) -> list[TaskItem]:
        items = [TaskItem(index=k, prompt=f"q{k}", answer="1", entry={})
                 for k in range(self.position, self.position + count)]
        self.position += count
        return items

    def generate(self, items: dict[int, TaskItem]) -> list[RolloutSample]:
        with self.lock:
            self.generated.append([item.index for item in items.values()])
        out = []
        for p, item in sorted(items.items()):
            rewards = [1.0, 0.0, 0.0, 1.0] if item.index in self.useful else [0.0] * G
            # The server returns samples in any order.
            out += reversed(_group(p, rewards))
        return out


def _run(stream: Stream, rounds: int, prompts: int = 4, rule: str | None = None):
    config = DynamicSamplingConfig(filter_groups=True, max_sampling_rounds=rounds,
                                   group_filter=rule)
    first = dict(enumerate(stream.draw(prompts)))
    return DynamicSampler(config, G).sample(
        first, need=prompts, prompts_per_step=prompts, dp_rank=0, dp_size=1, is_leader=True,
        generate=stream.generate, draw=stream.draw, exchange=lambda x: [x])


def test_default_rule_keeps_groups_whose_rewards_differ():
    assert rewards_differ(_group(0, [0.0, 0.0, 1.0, 0.0]))
    assert not rewards_differ(_group(0, [1.0] * 4))
    assert not rewards_differ(_group(0, [0.25] * 4))
    with pytest.raises(ValueError, match="group of prompt 3 has unscored samples"):
        rewards_differ([_sample(3, 0, 1.0), _sample(3, 1, None)])


def test_plan_draws_shortfall_over_keep_rate_within_a_share():
    # Half the groups kept so far: twice the shortfall, capped at a rank's share (8).
    assert plan_extra_prompts([3, 0, 5], 8, kept=10, judged=20) == [6, 0, 8]
    # Nothing kept yet: a whole share; everything kept: the shortfall itself.
    assert plan_extra_prompts([1, 2], 8, kept=0, judged=16) == [8, 8]
    assert plan_extra_prompts([1, 2], 8, kept=16, judged=16) == [1, 2]


def test_rounds_refill_the_batch_to_its_exact_size_with_useful_groups():
    stream = Stream(useful={0, 2, 5, 6, 7, 9})
    result = _run(stream, rounds=4)
    samples = result.samples
    assert len(samples) == 4 * G
    groups = [samples[i:i + G] for i in range(0, len(samples), G)]
    assert all(rewards_differ(g) for g in groups)
    assert all(len({s.prompt_index for s in g}) == 1 for g in groups)
    assert [[s.sample_index for s in g] for g in groups] == [[0, 1, 2, 3]] * 4
    # Round 1: items 0-3 keep 2 (rate 1/2) -> 2 / (1/2) = 4 more: items 4-7 keep 5, 6, 7;
    # the surplus (7) is left out, the batch keeps draw order.
    assert stream.generated == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert stream.position == 8  # the data position moves past every prompt drawn
    assert sorted({s.prompt_index for s in samples}) == [0, 2, 5, 6]
    assert result.scalars == {"dynamic_sampling/rounds": 2.0,
                              "dynamic_sampling/extra_prompts": 4.0,
                              "dynamic_sampling/extra_samples": 16.0}
    stats = {k: v.result() for k, v in result.stats.items()}
    assert stats["dynamic_sampling/groups_kept"] == 4
    assert stats["dynamic_sampling/groups_dropped"] == 3  # items 1, 3, 4
    assert stats["dynamic_sampling/groups_filled"] == 0
    assert stats["dynamic_sampling/groups_unused"] == 1
    assert stats["dynamic_sampling/generated_reward_mean"] == pytest.approx(10 / 32)
    assert stats["dynamic_sampling/generated_correct_frac"] == pytest.approx(10 / 32)


def test_rounds_run_out_and_dropped_groups_fill_the_batch(caplog):
    stream = Stream(useful={1})
    result = _run(stream, rounds=2)
    # Round 2 drew a whole share (rate 1/4 -> 3 / (1/4) = 12, capped at 4).
    assert stream.generated == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(result.samples) == 4 * G
    # Kept group 1, then the earliest dropped (0, 2, 3), in draw order.
    assert [s.prompt_index for s in result.samples[::G]] == [0, 1, 2, 3]
    stats = {k: v.result() for k, v in result.stats.items()}
    assert (stats["dynamic_sampling/groups_kept"], stats["dynamic_sampling/groups_filled"],
            stats["dynamic_sampling/groups_dropped"]) == (1, 3, 7)
    assert "3 dropped groups fill the batch" in caplog.text


def test_one_round_only_filters_and_fills():
    stream = Stream(useful=set())
    result = _run(stream, rounds=1)
    assert stream.position == 4 and result.scalars["dynamic_sampling/extra_prompts"] == 0
    assert result.stats["dynamic_sampling/groups_filled"].result() == 4


def keep_first_prompt(samples, item):
    return item.index == 0


def not_a_bool(samples, item):
    return 1


def test_user_filter_replaces_the_rule_and_must_answer_a_bool():
    here = f"{__name__}:keep_first_prompt"
    stream = Stream(useful={0, 1, 2, 3})
    result = _run(stream, rounds=1, rule=here)
    stats = {k: v.result() for k, v in result.stats.items()}
    assert stats["dynamic_sampling/groups_kept"] == 1
    with pytest.raises(TypeError, match=r"--rl-group-filter .*:not_a_bool returned 1 \(int\) "
                                        r"for prompt 0 \('q0'\); it must return a bool"):
        _run(Stream(useful=set()), rounds=1, rule=f"{__name__}:not_a_bool")


# --micro-batch-size has no default (as in Megatron-LM).
MBS = ["--micro-batch-size", "4"]


def test_flags_and_refusals():
    run = parse_args([*MBS, "--rl-filter-groups", "--rl-max-sampling-rounds", "3",
                      "--rl-group-filter", f"{__name__}:keep_first_prompt"], world_size=1)
    assert run.sampling == DynamicSamplingConfig(
        filter_groups=True, max_sampling_rounds=3, group_filter=f"{__name__}:keep_first_prompt")
    assert run.sampling.max_prompts_per_step(4) == 12
    assert parse_args(MBS, world_size=1).sampling.max_prompts_per_step(4) == 4
    with pytest.raises(ConfigError, match="--rl-max-sampling-rounds 0: must be at least 1"):
        parse_args([*MBS, "--rl-filter-groups", "--rl-max-sampling-rounds", "0"], world_size=1)
    with pytest.raises(ConfigError, match="--rl-group-filter .* needs --rl-filter-groups"):
        parse_args([*MBS, "--rl-group-filter", f"{__name__}:keep_first_prompt"], world_size=1)
    with pytest.raises(ConfigError, match="--rl-group-filter 'nowhere:f': cannot import"):
        parse_args([*MBS, "--rl-filter-groups", "--rl-group-filter", "nowhere:f"], world_size=1)


def test_pool_refuses_to_make_a_smaller_batch():
    pool = GroupPool(need=2, kept=[_group(0, [0.0, 1.0, 0.0, 0.0])])
    with pytest.raises(RuntimeError, match="1 kept and 0 dropped groups cannot make 2"):
        pool.batch(G)
    pool = GroupPool(need=1, kept=[_group(0, [0.0, 1.0, 0.0])])
    with pytest.raises(RuntimeError, match="3 samples in 1 groups, not 1 groups of 4"):
        pool.batch(G)


def test_data_parallel_ranks_draw_alike_and_generate_disjoint_prompts():
    """Two ranks (threads) with a real all-gather between them: both move the data
    position alike; each generates only its own prompts; both fill their share."""
    dp = 2
    barrier = threading.Barrier(dp)
    board: list = [None] * dp

    def exchange_for(rank):
        def exchange(value):
            board[rank] = value
            barrier.wait()
            seen = list(board)
            barrier.wait()
            return seen
        return exchange

    # Rank 0's first prompts (0, 2) are useful, rank 1's (1, 3) are not.
    useful = {0, 2, 5, 6, 8, 9}
    streams = [Stream(useful) for _ in range(dp)]
    results: list = [None] * dp
    config = DynamicSamplingConfig(filter_groups=True, max_sampling_rounds=3)

    def rank_main(rank):
        s = streams[rank]
        first = {i: item for i, item in enumerate(s.draw(4)) if i % dp == rank}
        results[rank] = DynamicSampler(config, G).sample(
            first, need=2, prompts_per_step=4, dp_rank=rank, dp_size=dp, is_leader=True,
            generate=s.generate, draw=s.draw, exchange=exchange_for(rank))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(dp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    # Round 2: rate 2/4, rank 1 short by 2 -> draws 4, capped at its share 2: items 4, 5.
    # Round 3: rate 3/6, rank 1 short by 1 -> 2 (items 6, 7); 6 is kept.
    assert streams[0].generated == [[0, 2]]
    assert streams[1].generated == [[1, 3], [4, 5], [6, 7]]
    assert streams[0].position == streams[1].position == 8
    assert [r.scalars for r in results] == [results[0].scalars] * dp
    assert results[0].scalars["dynamic_sampling/rounds"] == 3
    for r in results:
        assert len(r.samples) == 2 * G
        assert all(rewards_differ(r.samples[i:i + G]) for i in range(0, 2 * G, G))
    prompt_ids = [{s.prompt_index for s in r.samples} for r in results]
    assert prompt_ids == [{0, 2}, {5, 6}]


@pytest.mark.slow
def test_filtered_run_trains_full_batches_of_useful_groups(coldstart, tmp_path):
    """A real run (embedded server, one trainer): every step's batch holds exactly B groups
    of G, every group that passed the filter has differing rewards (zero-advantage groups
    are exactly the ones filled in after the rounds ran out), and the rounds show."""
    from rl_fixtures import TINY_RL, launch, read_metrics, steps

    save = tmp_path / "filtered"
    launch(1, TINY_RL + ["--train-iters", "2", "--load", str(coldstart), "--save", str(save),
                         "--rl-filter-groups", "--rl-max-sampling-rounds", "3",
                         "--rl-reward-function", "tests.rl.filter_support:reward"])
    rows = steps(read_metrics(save))
    assert sorted(rows) == [1, 2]
    for step, row in rows.items():
        kept, filled = row["dynamic_sampling/groups_kept"], row["dynamic_sampling/groups_filled"]
        assert row["rollout/num_samples"] == 16, step
        assert kept + filled == 4, step
        # group_mean gives 0 exactly to equal rewards and never to differing ones.
        assert row["rollout/zero_adv_group_frac"] * 4 == pytest.approx(filled), step
        # Every batch starts with an even (never varying) item: a second round follows.
        assert row["dynamic_sampling/groups_dropped"] >= 1, step
        assert 2 <= row["dynamic_sampling/rounds"] <= 3, step
        assert row["dynamic_sampling/extra_prompts"] >= 1, step
        assert row["dynamic_sampling/extra_samples"] == 4 * row["dynamic_sampling/extra_prompts"]
        if row["dynamic_sampling/rounds"] < 3:
            assert filled == 0, step
        assert 0.0 <= row["dynamic_sampling/generated_reward_mean"] <= 1.0


def test_the_study_tool_passes_the_flags_to_every_run(tmp_path):
    """tools/study.py ... -- --rl-filter-groups ...: each RL run's command carries them, and
    pretrain_rl.py's parser accepts that command."""
    import importlib.util
    from pathlib import Path

    from megatron_rl.study.settings import run_args

    path = Path(__file__).resolve().parents[2] / "tools" / "study.py"
    spec = importlib.util.spec_from_file_location("study_tool", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    extra = ["--rl-filter-groups", "--rl-max-sampling-rounds", "3"]
    _, settings, specs = study.parse(["--out", str(tmp_path), "--grid",
                                      "objectives=minirl n=1 replay=r3", "--", *extra])
    args = run_args(settings, specs[0], tmp_path / "cold", tmp_path / "run")
    assert args[-3:] == extra
    run = parse_args(args, world_size=1)
    assert (run.sampling.filter_groups, run.sampling.max_sampling_rounds) == (True, 3)
