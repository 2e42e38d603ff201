"""The paper's study (arXiv 2512.01374) at laptop scale: a grid of short RL runs of the
tiny preset from one cold-start checkpoint, a summary table and the paper's plots.

    python tools/study.py --out runs/study --n 1,4 --replays none,r2,r3 --objectives minirl \
        --seeds 1 2 --parallel 2
    python tools/study.py --out runs/study --grid "objectives=minirl n=1,4" \
        --grid "objectives=minirl_no_is,grpo n=1 replay=none" --seeds 1 2
    python tools/study.py --out runs/study --summary-only        # tables and plots again
    python tools/study.py ... -- --rl-is-cap 2                    # flags for every run alike

Grid: objective x N (gradient updates per rollout batch) x routing replay; ``--grid`` may be
given several times (their union runs), each ``"objectives=... n=... replay=..."`` with any
key left out meaning all its values. Every run uses the same workload (the settings
flags below); only the objective, N, replay and seed differ.

Output: ``<out>/coldstart`` (unless ``--coldstart DIR``), ``<out>/runs/<run>/`` (metrics.jsonl,
train.log, command.sh, run.json), ``<out>/summary.md``, ``summary.csv``, ``runs.csv``,
``<out>/plots/*.png``. Interrupted? Run the same command again: finished runs are kept,
unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from megatron_rl.config.flags import add_config_flags, config_from_flags  # noqa: E402
from megatron_rl.study.grid import (  # noqa: E402
    OBJECTIVES,
    OFF_POLICINESS,
    REPLAYS,
    GridError,
    RunSpec,
    expand,
    parse_grid,
)
from megatron_rl.study.plots import PANELS  # noqa: E402
from megatron_rl.study.runner import (  # noqa: E402
    StudyError,
    ensure_coldstart,
    execute,
    run_job,
)
from megatron_rl.study.settings import SettingsError, StudySettings  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags after `--` go to every RL run (pretrain_rl.py).")
    p.add_argument("--out", default="runs/study", help="study folder (default: runs/study)")
    p.add_argument("--coldstart", default=None,
                   help="an existing cold-start checkpoint folder to start every run from "
                        "(default: <out>/coldstart, created when missing)")
    g = p.add_argument_group("grid")
    g.add_argument("--grid", action="append", default=None, metavar="SPEC",
                   help='a product "objectives=A,B n=1,4 replay=none,r3" (repeatable; the '
                        "union runs). Overrides --objectives/--n/--replays.")
    g.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help=f"comma list of {', '.join(OBJECTIVES)}")
    g.add_argument("--n", default=",".join(map(str, OFF_POLICINESS)),
                   help="comma list of off-policiness N in 1,2,4,8")
    g.add_argument("--replays", default=",".join(REPLAYS), help="comma list of none,r2,r3")
    g.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds (default: 1)")
    r = p.add_argument_group("running")
    r.add_argument("--parallel", type=int, default=1,
                   help="runs at a time (each uses ~1 core: trainer and rollout server "
                        "take turns)")
    r.add_argument("--summary-only", action="store_true",
                   help="run nothing; rebuild the tables and plots from the runs there are")
    r.add_argument("--dry-run", action="store_true", help="print what would run, and stop")
    r.add_argument("--tail", type=float, default=0.25,
                   help="fraction of the last updates the reward/entropy columns average")
    r.add_argument("--plot-panels", choices=PANELS, default="n",
                   help="a panel per off-policiness N (the paper's layout), or per replay "
                        "mode (one N's objective ablation)")
    add_config_flags(p, StudySettings, "settings shared by every run")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, StudySettings, list[RunSpec]]:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = config_from_flags(StudySettings, args)
    if extra:
        settings = dataclasses.replace(settings, extra_args=tuple(extra))
    try:
        if args.grid:
            grids = [parse_grid(text) for text in args.grid]
        else:
            grids = [parse_grid(f"objectives={args.objectives} n={args.n} "
                                f"replay={args.replays}")]
        specs = expand(grids, args.seeds)
        settings.validate(s.config.n for s in specs)
    except (GridError, SettingsError) as exc:
        parser.error(str(exc))
    return args, settings, specs


def summarize_study(out: Path, specs: list[RunSpec], tail: float, panels: str = "n") -> None:
    from megatron_rl.study.plots import plot_study
    from megatron_rl.study.summary import markdown_table, summarize, write_csv, write_runs_csv

    runs = [(s, out / "runs" / s.name) for s in specs]
    summaries = summarize(runs, tail)
    if not summaries:
        print("no run has metrics yet: no summary")
        return
    table = markdown_table(summaries)
    (out / "summary.md").write_text(table + "\n")
    write_csv(summaries, out / "summary.csv")
    write_runs_csv(summaries, out / "runs.csv")
    written = plot_study(runs, out / "plots", panels=panels)
    print(table)
    print(f"\nwrote {out / 'summary.md'}, summary.csv, runs.csv and {len(written)} plots "
          f"in {out / 'plots'}")


def _stored_specs(out: Path) -> list[RunSpec] | None:
    from megatron_rl.study.grid import Config

    path = out / "study.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return [RunSpec(Config(r["objective"], r["n"], r["replay"]), r["seed"]) for r in data["runs"]]


def _store(out: Path, settings: StudySettings, specs: list[RunSpec], coldstart: Path) -> None:
    runs = [{"name": s.name, "objective": s.config.objective, "n": s.config.n,
             "replay": s.config.replay, "seed": s.seed} for s in specs]
    (out / "study.json").write_text(json.dumps(
        {"settings": dataclasses.asdict(settings), "coldstart": str(coldstart), "runs": runs},
        indent=2) + "\n")


def _sigterm(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, settings, specs = parse(argv)
    out = Path(args.out).resolve()
    if args.summary_only:
        grid_flags = ("--grid", "--objectives", "--n", "--replays", "--seeds")
        given_grid = any(a.split("=")[0] in grid_flags for a in argv)
        stored = None if given_grid else _stored_specs(out)
        summarize_study(out, stored or specs, args.tail, args.plot_panels)
        return 0
    coldstart = Path(args.coldstart).resolve() if args.coldstart else out / "coldstart"
    jobs = [run_job(settings, s, coldstart, out / "runs") for s in specs]
    try:
        plan = [(job, job.action()) for job in jobs]
    except StudyError as exc:
        print(f"study.py: error: {exc}", file=sys.stderr)
        return 2
    todo = [(job, action) for job, action in plan if action != "finished"]
    print(f"{len(specs)} runs ({len(plan) - len(todo)} finished, "
          f"{sum(a == 'resume' for _, a in todo)} to resume, "
          f"{sum(a in ('new', 'restart') for _, a in todo)} to start); cold start {coldstart}")
    if args.dry_run:
        for job, action in plan:
            print(f"  {action:8s} {job.name}: {shlex.join(job.args)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    _store(out, settings, specs, coldstart)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.time()
    try:
        ensure_coldstart(settings, coldstart, given=args.coldstart is not None)
        for job, action in todo:
            job.prepare(action)
        done = [0]

        def report(job, ok, seconds):
            done[0] += 1
            print(f"[{done[0]}/{len(todo)}] {job.name} {'finished' if ok else 'FAILED'} in "
                  f"{seconds:.0f} s (total {(time.time() - started) / 60:.1f} min)", flush=True)

        failed = execute([job for job, _ in todo], args.parallel, on_done=report)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except StudyError as exc:
        print(f"study.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"grid done in {(time.time() - started) / 60:.1f} min")
    summarize_study(out, specs, args.tail, args.plot_panels)
    for job in failed:
        print(f"FAILED: {job.name} (log {job.directory / 'train.log'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
