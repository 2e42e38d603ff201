"""Entry point: RL (or the cold-start SFT stage) of a MoE model on megatron-core.

    torchrun --nproc-per-node 2 pretrain_rl.py --stage sft --expert-model-parallel-size 2 \
        --micro-batch-size 16 --save runs/coldstart
    torchrun --nproc-per-node 2 pretrain_rl.py --expert-model-parallel-size 2 \
        --micro-batch-size 16 --load runs/coldstart --routing-replay r3 --save runs/rl

Flags follow Megatron-LM's names; ``--help`` lists them by group.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_rl.arguments import parse_launch
    from megatron_rl.config.flags import ConfigError
    from megatron_rl.logging_setup import setup_logging
    from megatron_rl.training.checkpoint import CheckpointError, find_load_source

    setup_logging()
    try:
        launch = parse_launch(argv)
        run = launch.run
        if not launch.dry_run:  # a dry run checks a launch meant for other machines
            run.parallel.check_hardware()
        # Before any process group or model: a checkpoint that is missing, damaged or
        # holds more than data is refused in seconds, naming the file.
        source = find_load_source(run.checkpoint, run.stage)
        run.check_initial_weights(source is not None)
        if run.stage == "rl":
            from megatron_rl.training.rl_data import check_rollouts_fit

            resumed = source.common if source is not None and source.resume else {}
            check_rollouts_fit(run, start_step=resumed.get("step", 0),
                               start_position=resumed.get("data_position", 0))
    except (ConfigError, CheckpointError) as exc:
        print(f"pretrain_rl.py: error: {exc}", file=sys.stderr)
        return 2
    if launch.dry_run:
        from megatron_rl.plan import build_plan, render

        print(render(build_plan(run, launch.world_size_source)))
        return 0
    if run.stage == "sft":
        from megatron_rl.training.sft import run_sft

        run_sft(run)
    else:
        from megatron_rl.training.rl_loop import run_rl

        run_rl(run)
    from megatron_rl.distributed import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    # The work stays under this guard: dist_checkpointing starts a helper process with
    # the "spawn" method, which re-imports this file.
    logging.captureWarnings(True)
    sys.exit(main())
