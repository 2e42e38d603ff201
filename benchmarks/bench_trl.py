"""megatron_rl against TRL's GRPOTrainer on the same tiny RL workload, side by side.

Both sides train the tiny Qwen3-MoE shape (``PRESETS['tiny']``; TRL gets the Hugging Face
model built from ``to_hf_config``) from a random initialisation on the same reasoning-gym
chain_sum prompts (same order, no shuffling), with the same group size G, completion
length, rollout batch, mini-batch (so the same number N of gradient updates per rollout
batch), micro-batch and torch thread count, on the CPU, TRL without vLLM. Each side runs in
its own process tree, one after the other, and is measured the same way:

- seconds per RL step (one rollout batch: generation, scoring, pi_old where needed, N
  updates, and for megatron_rl the weight sync to its rollout server): the median over the
  steps after ``--warmup`` ones; megatron_rl's own ``time/step`` from metrics.jsonl, TRL's
  from the time between the ends of every N-th optimiser step (a trainer callback);
- peak resident memory of the whole process tree, sampled with psutil every 50 ms
  (megatron_rl: the trainer and, with ``--no-rl-rollout-colocate``, its server process);
- on Linux, the share of the machine's CPU time the hypervisor took away (``steal`` in
  /proc/stat) while each side ran: on a shared VM, wall and even CPU times of a run that
  saw steal are inflated, and more so for megatron_rl's two processes than TRL's one.

A random policy rarely emits end-of-sequence, so both sides generate (almost) the full
completion length; the mean completion lengths are printed to show it.

Both sides run their defaults beyond the workload, with one exception: megatron_rl serves
its rollouts from the trainer's process (``--rl-rollout-colocate``), as TRL generates in
its own, rather than from a server process of its own (``--mrl-args
"--no-rl-rollout-colocate"`` measures that). megatron_rl lays each group's prompt out once
in its trainer passes (``--rl-share-prompts``; a micro-batch is still 16 responses, in
rows of up to ``SEQ_LENGTH`` positions) and computes its experts with grouped GEMMs; TRL
pads every completion's prompt in its own row. ``--mrl-args "--no-rl-share-prompts"``
measures megatron_rl without prompt sharing.

    python benchmarks/bench_trl.py                       # the demo's workload + a sweep
    python benchmarks/bench_trl.py --sweep none --steps 6
    python benchmarks/bench_trl.py --workloads 64x8x6 --steps 3 --warmup 1   # smallest

A workload is ``BATCHxGxTOKENS[/MINI]``: rollout batch (responses), group size, completion
length, and optionally the mini-batch (default: the whole batch, N = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    """One RL workload both sides run."""

    batch: int
    """Responses per rollout batch (prompts x group size)."""
    group: int
    """Responses per prompt (G)."""
    tokens: int
    """Most generated tokens per response."""
    mini: int
    """Responses per gradient update (N = batch / mini)."""
    micro: int = 16
    """Responses per micro-batch (forward/backward pass)."""

    @property
    def updates(self) -> int:
        return self.batch // self.mini

    @property
    def prompts(self) -> int:
        return self.batch // self.group

    @classmethod
    def parse(cls, text: str, micro: int = 16) -> Workload:
        """``BATCHxGxTOKENS`` or ``BATCHxGxTOKENS/MINI``."""
        shape, _, mini = text.partition("/")
        batch, group, tokens = (int(v) for v in shape.split("x"))
        workload = cls(batch=batch, group=group, tokens=tokens, mini=int(mini or batch),
                       micro=min(micro, int(mini or batch)))
        workload.validate()
        return workload

    def validate(self) -> None:
        if self.batch % self.group or self.batch % self.mini or self.mini % self.group:
            raise ValueError(f"{self}: batch and mini-batch must be whole groups, and the "
                             "batch a whole number of mini-batches")
        if self.mini % self.micro:
            raise ValueError(f"{self}: the mini-batch must be a whole number of micro-batches")

    def label(self) -> str:
        return f"{self.batch}x{self.group}x{self.tokens}/{self.mini}"


# The demo's RL workload (examples/demo.py): G = 8, 128 responses per rollout batch in two
# mini-batches of 64 (N = 2), micro-batch 16, 6 new tokens.
DEMO = "128x8x6/64"
SWEEPS = {
    "none": [],
    "default": ["128x8x16/64", "128x8x32/64", "128x8x64/64", "64x8x6/32", "256x8x6/128"],
}


@dataclass
class SideResult:
    """What one side measured on one workload (all rounds pooled)."""

    step_s: list[float] = field(default_factory=list)
    """Wall seconds of each RL step after the warm-up ones."""
    cpu_s: list[float] = field(default_factory=list)
    """CPU seconds (user + system, whole process tree) of each RL step after the warm-up."""
    peak_rss_mb: float = 0.0
    """Peak RSS of the tree from start-up to the end of the last RL step."""
    peak_rss_total_mb: float = 0.0
    """Peak RSS of the tree over the whole run (megatron_rl: with its final checkpoint save)."""
    completion_len: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    """megatron_rl only: seconds of each stage of each RL step after the warm-up."""
    steal: list[float] = field(default_factory=list)
    """Fraction of the machine's CPU time stolen by the hypervisor during each run."""

    def add(self, other: SideResult) -> None:
        self.step_s += other.step_s
        self.cpu_s += other.cpu_s
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)
        self.peak_rss_total_mb = max(self.peak_rss_total_mb, other.peak_rss_total_mb)
        self.completion_len += other.completion_len
        self.steal += other.steal
        for name, values in other.stages.items():
            self.stages.setdefault(name, []).extend(values)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class TreeMonitor:
    """Samples a process and all its descendants every ``interval_s`` in a thread.

    - peak resident memory: the sum over the tree at each sample (memory the trainer and
      the rollout server hold at the same moment counts once each), over the whole run and
      until ``progress()`` first reaches ``final_step``;
    - CPU seconds of the tree (user + system) at the moment ``progress()`` -- the number of
      RL steps the side reports finished -- first takes each value, so CPU per step leaves
      out start-up and is not inflated by other jobs sharing the cores as wall time is."""

    def __init__(self, pid: int, progress, final_step: int, interval_s: float = 0.05) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self._progress = progress
        self._final = final_step
        self._interval = interval_s
        self.peak_bytes = 0
        self.peak_steps_bytes = 0
        self.cpu_at: dict[int, float] = {}
        self.steal: float | None = None
        """The machine's CPU time stolen by the hypervisor from start to ``stop()``, as a
        share (None where /proc/stat is missing)."""
        self._stolen_at_start = steal_counters()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, float] | None:
        import psutil

        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        rss, cpu = 0, 0.0
        for proc in procs:
            try:
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return rss, cpu

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self._sample()
            if sample is None:
                return
            rss, cpu = sample
            step = self._progress()
            self.peak_bytes = max(self.peak_bytes, rss)
            if step is None or step < self._final:
                self.peak_steps_bytes = max(self.peak_steps_bytes, rss)
            if step is not None and step not in self.cpu_at:
                self.cpu_at[step] = cpu
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.steal = steal_fraction(self._stolen_at_start, steal_counters())

    def cpu_per_step(self, warmup: int) -> list[float]:
        """CPU seconds of each step after ``warmup`` (steps whose both ends were seen)."""
        return [self.cpu_at[k] - self.cpu_at[k - 1] for k in sorted(self.cpu_at)
                if k > warmup and k - 1 in self.cpu_at]


