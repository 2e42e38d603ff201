"""Flags map onto config dataclasses; bad values and combinations are refused clearly."""

import pytest

from megatron_rl.arguments import build_parser, parse_args
from megatron_rl.config.flags import ConfigError

MBS = ["--micro-batch-size", "8"]  # required, as in Megatron-LM


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
    run = parse_args(MBS + ["--model-preset", "qwen3-30b-a3b", "--num-layers", "8",
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
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
          "3"], 2, "not divisible by --num-layers-per-virtual-pipeline-stage"),
        (["--rl-task-config", "{bad"], 1, "--rl-task-config is not valid JSON"),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--vocab-size", "127"], 2,
         "--vocab-size 127 is not divisible by --tensor-model-parallel-size 2"),
        (["--stage", "sft", "--eval-samples", "4"], 1,
         "--eval-samples samples on the rollout servers, which only an RL run"),
        (["--eval-samples", "-1"], 1, "--eval-samples must be >= 0"),
        (["--rl-rollout-colocate", "--rl-rollout-url", "http://h:1"], 1,
         "--rl-rollout-colocate names external servers"),
        (["--rl-rollout-colocate", "--rl-rollout-num-servers", "2"], 1,
         "--rl-rollout-colocate asks for 2 servers"),
        (["--rl-rollout-colocate", "--rl-rollout-threads", "2"], 1,
         "--rl-rollout-colocate sets --rl-rollout-threads 2: a colocated server uses the "
         "trainer's torch threads"),
        (["--rl-rollout-colocate", "--rl-weight-sync", "distributed"], 1,
         "--rl-weight-sync distributed with --rl-rollout-colocate"),
    ],
)
def test_bad_flags_are_refused_with_one_clear_message(argv, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_args(MBS + argv, world_size=world)


def test_unknown_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(MBS + ["--moe-token-dispatcher-type", "magic"], world_size=1)
    assert "invalid choice" in capsys.readouterr().err


def test_entry_point_reports_config_errors(capsys):
    import pretrain_rl

    assert pretrain_rl.main(MBS + ["--tensor-model-parallel-size", "2"]) == 2
    assert "world size 1 is not divisible by TP x PP x CP" in capsys.readouterr().err


def test_no_two_flags_share_an_argparse_slot():
    parser = build_parser()
    dests: dict[str, str] = {}
    for action in parser._actions:
        # One action per slot: its other option strings (BooleanOptionalAction's --no-
        # negation, Megatron-LM's RL spellings) are the same flag.
        option = action.option_strings[0] if action.option_strings else None
        if option in (None, "-h", "--perform-rl-step"):
            continue  # --perform-rl-step is Megatron-LM's spelling of --stage rl
        assert action.dest not in dests, f"{option} and {dests[action.dest]} share {action.dest}"
        dests[action.dest] = option
    # Fields called alike in two components stay apart.
    assert dests["training.seed"] == "--seed" and dests["rollout.seed"] == "--rl-rollout-seed"
    assert dests["logging.progress"] == "--progress"
    assert dests["rollout.progress"] == "--rl-rollout-progress"


def test_same_named_fields_of_two_components_do_not_set_each_other():
    run = parse_args(MBS + ["--rl-rollout-seed", "9", "--no-rl-rollout-progress"], world_size=1)
    assert run.rollout.seed == 9 and run.training.seed == 1234
    assert run.rollout.progress is False and run.logging.progress is True
    run = parse_args(MBS + ["--seed", "7", "--no-progress"], world_size=1)
    assert run.training.seed == 7 and run.rollout.seed == 1234
    assert run.logging.progress is False and run.rollout.progress is True


def test_rl_fields_drop_the_prefix_but_keep_the_flag():
    run = parse_args(MBS + ["--rl-group-size", "4", "--global-batch-size", "16", "--rl-objective",
                      "grpo", "--rl-task", "chain_sum", "--sft-teacher",
                      "megatron_rl.data.teachers:hedging_teacher"], world_size=1)
    assert run.rl.group_size == 4 and run.objective.objective == "grpo"
    assert run.task.task == "chain_sum"
    assert run.task.sft_teacher == "megatron_rl.data.teachers:hedging_teacher"


# Defaults of the flags megatron_rl shares with Megatron-LM, read from
# megatron/training/arguments.py of NVIDIA/Megatron-LM at commit
# 93da800461fd4f6a8262c3bab227868b966aaa69 (2025-12-10, the last version that declares them
# with add_argument; later ones derive them from megatron-core's config dataclasses).
# Not listed: shape flags (--num-layers, --hidden-size, --seq-length, ..., --moe-router-topk,
# --num-query-groups), which come from --model-preset; flags Megatron-LM leaves unset while
# ours have an RL meaning or a working value (--lr, --train-iters, --global-batch-size,
# --save-interval, --eval-interval); --distributed-backend (nccl there,
# chosen by the device here); --moe-router-dtype (ours adds fp32 by default).
MEGATRON_LM_DEFAULTS = {
    "--micro-batch-size": None,  # required: a run without it is refused
    "--lr-decay-style": "linear",
    "--lr-decay-iters": None,
    "--lr-warmup-iters": 0,
    "--min-lr": 0.0,
    "--weight-decay": 0.01,
    "--clip-grad": 1.0,
    "--adam-beta1": 0.9,
    "--adam-beta2": 0.999,
    "--adam-eps": 1e-08,
    "--norm-epsilon": 1e-5,
    "--rotary-base": 10000,
    "--init-method-std": 0.02,
    "--log-interval": 100,
    "--recompute-granularity": None,
    "--recompute-method": None,
    "--recompute-num-layers": None,
    "--seed": 1234,
    "--tensor-model-parallel-size": 1,
    "--pipeline-model-parallel-size": 1,
    "--context-parallel-size": 1,
    "--expert-model-parallel-size": 1,
    "--expert-tensor-parallel-size": None,
    "--num-layers-per-virtual-pipeline-stage": None,
    "--distributed-timeout-minutes": 10,
    "--moe-token-dispatcher-type": "allgather",
    "--moe-aux-loss-coeff": 0.0,
    "--save": None,
    "--load": None,
    "--tensorboard-dir": None,
    # store_true switches: off unless given
    "--bf16": False, "--sequence-parallel": False, "--use-distributed-optimizer": False,
    "--finetune": False, "--no-load-optim": False, "--no-load-rng": False,
    "--moe-router-fusion": False, "--overlap-grad-reduce": False,
    "--overlap-param-gather": False,
}


def _field_defaults() -> dict[str, object]:
    import dataclasses

    from megatron_rl.arguments import COMPONENTS
    from megatron_rl.config.flags import flag_name

    out = {}
    for _, cls, _ in COMPONENTS:
        for f in dataclasses.fields(cls):
            if f.init and f.metadata.get("flag") is not False:
                out[flag_name(f, cls)] = f.default
    return out


def test_shared_flags_have_megatron_lm_defaults():
    defaults = _field_defaults()
    for flag, expected in MEGATRON_LM_DEFAULTS.items():
        assert flag in defaults, f"{flag} is missing"
        assert defaults[flag] == expected, f"{flag}: {defaults[flag]!r}, Megatron-LM {expected!r}"
    # Megatron's no_* switches exist only as given: no --no-no-load-optim.
    text = build_parser().format_help()
    assert "--no-no-" not in text
    # Where RL wants another value the preset carries it (Qwen3's values).
    run = parse_args(MBS + [], world_size=1)
    assert (run.model.norm_epsilon, run.model.rotary_base) == (1e-6, 1e6)


def test_megatron_script_flags_are_accepted_and_honoured():
    run = parse_args(MBS + [
        "--perform-rl-step", "--grpo-group-size", "4", "--global-batch-size", "16",
        "--grpo-clamp-eps-lower", "0.1", "--grpo-clamp-eps-upper", "0.3",
        "--rl-use-sequence-packing", "--rl-default-temperature", "0.7",
        "--rl-default-top-p", "0.9", "--rl-default-top-k", "20",
        "--swiglu", "--normalization", "RMSNorm", "--qk-layernorm", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
        "--group-query-attention", "--moe-grouped-gemm", "--attention-backend", "auto",
        "--moe-router-load-balancing-type", "aux_loss", "--overlap-grad-reduce",
        "--no-load-optim", "--no-load-rng", "--lr-decay-iters", "50",
        "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", "1",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "char",
    ], world_size=1)
    assert run.stage == "rl" and run.rl.group_size == 4 and run.rl.sequence_packing
    assert (run.objective.clip_low, run.objective.clip_high) == (0.1, 0.3)
    assert (run.rollout.temperature, run.rollout.top_p, run.rollout.top_k) == (0.7, 0.9, 20)
    assert run.checkpoint.no_load_optim and run.checkpoint.no_load_rng
    assert run.training.lr_decay_iters == 50 and run.training.overlap_grad_reduce
    assert run.model.recompute_method == "uniform" and run.model.tokenizer == "char"


def test_lr_decay_iters_changes_the_schedule():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _Opt:
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    def lr_at(decay_steps: int, step: int) -> float:
        sched = OptimizerParamScheduler(_Opt(), init_lr=1.0, max_lr=1.0, min_lr=0.0,
                                        lr_warmup_steps=0, lr_decay_steps=decay_steps,
                                        lr_decay_style="linear", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=decay_steps, wd_incr_style="constant")
        sched.step(step)
        return _Opt.param_groups[0]["lr"]

    # The engine decays over --lr-decay-iters x updates when given, else --train-iters.
    import inspect

    from megatron_rl.training import engine

    assert "t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters" in \
        inspect.getsource(engine.MegatronEngine._build_optimizer)
    assert lr_at(50, 50) == 0.0 and lr_at(200, 50) == pytest.approx(0.75)


@pytest.mark.parametrize("argv, message", [
    (["--normalization", "LayerNorm"], "uses RMSNorm"),
    (["--position-embedding-type", "learned_absolute"], "which uses rope"),
    (["--attention-backend", "flash"], "use auto"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "loads Hugging Face tokenizers"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model"),
    (["--moe-router-load-balancing-type", "sinkhorn"], "supports aux_loss and none"),
    (["--data-path", "/data/x_text_document"], "reads RL prompts from --rl-task"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--overlap-param-gather"], "needs --use-distributed-optimizer"),
])
def test_megatron_values_megatron_rl_cannot_honour_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(MBS + argv, world_size=1)


def test_recompute_granularity_none_is_not_a_megatron_value(capsys):
    with pytest.raises(SystemExit):
        parse_args(MBS + ["--recompute-granularity", "sometimes"], world_size=1)
    assert "invalid choice" in capsys.readouterr().err


def test_hardware_is_checked_at_launch_not_in_the_config():
    """A login node without GPUs validates (and dry-runs) a CP=2 launch; launching it
    there is refused with the reason."""
    import torch

    run = parse_args(MBS + ["--context-parallel-size", "2"], world_size=2)
    assert run.parallel.context_parallel_size == 2
    if torch.cuda.is_available():
        run.parallel.check_hardware()
        return
    with pytest.raises(ConfigError, match="context-parallel-size > 1 needs Transformer Engine"):
        run.parallel.check_hardware()


def test_micro_batch_size_is_required_as_in_megatron_lm():
    with pytest.raises(ConfigError, match="--micro-batch-size is required"):
        parse_args([], world_size=1)


def test_logged_config_never_carries_an_api_key():
    from megatron_rl.training.rl_loop import _flat_config

    run = parse_args(MBS + ["--rl-rollout-api-key", "s3cret"], world_size=1)
    flat = _flat_config(run)
    assert "s3cret" not in repr(flat)
    assert flat["rollout.api_key"] == "<redacted>" and flat["training.seed"] == 1234


def test_prompt_sharing_is_on_where_it_applies_and_refused_where_it_cannot_work():
    rl = ["--stage", "rl", "--global-batch-size", "16", "--rl-group-size", "4"]
    run = parse_args(MBS + rl, world_size=1)
    assert run.rl.share_prompts is None
    assert run.rl.prompt_sharing(run, transformer_engine=False)
    # Transformer Engine's attention takes no tree mask: off by default, refused if asked.
    assert not run.rl.prompt_sharing(run, transformer_engine=True)
    asked = parse_args(MBS + rl + ["--rl-share-prompts"], world_size=1)
    with pytest.raises(ConfigError, match="--rl-share-prompts: Transformer Engine"):
        asked.rl.prompt_sharing(asked, transformer_engine=True)
    off = parse_args(MBS + rl + ["--no-rl-share-prompts"], world_size=1)
    assert not off.rl.prompt_sharing(off, transformer_engine=False)
    packed = parse_args(MBS + rl + ["--rl-sequence-packing"], world_size=1)
    assert not packed.rl.prompt_sharing(packed, transformer_engine=False)
    with pytest.raises(ConfigError, match="--rl-share-prompts: not with --rl-sequence-packing"):
        parse_args(MBS + rl + ["--rl-sequence-packing", "--rl-share-prompts"], world_size=1)
    aux = parse_args(MBS + rl + ["--moe-aux-loss-coeff", "0.01"], world_size=1)
    assert not aux.rl.prompt_sharing(aux, transformer_engine=False)
    with pytest.raises(ConfigError, match="--rl-share-prompts: --moe-aux-loss-coeff 0.01"):
        parse_args(MBS + rl + ["--moe-aux-loss-coeff", "0.01", "--rl-share-prompts"],
                   world_size=1)
    with pytest.raises(ConfigError, match="--rl-share-prompts: --context-parallel-size 2"):
        parse_args(MBS + rl + ["--context-parallel-size", "2", "--rl-share-prompts"],
                   world_size=2)
