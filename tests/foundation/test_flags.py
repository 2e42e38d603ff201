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