def _last_step(path: Path):
    """The progress of a side: the largest ``step`` in its JSON-lines file."""
    def read() -> int | None:
        if not path.is_file():
            return None
        last = None
        for line in path.read_text().splitlines():
            try:
                last = max(last or 0, int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                continue  # a line being written
        return last
    return read


def steal_counters(stat_text: str | None = None) -> tuple[int, int] | None:
    """(stolen, total) CPU time of all CPUs, in jiffies, from /proc/stat's first line;
    None where there is no such file (not Linux)."""
    if stat_text is None:
        try:
            stat_text = Path("/proc/stat").read_text()
        except OSError:
            return None
    fields = stat_text.split("\n", 1)[0].split()
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # already counted in user and nice.
    values = [int(v) for v in fields[1:9]]
    return values[7], sum(values)


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float,
                  progress_file: Path, steps: int) -> TreeMonitor:
    """Run ``cmd`` to completion (output in ``log``) under a :class:`TreeMonitor`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        monitor = TreeMonitor(proc.pid, _last_step(progress_file), steps)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
        monitor.stop()
    if code != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({code}):\n{tail}")
    return monitor


def _env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ---- megatron_rl side -------------------------------------------------------------------


def megatron_rl_command(w: Workload, steps: int, save: Path, seed: int,
                        extra: tuple[str, ...] = ()) -> list[str]:
    """One process without a launcher (the loop initialises a world of one by itself);
    ``extra`` flags come last (they win)."""
    return [
        sys.executable, str(ROOT / "pretrain_rl.py"), "--stage", "rl", "--model-preset", "tiny",
        "--save", str(save), "--train-iters", str(steps), "--seed", str(seed),
        "--rl-rollout-seed", str(seed),
        "--rl-objective", "minirl", "--routing-replay", "none",
        "--rl-group-size", str(w.group), "--global-batch-size", str(w.batch),
        "--rl-mini-batch-size", str(w.mini), "--micro-batch-size", str(w.micro),
        "--rl-max-new-tokens", str(w.tokens), "--rl-temperature", "1.0",
        "--lr", "1e-4", "--lr-decay-style", "constant", "--adam-beta2", "0.95",
        "--rl-eval-size", "0", "--eval-interval", "-1", "--no-progress",
        "--no-rl-rollout-progress",
        "--rl-rollout-max-batch-size", str(w.batch),
        "--rl-rollout-concurrency", str(w.batch), "--seq-length", str(SEQ_LENGTH),
        "--rl-rollout-colocate", *extra,
    ]


SEQ_LENGTH = 1024
"""megatron_rl's --seq-length: rows of up to 1,024 positions, so that a group's shared
prompt and its 8 responses fit one row at every completion length of the sweep (at the
tiny preset's 256, 64-token groups are cut into rows of 2 responses). It bounds rows only:
a sample's positions, and everything without prompt sharing, are the same."""

STAGES = ("time/rollout", "time/logprob", "time/update", "time/sync")
SYNC_PARTS = ("time/sync_export", "time/sync_update")


def run_megatron_rl(w: Workload, args, work: Path) -> SideResult:
    save = work / "megatron_rl"
    shutil.rmtree(save, ignore_errors=True)
    cmd = megatron_rl_command(w, args.steps, save, args.seed,
                              tuple(shlex.split(args.mrl_args)))
    metrics = save / "metrics.jsonl"
    monitor = _run_measured(cmd, _env(args.threads), work / "megatron_rl.log", args.timeout,
                            metrics, args.steps)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > args.warmup and "time/step" in r]
    stages: dict[str, list[float]] = {}
    for name in (*STAGES, *SYNC_PARTS):
        stages[name] = [r[name] for r in rows if r.get(name) is not None]
    # What the four stages leave out of each step (prompt preparation, metrics, logging).
    stages["other"] = [r["time/step"] - sum(r.get(n) or 0.0 for n in STAGES) for r in rows]
    return SideResult(
        step_s=[r["time/step"] for r in rows], cpu_s=monitor.cpu_per_step(args.warmup),
        peak_rss_mb=monitor.peak_steps_bytes / 1e6, peak_rss_total_mb=monitor.peak_bytes / 1e6,
        steal=[] if monitor.steal is None else [monitor.steal],
        completion_len=[r["rollout/response_length_mean"] for r in rows
                        if r.get("rollout/response_length_mean") is not None],
        stages=stages)


