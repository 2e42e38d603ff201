"""pretrain_rl.py --dry-run: the plan of a launch, worked out without GPUs or process groups.

Its groups and per-rank parameter counts are held against what megatron-core's
parallel_state and GPTModel build for the same layouts (one torchrun launch of 4
processes, several layouts); the dry run itself runs in a fresh interpreter that must
not create a process group or touch CUDA.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from torchrun_launch import ROOT, WORKERS

from megatron_rl.arguments import RunConfig, parse_launch
from megatron_rl.config.flags import ConfigError
from megatron_rl.distributed import ParallelConfig, planned_world_size
from megatron_rl.model.config import PRESETS
from megatron_rl.plan import GROUPS, build_plan, param_count, rank_groups, render, stage_params
from megatron_rl.training.config import TrainingConfig

MBS = ["--micro-batch-size", "8"]  # required, as in Megatron-LM

WORLD = 4
# name: (ParallelConfig kwargs, build the model too); CP > 1 cannot build on CPU (local
# attention), its groups are still megatron-core's.
LAYOUTS = {
    "dp4": ({}, True),
    "tp2_ep2": ({"tensor_model_parallel_size": 2, "sequence_parallel": True,
                 "expert_model_parallel_size": 2}, True),
    "pp2_vpp2_ep2": ({"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2,
                      "num_layers_per_virtual_pipeline_stage": 1}, True),
    "tp2_etp1_ep4": ({"tensor_model_parallel_size": 2, "sequence_parallel": True,
                      "expert_tensor_parallel_size": 1, "expert_model_parallel_size": 4}, False),
    "cp2_tp2": ({"context_parallel_size": 2, "tensor_model_parallel_size": 2,
                 "sequence_parallel": True}, False),
}


@pytest.mark.slow
def test_plan_matches_megatron_core(torchrun, tmp_path):
    records = torchrun(WORKERS / "plan_groups.py", WORLD, ["--layouts", json.dumps(LAYOUTS)],
                       tmp_path)
    model = PRESETS["tiny"]
    for name, (kwargs, built) in LAYOUTS.items():
        parallel = ParallelConfig(**kwargs)
        groups = rank_groups(WORLD, parallel)
        stages = stage_params(model, parallel)
        for rank, record in enumerate(records):
            real = record[name]
            for group, _, _, _ in GROUPS:
                mine = next(g for g in groups[group] if rank in g)
                assert mine == real["groups"][group], (name, rank, group)
            if built:
                stage = real["groups"]["pp"].index(rank)
                assert stages[stage].total == real["params"], (name, rank)
                assert stages[stage].expert == real["expert"], (name, rank)
    # dp4 holds the whole model on every rank: the plan's total is the real model's.
    assert param_count(model).total == records[0]["dp4"]["params"] == 2_694_528
    assert param_count(model).expert == records[0]["dp4"]["expert"]


def test_plan_numbers_of_the_tiny_preset():
    m = PRESETS["tiny"]
    run = RunConfig(world_size=4, model=m, parallel=ParallelConfig(expert_model_parallel_size=2),
                    training=TrainingConfig(micro_batch_size=8))
    plan = build_plan(run)
    per_expert = 3 * m.hidden_size * m.moe_ffn_hidden_size
    dense = plan.params.total - plan.params.expert
    assert plan.params.expert == m.num_moe_layers * m.num_experts * per_expert
    assert plan.params.active_per_token == dense + m.num_moe_layers * m.moe_router_topk * per_expert
    # fp32, plain optimizer: 4 (weights) + 4 (fp32 grad buffer) + 8 (Adam moments) bytes.
    (mem,) = plan.memory
    (stage,) = plan.stages
    assert stage.expert == plan.params.expert // 2
    assert (mem.weights, mem.grads, mem.optimizer) == (4 * stage.total, 4 * stage.total,
                                                       8 * stage.total)
    # The distributed optimizer shards dense state over DP 4, expert state over expert-DP 2.
    assert mem.optimizer_other == 8 * (stage.dense // 4 + stage.expert // 2)
    # Routes: uint8 ids for 16 experts; 64 responses / DP 4 per rank, --seq-length - 1 rows.
    r = plan.routes
    assert r.itemsize == 1 and r.responses_per_dp_rank == 16
    assert r.leader_bytes == 16 * (m.seq_length - 1) * m.num_moe_layers * m.moe_router_topk
    assert plan.tokens.prompts == 8 and plan.tokens.responses == 64
    assert plan.tokens.generated_max == 64 * run.rollout.max_new_tokens
    assert mem.reference == 0


def test_plan_counts_the_reference_copy_and_the_sampling_rounds():
    from megatron_rl.loss import ObjectiveConfig
    from megatron_rl.training.dynamic_sampling import DynamicSamplingConfig

    m = PRESETS["tiny"]
    run = RunConfig(world_size=1, model=m, objective=ObjectiveConfig(kl_coef=0.1),
                    training=TrainingConfig(micro_batch_size=8),
                    sampling=DynamicSamplingConfig(filter_groups=True, max_sampling_rounds=3))
    plan = build_plan(run)
    (mem,) = plan.memory
    (stage,) = plan.stages
    assert mem.reference == 4 * stage.total  # a frozen fp32 copy, no grads, no Adam
    assert mem.total == 4 * stage.total + 4 * stage.total + 8 * stage.total + mem.reference
    assert plan.tokens.generated_max == 3 * 64 * run.rollout.max_new_tokens
    text = render(plan)
    assert "+ reference" in text and "--rl-max-sampling-rounds 3" in text


def test_world_size_from_the_launcher():
    assert planned_world_size(8, None, {"WORLD_SIZE": "2"}) == (8, "--world-size")
    assert planned_world_size(None, None, {"WORLD_SIZE": "2"}) == (2, "WORLD_SIZE")
    assert planned_world_size(None, 8, {"SLURM_NNODES": "4", "SLURM_NTASKS": "4"})[0] == 32
    assert planned_world_size(None, None, {"SLURM_NTASKS": "16"}) == (16, "SLURM_NTASKS")
    assert planned_world_size(None, None, {})[0] == 1
    with pytest.raises(ConfigError, match="SLURM_NTASKS='x' in the environment"):
        planned_world_size(None, None, {"SLURM_NTASKS": "x"})
    # A real run's --world-size must agree with the launcher.
    with pytest.raises(ConfigError, match="--world-size 4 but the launcher started 1"):
        parse_launch(MBS + ["--world-size", "4"])


def test_dry_run_entry_point_without_process_groups_or_cuda():
    code = (
        "import sys, torch, pretrain_rl\n"
        "rc = pretrain_rl.main(sys.argv[1:])\n"
        "import torch.distributed as dist\n"
        "assert not dist.is_initialized(), 'a process group was created'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised'\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_engine', 'apex', 'sglang')]\n"
        "assert not bad, bad\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(SLURM_NNODES="2", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    argv = ["--dry-run", "--nproc-per-node", "4", "--expert-model-parallel-size", "4",
            "--pipeline-model-parallel-size", "2", "--global-batch-size", "64",
            "--micro-batch-size", "2", "--rl-max-new-tokens", "64", "--bf16",
            "--use-distributed-optimizer"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "world size 8 (SLURM_NNODES 2 x --nproc-per-node 4)" in out
    assert "ep          [0,1,2,3] [4,5,6,7]" in out
    assert "pp          [0,4] [1,5] [2,6] [3,7]" in out
    assert "bf16 weights + fp32 master copy" in out and "distributed optimizer" in out
    assert "not estimated: activations" in out
    assert "parameters: total 2,694,528" in out
    assert elapsed < 60, f"dry run took {elapsed:.1f} s"


def test_dry_run_refuses_what_the_real_run_refuses(capsys):
    import pretrain_rl

    rc = pretrain_rl.main(MBS + ["--dry-run", "--world-size", "3", "--expert-model-parallel-size", "2"])
    assert rc == 2
    assert "world size 3 is not divisible by expert TP x EP x PP" in capsys.readouterr().err


def test_external_servers_refuse_random_weights(capsys, tmp_path):
    import pretrain_rl

    argv = ["--dry-run", "--rl-max-new-tokens", "64", "--rl-rollout-url", "http://10.0.0.5:30000"]
    assert pretrain_rl.main(MBS + argv) == 2
    err = capsys.readouterr().err
    assert "--rl-rollout-url but no checkpoint to start from" in err
    assert "--rl-allow-random-init" in err
    assert pretrain_rl.main(MBS + [*argv, "--rl-allow-random-init"]) == 0
    assert "1 server URL(s): http://10.0.0.5:30000" in capsys.readouterr().out
    # SFT never syncs weights to servers: no refusal.
    assert pretrain_rl.main(MBS + [*argv, "--stage", "sft", "--global-batch-size", "64"]) == 0


@pytest.mark.parametrize("colocate", [False, True])
def test_dry_run_says_where_the_embedded_server_runs(capsys, colocate):
    import pretrain_rl

    flags = ["--rl-rollout-colocate"] if colocate else []
    assert pretrain_rl.main(MBS + ["--dry-run", "--world-size", "1", "--rl-max-new-tokens",
                                   "64", *flags]) == 0
    out = capsys.readouterr().out
    expected = ("1 embedded CPU server (bf16) in rank 0's process (colocated)" if colocate
                else "1 embedded CPU server(s) (bf16)")
    assert expected in out
