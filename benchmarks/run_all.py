"""Run every benchmark in turn (``make bench``), each printing its own side-by-side table.

    python benchmarks/run_all.py            # the README's figures (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # the same scripts on their smallest settings
    python benchmarks/run_all.py --only bench_rollout bench_replay

A benchmark that fails is reported by name with its exit code and the others still run;
the exit code is non-zero if any failed. Timings are only comparable within one script's
run: each measures its sides interleaved, on the same machine, in the same minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (script, arguments for the full run, arguments for --quick)
BENCHMARKS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("bench_rollout.py", (), ("--requests", "8", "--new-tokens", "8", "--pairs", "2",
                              "--decode-samples", "2", "--client-requests", "64",
                              "--client-rounds", "2")),
    ("bench_replay.py", (), ("--pairs", "2")),
    ("bench_packing.py", (), ("--prompts", "16", "--rounds", "2")),
    ("bench_weight_sync.py", (), ("--rounds", "1")),
    ("bench_step_breakdown.py", (), ("--workloads", "16x4x4")),
    ("bench_trl.py", (), ("--workloads", "16x4x4", "--steps", "2", "--warmup", "1",
                          "--rounds", "1")),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smallest settings of each script")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only these (names with or without .py)")
    args = p.parse_args(argv)
    wanted = None if args.only is None else {n.removesuffix(".py") + ".py" for n in args.only}
    unknown = (wanted or set()) - {name for name, _, _ in BENCHMARKS}
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: "
                f"{[name for name, _, _ in BENCHMARKS]}")
    failed: list[str] = []
    for name, full, quick in BENCHMARKS:
        if wanted is not None and name not in wanted:
            continue
        command = [sys.executable, str(HERE / name), *(quick if args.quick else full)]
        print(f"\n=== {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=HERE.parent)
        print(f"=== {name}: exit {code}, {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(f"{name} (exit {code})")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