# ---- TRL side ---------------------------------------------------------------------------


def run_trl(w: Workload, args, work: Path) -> SideResult:
    marks = work / "trl_marks.jsonl"
    marks.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker",
           json.dumps(asdict(w)), "--steps", str(args.steps), "--threads", str(args.threads),
           "--seed", str(args.seed), "--worker-out", str(marks)]
    monitor = _run_measured(cmd, _env(args.threads), work / "trl.log", args.timeout, marks,
                            args.steps)
    rows = [json.loads(line) for line in marks.read_text().splitlines() if line.strip()]
    wall = {r["step"]: r["time"] for r in rows if not r.get("final")}
    return SideResult(
        step_s=[wall[k] - wall[k - 1] for k in sorted(wall) if k > args.warmup and k - 1 in wall],
        cpu_s=monitor.cpu_per_step(args.warmup),
        peak_rss_mb=monitor.peak_steps_bytes / 1e6, peak_rss_total_mb=monitor.peak_bytes / 1e6,
        steal=[] if monitor.steal is None else [monitor.steal],
        completion_len=[r["completion_len"] for r in rows
                        if r.get("final") and r.get("completion_len") is not None])


def trl_worker(w: Workload, steps: int, threads: int, seed: int, out: Path) -> None:
    """Train with TRL's GRPOTrainer in this process; append ``{"step", "time",
    "completion_len"}`` to ``out`` when training starts (step 0) and after each RL step
    (every N-th optimiser step)."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import Qwen3MoeForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_rl.data.tasks import Task, TaskConfig
    from megatron_rl.model.config import PRESETS
    from megatron_rl.model.tokenizer import load_tokenizer
    from megatron_rl.weight_sync.hf_config import to_hf_config

    config = PRESETS["tiny"]
    tokenizer = load_tokenizer(config.tokenizer, config.vocab_size)
    tokenizer.padding_side = "left"
    hf_config = to_hf_config(config, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(hf_config)
    # The same prompts in the same order as megatron_rl's stream (seeded by --seed).
    task = Task(TaskConfig(eval_size=0), seed=seed)
    items, _ = task.next_items(0, w.prompts * steps)
    dataset = Dataset.from_list([{"prompt": it.prompt, "item_index": i}
                                 for i, it in enumerate(items)])

    def reward(prompts, completions, item_index, **_):
        return [task.score(text, items[i]) for text, i in zip(completions, item_index,
                                                               strict=True)]

    grad_accum = w.mini // w.micro
    args = GRPOConfig(
        output_dir=str(out.parent / "trl_out"), use_cpu=True, bf16=False, report_to="none",
        per_device_train_batch_size=w.micro, gradient_accumulation_steps=grad_accum,
        steps_per_generation=w.batch // w.micro, num_generations=w.group,
        max_completion_length=w.tokens, temperature=1.0, num_iterations=1, beta=0.0,
        learning_rate=1e-4, lr_scheduler_type="constant", max_steps=steps * w.updates,
        shuffle_dataset=False, save_strategy="no", logging_steps=1, seed=seed,
        dataloader_num_workers=0, disable_dropout=True, disable_tqdm=True,
    )
    lengths: list[float] = []

    def mark(step: int) -> None:
        with open(out, "a") as handle:
            handle.write(json.dumps({"step": step, "time": time.perf_counter()}) + "\n")

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            mark(0)

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

        def on_step_end(self, a, state, control, **k):
            if state.global_step % w.updates == 0:
                mark(state.global_step // w.updates)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    with open(out, "a") as handle:  # the generated lengths TRL logged, once at the end
        handle.write(json.dumps({"step": steps, "final": True,
                                 "completion_len": statistics.mean(lengths) if lengths
                                 else None}) + "\n")


# ---- driver -----------------------------------------------------------------------------


def measure(w: Workload, args, work: Path) -> tuple[SideResult, SideResult | None]:
    """Both sides on one workload, ``--rounds`` times, alternating which goes first so that
    a change in the machine's load hits both alike."""
    work.mkdir(parents=True, exist_ok=True)
    mrl, trl = SideResult(), (None if args.no_trl else SideResult())
    for r in range(args.rounds):
        order = ("mrl", "trl") if r % 2 == 0 else ("trl", "mrl")
        for side in order:
            if side == "mrl":
                mrl.add(run_megatron_rl(w, args, work))
            elif trl is not None:
                trl.add(run_trl(w, args, work))
    return mrl, trl


