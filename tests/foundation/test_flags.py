"""Flags map onto config dataclasses; bad values and combinations are refused clearly."""

import pytest

from megatron_rl.arguments import build_parser, parse_args
from megatron_rl.config.flags import ConfigError


def test_megatron_flag_names_exist():
    text = build_parser().format_help()
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--expert-model-parallel-size", "--context-parallel-size",
                 "--sequence-parallel", "--num-layers", "--hidden-size", "--ffn-hidden-size",
                 "--num-attention-heads", "--num-query-groups", "--num-experts",
                 "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-layer-freq",
                 "--moe-token-dispatcher-type", "--seq-length", "--micro-batch-size",
                 "--global-batch-size", "--lr", "--min-lr", "--lr-warmup-iters",
                 "--weight-decay", "--clip-grad", "--bf16", "--seed", "--load", "--save",
                 "--save-interval", "--train-iters", "--tensorboard-dir", "--wandb-project",
                 "--wandb-exp-name"):
        assert flag in text, flag


def test_help_comes_from_field_docstrings():
    text = build_parser().format_help()
    assert "Experts per token." in text


def test_preset_then_overrides():
    run = parse_args(["--model-preset", "qwen3-30b-a3b", "--num-layers", "8",
                      "--moe-layer-freq", "1", "--expert-model-parallel-size", "8"], world_size=8)
    assert run.model.num_layers == 8
    assert run.model.num_experts == 128 and run.model.moe_router_topk == 8
    assert run.parallel.expert_model_parallel_size == 8


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 3,
         "world size 3 is not divisible by TP x PP x CP"),
        (["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
        (["--sequence-parallel"], 1, "needs --tensor-model-parallel-size > 1"),
        (["--expert-model-parallel-size", "3"], 3, "--num-experts 16 is not divisible"),
        (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible"),
        (["--moe-router-topk", "17"], 1, "--moe-router-topk 17 must be between 1"),
        (["--moe-layer-freq", "[0,1]"], 1, "must list 4 values"),
        (["--num-attention-heads", "5"], 1, "is not a multiple of --num-query-groups"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"], 1,
         "--global-batch-size 10 is not divisible"),
        (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr"),
        (["--model-preset", "nope"], 1, "--model-preset 'nope' is unknown"),
        (["--context-parallel-size", "2"], 2, "context-parallel-size > 1 needs Transformer Engine"),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
          "3"], 2, "not divisible by --num-layers-per-virtual-pipeline-stage"),
        (["--rl-task-config", "{bad"], 1, "--rl-task-config is not valid JSON"),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--vocab-size", "127"], 2,
         "--vocab-size 127 is not divisible by --tensor-model-parallel-size 2"),
    ],
)
def test_bad_flags_are_refused_with_one_clear_message(argv, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_args(argv, world_size=world)


def test_unknown_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--moe-token-dispatcher-type", "magic"], world_size=1)
    assert "invalid choice" in capsys.readouterr().err


def test_entry_point_reports_config_errors(capsys):
    import pretrain_rl

    assert pretrain_rl.main(["--tensor-model-parallel-size", "2"]) == 2
    assert "world size 1 is not divisible by TP x PP x CP" in capsys.readouterr().err


def test_no_two_flags_share_an_argparse_slot():
    parser = build_parser()
    dests: dict[str, str] = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--no-") or option in ("-h", "--help"):
                continue  # BooleanOptionalAction's negation shares its flag's slot
            assert action.dest not in dests, f"{option} and {dests[action.dest]} share {action.dest}"
            dests[action.dest] = option
    # Fields called alike in two components stay apart.
    assert dests["training.seed"] == "--seed" and dests["rollout.seed"] == "--rl-rollout-seed"
    assert dests["logging.progress"] == "--progress"
    assert dests["rollout.progress"] == "--rl-rollout-progress"


def test_same_named_fields_of_two_components_do_not_set_each_other():
    run = parse_args(["--rl-rollout-seed", "9", "--no-rl-rollout-progress"], world_size=1)
    assert run.rollout.seed == 9 and run.training.seed == 1234
    assert run.rollout.progress is False and run.logging.progress is True
    run = parse_args(["--seed", "7", "--no-progress"], world_size=1)
    assert run.training.seed == 7 and run.rollout.seed == 1234
    assert run.logging.progress is False and run.rollout.progress is True


def test_rl_fields_drop_the_prefix_but_keep_the_flag():
    run = parse_args(["--rl-group-size", "4", "--global-batch-size", "16", "--rl-objective",
                      "grpo", "--rl-task", "chain_sum", "--sft-teacher",
                      "megatron_rl.data.teachers:hedging_teacher"], world_size=1)
    assert run.rl.group_size == 4 and run.objective.objective == "grpo"
    assert run.task.task == "chain_sum"
    assert run.task.sft_teacher == "megatron_rl.data.teachers:hedging_teacher"
