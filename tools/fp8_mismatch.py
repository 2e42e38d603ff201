"""Training-inference mismatch of the embedded server's precisions against the fp32 trainer.

    python tools/fp8_mismatch.py --load runs/demo/coldstart --out runs/fp8_mismatch
    python tools/fp8_mismatch.py --load DIR --settings bf16,fp8 --prompts 64 --seeds 1 2

For each server setting (fp32, bf16, fp8 = FP8 weights with bf16 activations, w8a8_fp8 =
FP8 weights and activations) this runs ONE RL step of ``pretrain_rl.py`` from the
checkpoint: the embedded server samples a batch of chain_sum rollouts (mu_old and the routed
experts), and the trainer's pi_old pass scores them in fp32 with free routing (no replay).
The loop's own metrics of that step are the measurement: ``mismatch/kl`` = E[log mu_old -
log pi_old], ``mismatch/kl_k3``, |log pi_old/mu_old| mean and max, pi_old/mu_old min and
max, its effective sample size, and ``mismatch/router_agreement`` (overall and per MoE
layer: the fraction of (token, layer) pairs whose trainer top-k set equals the server's).
The update after the pi_old pass does not enter these figures. Each seed is another rollout
batch (another --rl-rollout-seed); the table gives the mean over seeds (min of minima and
max of maxima for the extremes).

Output: ``<out>/<setting>_s<seed>/`` (each run's metrics.jsonl and train.log), the table
on stdout and in ``<out>/table.md``. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "fp32": ("fp32", "none"),
    "bf16": ("bf16", "none"),
    "fp8": ("bf16", "fp8"),
    "w8a8_fp8": ("bf16", "w8a8_fp8"),
}
"""Setting -> (--rl-rollout-dtype, --rl-rollout-quantization)."""
COLUMNS = [
    ("KL E[log mu - log pi]", "mismatch/kl", "mean"),
    ("KL k3", "mismatch/kl_k3", "mean"),
    ("mean abs log(pi/mu)", "mismatch/abs_logratio_mean", "mean"),
    ("max abs log(pi/mu)", "mismatch/abs_logratio_max", "max"),
    ("pi/mu min", "mismatch/is_weight_min", "min"),
    ("pi/mu max", "mismatch/is_weight_max", "max"),
    ("ESS", "mismatch/ess", "mean"),
    ("router agreement", "mismatch/router_agreement", "mean"),
]


def run_args(args: argparse.Namespace, setting: str, seed: int, out: Path) -> list[str]:
    dtype, quantization = SETTINGS[setting]
    batch = args.prompts * args.group_size
    return [
        "--stage", "rl", "--model-preset", args.model_preset, "--load", str(args.load),
        "--save", str(out), "--train-iters", "1", "--rl-group-size", str(args.group_size),
        "--global-batch-size", str(batch), "--rl-mini-batch-size", str(batch),
        "--micro-batch-size", str(min(32, batch)), "--rl-max-new-tokens", str(args.max_new_tokens),
        "--routing-replay", "none", "--rl-rollout-dtype", dtype,
        "--rl-rollout-quantization", quantization, "--lr", "1e-6", "--eval-interval", "-1",
        "--rl-eval-size", "8", "--save-interval", "1000", "--seed", "1234",
        "--rl-rollout-seed", str(seed), "--no-progress", "--no-rl-rollout-progress",
    ]  # fmt: skip


def run(args: argparse.Namespace, setting: str, seed: int) -> dict[str, float]:
    out = Path(args.out) / f"{setting}_s{seed}"
    metrics = out / "metrics.jsonl"
    if not metrics.is_file() or not metrics.read_text().strip():
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / "pretrain_rl.py"), *run_args(args, setting, seed, out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        print(f"{setting} seed {seed}: running", flush=True)
        with open(out / "train.log", "w") as log:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = "\n".join((out / "train.log").read_text().splitlines()[-20:])
            raise SystemExit(f"{setting} seed {seed} failed (exit {done.returncode}):\n{tail}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    step = next(r for r in rows if r.get("step") == 1 and "mismatch/kl" in r)
    return {k: v for k, v in step.items() if isinstance(v, (int, float))}


def combine(values: list[float], how: str) -> float:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}[how]


def table(results: dict[str, list[dict[str, float]]]) -> str:
    layers = sorted({k for runs in results.values() for r in runs for k in r
                     if k.startswith("mismatch/router_agreement/layer_")},
                    key=lambda k: int(k.rsplit("_", 1)[1]))  # fmt: skip
    heads = ["server"] + [c[0] for c in COLUMNS] + [f"agreement {k.rsplit('/', 1)[1]}"
                                                    for k in layers]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for setting, runs in results.items():
        cells = [setting]
        for _, key, how in COLUMNS + [("", k, "mean") for k in layers]:
            values = [r[key] for r in runs if key in r]
            value = combine(values, how) if values else float("nan")
            cells.append(f"{value:.2e}" if key.startswith("mismatch/kl") else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="cold-start checkpoint (pretrain_rl.py --save)")
    p.add_argument("--out", default="runs/fp8_mismatch")
    p.add_argument("--model-preset", default="tiny", help="the checkpoint's model preset")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--prompts", type=int, default=32, help="chain_sum prompts per batch")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="rollout seeds")
    args = p.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"--settings {unknown} not in {list(SETTINGS)}")
    if not Path(args.load).is_dir():
        p.error(f"--load {args.load} is not a directory")
    results = {s: [run(args, s, seed) for seed in args.seeds] for s in settings}
    text = table(results)
    n = args.prompts * args.group_size
    note = (f"{n} responses per batch ({args.prompts} prompts x {args.group_size}), "
            f"max {args.max_new_tokens} new tokens, seeds {args.seeds}, checkpoint {args.load}")
    print(text + "\n\n" + note)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(text + "\n\n" + note + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