def row_of(w: Workload, mrl: SideResult, trl: SideResult | None) -> dict:
    row: dict = {"workload": w.label(), "updates": w.updates,
                 "mrl_s": _median(mrl.step_s), "mrl_cpu_s": _median(mrl.cpu_s),
                 "mrl_rss_mb": mrl.peak_rss_mb, "mrl_rss_total_mb": mrl.peak_rss_total_mb,
                 "mrl_len": statistics.mean(mrl.completion_len) if mrl.completion_len
                 else float("nan"),
                 "stages": {k: _median(v) for k, v in mrl.stages.items()}}
    if mrl.steal:
        row["mrl_steal_pct"] = 100 * statistics.mean(mrl.steal)
    if trl is not None and trl.steal:
        row["trl_steal_pct"] = 100 * statistics.mean(trl.steal)
    if trl is not None:
        row.update({"trl_s": _median(trl.step_s), "trl_cpu_s": _median(trl.cpu_s),
                    "trl_rss_mb": trl.peak_rss_mb,
                    "trl_len": statistics.mean(trl.completion_len) if trl.completion_len
                    else float("nan")})
        row["ratio_s"] = row["mrl_s"] / row["trl_s"]
        row["ratio_cpu"] = row["mrl_cpu_s"] / row["trl_cpu_s"]
        row["ratio_rss"] = row["mrl_rss_mb"] / row["trl_rss_mb"]
    return row


