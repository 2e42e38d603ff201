"""`make demo`: the whole loop on a laptop CPU, then a before/after table.

1. Cold start: supervised training of the tiny Qwen3-MoE-shaped model on reasoning-gym
   chain_sum answers written by a hedging teacher (the right number, but "~7" instead of
   "7" three times in four; EP=2 over 2 processes, gloo), held-out greedy accuracy printed.
   The binary exact-answer reward gives a hedged answer nothing, so there is something for
   RL to learn that imitating the teacher cannot teach (see README, "The demo").
2. RL: MiniRL with rollout routing replay (R3) against the embedded SGLang-compatible
   server (bf16 on CPU, while the trainer runs fp32, so the engines genuinely differ).
3. The held-out accuracy before and after RL, and the mismatch figures, from the runs'
   metrics.jsonl files.

Both stages resume if interrupted: run `make demo` again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = [
    "--model-preset", "tiny", "--micro-batch-size", "16", "--rl-eval-size", "256",
    "--eval-micro-batch-size", "128", "--seed", "1234",
    # megatron_rl's flags have Megatron-LM's defaults; the demo's figures came from these.
    "--adam-beta2", "0.95", "--log-interval", "1",
]
SFT = [
    "--stage", "sft", "--global-batch-size", "64", "--train-iters", "800", "--lr", "2e-3",
    "--lr-warmup-iters", "10", "--lr-decay-style", "cosine", "--eval-interval", "200",
    "--sft-teacher", "megatron_rl.data.teachers:hedging_teacher",
]
RL = [
    "--stage", "rl", "--rl-objective", "minirl", "--routing-replay", "r3",
    "--rl-group-size", "8", "--global-batch-size", "128", "--rl-mini-batch-size", "64",
    "--train-iters", "40", "--lr", "2e-4", "--lr-warmup-iters", "5",
    "--lr-decay-style", "cosine", "--min-lr", "0",
    "--rl-max-new-tokens", "6", "--eval-interval", "10", "--save-interval", "10",
]


def torchrun(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(ROOT / "pretrain_rl.py"), *args]
    print("+", " ".join(cmd[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last(rows: list[dict], name: str):
    values = [r[name] for r in rows if r.get(name) is not None]
    return values[-1] if values else None


def summarize(save: Path) -> str:
    sft = _metrics(save / "coldstart" / "sft_metrics.jsonl")
    rl = _metrics(save / "rl" / "metrics.jsonl")
    first = _last([r for r in sft if r["step"] == 0], "eval/accuracy")
    cold = _last(sft, "eval/accuracy")
    after = _last(rl, "eval/accuracy")
    lines = ["", "held-out greedy accuracy (256 chain_sum problems, exact answer):",
             f"  random init           {first:.3f}" if first is not None else "",
             f"  after cold start      {cold:.3f}" if cold is not None else "",
             f"  after RL (MiniRL+R3)  {after:.3f}" if after is not None else ""]
    for name in ("rollout/reward_mean", "mismatch/kl", "mismatch/router_agreement",
                 "replay/fidelity", "train/clipfrac"):
        value = _last(rl, name)
        if value is not None:
            lines.append(f"  last RL step {name:<28} {value:.4f}")
    return "\n".join(line for line in lines if line)


def _latest_iteration(run: Path) -> int | None:
    """The run's latest checkpointed iteration; None without one (or for a tracker that
    names no iteration, e.g. megatron's ``release``)."""
    tracker = run / "latest_checkpointed_iteration.txt"
    text = tracker.read_text().strip() if tracker.is_file() else ""
    return int(text) if text.isdigit() else None


def stale_rl_run(save: Path) -> str | None:
    """Why resuming would mix two runs, or None. The RL stage resumes from its own
    checkpoint (its --load is only read on a fresh start), so an RL run kept from an
    earlier demo while the cold start trains again would report the earlier run's figures
    under the new cold start's."""
    coldstart_done = (_latest_iteration(save / "coldstart") or 0) >= int(SFT[SFT.index("--train-iters") + 1])
    rl_step = _latest_iteration(save / "rl")
    if coldstart_done or rl_step is None:
        return None
    return (f"{save / 'rl'} holds an RL run (checkpoint of step {rl_step}) from an earlier cold "
            f"start, while the cold start in {save / 'coldstart'} is not complete and would "
            "train again: the demo's figures would mix two runs. Remove the RL folder, or give "
            "another --save, and run again.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", default="runs/demo")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    save = (ROOT / args.save).resolve()
    ep = ["--expert-model-parallel-size", str(args.nproc)]
    stale = stale_rl_run(save)
    if stale:
        print(stale, file=sys.stderr)
        return 2
    started = time.time()
    torchrun(args.nproc, SFT + COMMON + ep + ["--save", str(save / "coldstart")])
    torchrun(args.nproc, RL + COMMON + ep + ["--load", str(save / "coldstart"),
                                           "--save", str(save / "rl")])
    print(summarize(save))
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min; metrics in {save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
