"""Asynchronous rollouts: step time and samples/s with --rl-rollout-ahead 0 and 1, side by side.

Runs the RL loop (1 trainer process, embedded rollout server, tiny preset, random init,
the demo's workload by default) with K = 0 and K = 1 alternately, ``--rounds`` times each,
and reports from the loop's own metrics the median step time, samples per second, the
generation's time (K = 0: the rollout stage; K = 1: the background generation,
``time/rollout_ahead``), how long the trainer still waited for it (``time/rollout_wait``),
and the share of the generation hidden behind the trainer's compute.

On a GPU cluster trainer and servers own separate GPUs. Here they share the CPU: with at
least two cores and ``taskset`` the trainer (its launcher and background client thread
included) is pinned to core 0 and the server, once started, to core 1 (``--no-pin`` leaves
both to the scheduler), so that generation and training can really run at once.

    python benchmarks/bench_rollout_ahead.py                       # demo workload, 2 rounds
    python benchmarks/bench_rollout_ahead.py --workload 64x8x32/64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trl import DEMO, ROOT, Workload, _env, megatron_rl_command  # noqa: E402

SERVER_MODULE = "megatron_rl.inference.server"


def can_pin() -> bool:
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


class ServerPinner:
    """Moves every rollout server under ``root`` to ``cpus`` as soon as it appears."""

    def __init__(self, root: int, cpus: list[int]) -> None:
        self.root, self.cpus, self.pinned = root, cpus, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                children = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    if child.pid not in self.pinned and SERVER_MODULE in " ".join(child.cmdline()):
                        child.cpu_affinity(self.cpus)
                        self.pinned.add(child.pid)
                except psutil.Error:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_once(w: Workload, k: int, args, work: Path) -> list[dict]:
    """One run with --rl-rollout-ahead ``k``; its metrics rows after the warm-up."""
    save = work / f"k{k}"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(save, ignore_errors=True)
    # A server process of its own: pinned to the other core, it generates the next batch
    # while the trainer trains on this one.
    cmd = megatron_rl_command(w, args.steps, save, args.seed,
                              ("--rl-rollout-ahead", str(k), "--no-rl-rollout-colocate",
                               *args.mrl_args.split()))
    pin = args.pin and can_pin()
    if pin:
        cmd = ["taskset", "-c", "0", *cmd]
    log = work / f"k{k}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(args.threads), stdout=out,
                                stderr=subprocess.STDOUT)
        pinner = ServerPinner(proc.pid, [1]) if pin else None
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if pinner is not None:
            pinner.stop()
    if code != 0:
        raise RuntimeError(f"K={k} run failed ({code}):\n{log.read_text()[-4000:]}")
    if pin and not pinner.pinned:
        raise RuntimeError(f"K={k}: the rollout server was never seen to pin it (see {log})")
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] > args.warmup and "time/step" in r]


def summarize(k: int, rows: list[dict], batch: int) -> dict[str, float]:
    def med(name: str) -> float:
        values = [r[name] for r in rows if r.get(name) is not None]
        return statistics.median(values) if values else 0.0

    step = med("time/step")
    # K = 0: the rollout stage is the generation; K = 1: it ran in the background
    # (time/rollout_ahead) and the trainer only waited time/rollout_wait for it.
    generate = med("time/rollout_ahead") if k else med("time/rollout")
    waited = med("time/rollout_wait") + med("time/rollout") if k else generate
    return {"K": k, "steps": len(rows), "step_s": step, "samples_per_s": batch / step,
            "generate_s": generate, "trainer_waits_s": waited,
            "hidden": 1.0 - waited / generate if generate else 0.0,
            "train_s": med("time/logprob") + med("time/update"), "sync_s": med("time/sync"),
            "staleness": med("rollout/staleness")}


def format_rows(rows: list[dict]) -> str:
    head = ("| K | steps | step s | samples/s | generation s | trainer waits s | hidden | "
            "pi_old + updates s | sync s | staleness |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['K']} | {r['steps']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} "
                     f"| {r['generate_s']:.3f} | {r['trainer_waits_s']:.3f} | "
                     f"{r['hidden']:.0%} | {r['train_s']:.3f} | {r['sync_s']:.3f} | "
                     f"{r['staleness']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default=DEMO, help=f"BATCHxGxTOKENS[/MINI] (default {DEMO})")
    p.add_argument("--steps", type=int, default=8, help="RL steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of a run left out")
    p.add_argument("--rounds", type=int, default=2, help="runs per K, alternating which goes first")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    p.add_argument("--micro", type=int, default=16, help="micro-batch size (responses)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the trainer and the server to cores of their own")
    p.add_argument("--work-dir", default=None, help="keep logs and metrics here")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--mrl-args", default="", help="more pretrain_rl.py flags for both runs")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")
    w = Workload.parse(args.workload, args.micro)
    pinned = args.pin and can_pin()
    with tempfile.TemporaryDirectory(prefix="bench_ahead_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pooled: dict[int, list[dict]] = {0: [], 1: []}
        for r in range(args.rounds):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                rows = run_once(w, k, args, work / f"round{r}")
                pooled[k] += rows
                print(f"round {r + 1}/{args.rounds} K={k}: {len(rows)} steps, median "
                      f"{statistics.median(x['time/step'] for x in rows):.3f} s/step "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [summarize(k, pooled[k], w.batch) for k in (0, 1)]
    print(f"\nworkload {w.label()}, {args.steps - args.warmup} steps per run after "
          f"{args.warmup} warm-up, {args.rounds} run(s) per K, {args.threads} torch thread(s) "
          f"per process; {'trainer on core 0, server on core 1 (taskset)' if pinned else 'unpinned'}"
          f"\n")
    print(format_rows(rows))
    print(f"\nK = 1 / K = 0: step time {rows[1]['step_s'] / rows[0]['step_s']:.3f}, samples/s "
          f"{rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