COLUMNS = [
    ("workload", "workload B x G x T / mini", "{}"), ("updates", "N", "{}"),
    ("mrl_s", "megatron_rl s/step", "{:.3f}"), ("trl_s", "TRL s/step", "{:.3f}"),
    ("ratio_s", "ratio", "{:.2f}"),
    ("mrl_cpu_s", "megatron_rl CPU s/step", "{:.3f}"), ("trl_cpu_s", "TRL CPU s/step", "{:.3f}"),
    ("ratio_cpu", "CPU ratio", "{:.2f}"),
    ("mrl_rss_mb", "megatron_rl peak RSS MB", "{:.0f}"), ("trl_rss_mb", "TRL peak RSS MB", "{:.0f}"),
    ("ratio_rss", "RSS ratio", "{:.2f}"),
    ("mrl_rss_total_mb", "megatron_rl RSS with final save", "{:.0f}"),
    ("mrl_len", "tokens/resp. mrl", "{:.2f}"), ("trl_len", "tokens/resp. TRL", "{:.2f}"),
    ("mrl_steal_pct", "CPU stolen % mrl", "{:.1f}"), ("trl_steal_pct", "CPU stolen % TRL", "{:.1f}"),
]


def format_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "" for c in cols)
                     + " |")
    return "\n".join(lines)


def format_breakdown(rows: list[dict]) -> str:
    """megatron_rl's step by stage: median seconds and share of the median step."""
    names = [n.split("/")[-1] for n in (*STAGES, *SYNC_PARTS)] + ["other"]
    lines = ["| workload | step s | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        total = r["mrl_s"]
        stages = {k.split("/")[-1]: v for k, v in r["stages"].items()}
        cells = [f"{stages[n]:.3f} ({100 * stages[n] / total:.0f}%)" if n in stages
                 and stages[n] == stages[n] else "" for n in names]
        lines.append(f"| {r['workload']} | {total:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8, help="RL steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of a run left out")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per side and workload, alternating which side goes first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every process (the colocated rollout server shares "
                        "the trainer's; a server process gets 1 unless --mrl-args sets "
                        "--rl-rollout-threads)")
    p.add_argument("--micro", type=int, default=16, help="micro-batch size (responses)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--work-dir", default=None, help="keep logs and metrics here")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--mrl-args", default="",
                   help='more pretrain_rl.py flags for megatron_rl, e.g. "--rl-rollout-dtype fp32"')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="*", default=None,
                   help=f"workloads BATCHxGxTOKENS[/MINI]; default: the demo's {DEMO} and "
                        "the --sweep")
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="default")
    p.add_argument("--no-trl", action="store_true", help="measure megatron_rl only")
    add_common_flags(p)
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup >= args.steps and not args.trl_worker:
        p.error("--warmup must be below --steps")
    return args


def run_all(workloads: list[Workload], args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        base = Path(args.work_dir) if args.work_dir else Path(tmp)
        for i, w in enumerate(workloads):
            print(f"[{i + 1}/{len(workloads)}] {w.label()} ...", flush=True)
            mrl, trl = measure(w, args, base / f"w{i}_{w.label().replace('/', '_')}")
            rows.append(row_of(w, mrl, trl))
            print(format_table(rows[-1:]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(Workload(**json.loads(args.trl_worker)), args.steps, args.threads, args.seed,
                   Path(args.worker_out))
        return 0
    if not args.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed (pip install trl); measuring megatron_rl only")
            args.no_trl = True
    specs = args.workloads if args.workloads is not None else [DEMO, *SWEEPS[args.sweep]]
    workloads = [Workload.parse(s, args.micro) for s in specs]
    rows = run_all(workloads, args)
    print(f"\nmedians over {args.rounds} run(s) x {args.steps - args.warmup} RL steps per side "
          f"(after {args.warmup} warm-up steps), {args.threads} torch thread(s) per process; "
          "ratio = megatron_rl / TRL\n")
    print(format_table(rows))
    print("\nmegatron_rl step breakdown (median seconds, share of the median step):\n")
    print(format_breakdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
