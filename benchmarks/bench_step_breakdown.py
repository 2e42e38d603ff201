"""Where an RL step of megatron_rl goes: rollout, pi_old (logprob), updates, weight sync.

Runs the RL loop (1 process, embedded rollout server, tiny preset, random init, the same
workload as benchmarks/bench_trl.py) and reports the median seconds of each stage of a
step from the loop's own ``time/*`` metrics, the sync split into export (safetensors
written by the trainer) and update (the server reloading them), the CPU seconds of the
whole process tree per step, and peak memory. ``--profile`` also runs the trainer under
cProfile and prints the functions that take the most time inside the steps.

    python benchmarks/bench_step_breakdown.py                    # the demo's workload
    python benchmarks/bench_step_breakdown.py --workloads 128x8x32/64 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_trl  # noqa: E402
from bench_trl import DEMO, Workload, format_breakdown, format_table  # noqa: E402


def cprofile_loses_calls() -> bool:
    """Whether this interpreter's cProfile loses the call stack at a bound method that
    wraps a C function (python/cpython#122029; seen here on CPython 3.12.1 and 3.13.0,
    not on 3.11). torch calls such methods throughout, so the trainer's profile would
    lose its own loop and misattribute the time: a wrong profile, not a slow one."""
    probe = types.MethodType(len, ())

    def outer() -> None:
        probe()

    profiler = cProfile.Profile()
    profiler.runcall(outer)
    return not any(name == "outer" for _, _, name in pstats.Stats(profiler).stats)


PROFILE_REFUSED = "--profile: this Python's cProfile loses calls"


def profiled_command(cmd: list[str], out: Path) -> list[str]:
    """``python pretrain_rl.py ...`` -> ``python -m cProfile -o out pretrain_rl.py ...``."""
    return [cmd[0], "-m", "cProfile", "-o", str(out), *cmd[1:]]


def print_profile(path: Path, top: int) -> None:
    """The trainer's own functions by cumulative time, then the hottest by own time.

    The profile covers the trainer's whole run, start-up included. The rollout server is
    another process: its share shows as the trainer waiting (``select``/``poll``) under
    the rollout stage."""
    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative")
    print(f"\ntrainer process (cProfile, {path}): the loop, megatron-core and weight sync "
          "by cumulative time\n")
    stats.print_stats(r"megatron_rl/(training|rollout|weight_sync|data|loss|replay)|"
                      r"megatron/core", top)
    stats.sort_stats("tottime")
    print(f"\ntop {top} functions by own time (whole run):\n")
    stats.print_stats(top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="*", default=[DEMO],
                   help="workloads BATCHxGxTOKENS[/MINI] (default: the demo's)")
    p.add_argument("--profile", action="store_true", help="run the trainer under cProfile")
    p.add_argument("--top", type=int, default=30, help="functions listed by --profile")
    bench_trl.add_common_flags(p)
    args = p.parse_args(argv)
    if args.profile and cprofile_loses_calls():
        print(f"{PROFILE_REFUSED} (python/cpython#122029 on Python "
              f"{sys.version.split()[0]}); its profile of the trainer would be wrong. Run "
              "--profile with a Python whose cProfile works (3.11 does).", file=sys.stderr)
        return 2
    args.rounds, args.no_trl = 1, True
    workloads = [Workload.parse(s, args.micro) for s in args.workloads]
    with tempfile.TemporaryDirectory(prefix="bench_breakdown_") as tmp:
        base = Path(args.work_dir) if args.work_dir else Path(tmp)
        profile = base / "trainer.prof"
        if args.profile:
            # Only this script's runs are wrapped: bench_trl's builder stays untouched.
            plain = bench_trl.megatron_rl_command
            bench_trl.megatron_rl_command = lambda *a, **k: profiled_command(plain(*a, **k),
                                                                             profile)
        args.work_dir = str(base)
        rows = bench_trl.run_all(workloads, args)
        print(f"\nmegatron_rl, {args.steps - args.warmup} RL steps after {args.warmup} warm-up "
              f"steps, {args.threads} torch thread(s) per process\n")
        print(format_table(rows))
        print("\nstep breakdown (median seconds, share of the median step):\n")
        print(format_breakdown(rows))
        if args.profile:
            print_profile(profile, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
