"""Smoke tests of benchmarks/bench_trl.py, bench_step_breakdown.py and bench_packing.py on
their smallest workload, plus the pieces they measure with (workload parsing, the
process-tree monitor)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_trl  # noqa: E402
from bench_trl import TreeMonitor, Workload  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None
SMALLEST = ["--workloads", "16x4x4", "--steps", "2", "--warmup", "1", "--rounds", "1"]


def run(script: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc.stdout


def test_workload_parsing():
    w = Workload.parse("128x8x6/64")
    assert (w.batch, w.group, w.tokens, w.mini, w.updates, w.prompts) == (128, 8, 6, 64, 2, 16)
    assert Workload.parse("16x4x4").updates == 1
    assert Workload.parse("16x4x4", micro=32).micro == 16  # never above the mini-batch
    for bad in ("30x4x4", "32x4x4/24", "32x8x4/4"):
        with pytest.raises(ValueError):
            Workload.parse(bad)


def test_steal_is_read_from_the_first_line_of_proc_stat():
    # user nice system idle iowait irq softirq steal guest guest_nice
    before = bench_trl.steal_counters("cpu  100 0 50 800 10 0 5 35 7 0\ncpu0 1 2 3\n")
    after = bench_trl.steal_counters("cpu  200 0 60 900 10 0 5 60 9 0\ncpu0 1 2 3\n")
    assert before == (35, 1000) and after == (60, 1235)  # guest time is inside user
    assert bench_trl.steal_fraction(before, after) == pytest.approx(25 / 235)
    assert bench_trl.steal_counters("intr 1 2 3\n") is None
    assert bench_trl.steal_fraction(None, after) is None


def test_tree_monitor_counts_children_and_marks_cpu_per_step(tmp_path):
    marks = tmp_path / "marks.jsonl"
    child = textwrap.dedent(f"""
        import json, subprocess, sys, time
        # A child process holding ~60 MB while the parent marks steps and burns CPU.
        holder = subprocess.Popen([sys.executable, "-c",
            "import time; b = bytearray(60_000_000); b[::4096] = b'x' * len(b[::4096]); "
            "time.sleep(3)"])
        time.sleep(1.0)
        for step in range(3):
            end = time.process_time() + 0.3
            while time.process_time() < end:
                pass
            with open({str(marks)!r}, "a") as f:
                f.write(json.dumps({{"step": step}}) + "\\n")
            time.sleep(0.3)
        holder.wait()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    monitor = TreeMonitor(proc.pid, bench_trl._last_step(marks), final_step=2,
                          interval_s=0.02)
    proc.wait(timeout=30)
    monitor.stop()
    assert monitor.peak_bytes > 60e6  # the child's buffer counts
    assert monitor.peak_steps_bytes <= monitor.peak_bytes
    if Path("/proc/stat").is_file():
        assert 0.0 <= monitor.steal <= 1.0
    cpu = monitor.cpu_per_step(warmup=0)
    assert len(cpu) == 2
    assert all(0.2 < c < 1.5 for c in cpu), cpu


@pytest.mark.slow
def test_bench_trl_smallest_workload(tmp_path):
    args = [*SMALLEST, "--json", str(tmp_path / "rows.json")]
    if not HAS_TRL:
        args.append("--no-trl")
    out = run("bench_trl.py", *args)
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["workload"] == "16x4x4/16" and row["updates"] == 1
    assert row["mrl_s"] > 0 and row["mrl_cpu_s"] > 0 and row["mrl_rss_mb"] > 100
    assert row["mrl_rss_total_mb"] >= row["mrl_rss_mb"]
    assert 1 <= row["mrl_len"] <= 4
    assert set(row["stages"]) >= {"time/rollout", "time/logprob", "time/update", "time/sync"}
    assert "megatron_rl step breakdown" in out
    if Path("/proc/stat").is_file():
        assert 0.0 <= row["mrl_steal_pct"] <= 100.0 and "CPU stolen % mrl" in out
    if HAS_TRL:
        assert row["trl_s"] > 0 and row["trl_cpu_s"] > 0 and row["trl_rss_mb"] > 100
        assert 1 <= row["trl_len"] <= 4
        assert row["ratio_s"] == pytest.approx(row["mrl_s"] / row["trl_s"])
        assert "| 16x4x4/16 | 1 |" in out


@pytest.mark.slow
def test_step_breakdown_smallest_workload_with_profile(tmp_path):
    import bench_step_breakdown

    args = [*SMALLEST[:2], "--steps", "2", "--warmup", "1", "--work-dir", str(tmp_path)]
    profile = ["--profile", "--top", "5"]
    if bench_step_breakdown.cprofile_loses_calls():
        # This Python's cProfile would print a wrong profile (CPython 3.12.1 here): the
        # script refuses --profile before running anything; the breakdown still runs.
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" /
                                                   "bench_step_breakdown.py"), *args, *profile],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert bench_step_breakdown.PROFILE_REFUSED in proc.stderr
        assert not (tmp_path / "trainer.prof").exists()
        profile = []
    out = run("bench_step_breakdown.py", *args, *profile)
    assert "step breakdown" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("| 16x4x4/16 |")
                and "%" in ln)
    assert line.count("%") == 7  # rollout, logprob, update, sync, export, update, other
    if profile:
        assert "megatron_rl/training/" in out  # the loop's own functions in the profile
        assert (tmp_path / "trainer.prof").is_file()


def test_rollout_ahead_summary_reads_the_loops_metrics():
    """bench_rollout_ahead: K = 0's generation is its rollout stage, all of it waited for;
    K = 1's is the background generation, hidden except for the trainer's wait."""
    import bench_rollout_ahead

    k0 = [{"time/step": 2.0, "time/rollout": 0.6, "time/logprob": 0.4, "time/update": 1.0,
           "time/sync": 0.1, "rollout/staleness": 0.0}] * 3
    k1 = [{"time/step": 1.5, "time/rollout": 0.01, "time/rollout_ahead": 0.8,
           "time/rollout_wait": 0.19, "time/logprob": 0.4, "time/update": 1.0,
           "time/sync": 0.1, "rollout/staleness": 1.0}] * 3
    r0 = bench_rollout_ahead.summarize(0, k0, batch=128)
    r1 = bench_rollout_ahead.summarize(1, k1, batch=128)
    assert (r0["samples_per_s"], r0["generate_s"], r0["hidden"]) == (64.0, 0.6, 0.0)
    assert r1["generate_s"] == 0.8 and r1["trainer_waits_s"] == pytest.approx(0.2)
    assert r1["hidden"] == pytest.approx(0.75) and r1["staleness"] == 1.0
    table = bench_rollout_ahead.format_rows([r0, r1])
    assert "| 1 | 3 | 1.500 | 85.3 | 0.800 | 0.200 | 75% |" in table


def test_bench_packing_lays_prompts_out_shared():
    out = run("bench_packing.py", "--prompts", "4", "--responses", "4",
              "--micro-batch-size", "16", "--rounds", "1")
    layout = re.search(r"16 samples \(4 prompts x 4\), (\d+) micro-batches? of (\d+) x", out)
    assert layout, out
    # One micro-batch of 16 samples, 4 per prompt: one row per prompt is what is measured
    # (16 rows without prompt sharing).
    assert (int(layout[1]), int(layout[2])) == (1, 4)
    ratios = re.findall(r"batching / (pi_old pass|training step|RL step, N = \d): median of "
                        r"per-round ratios "
                        r"([0-9.]+)", out)
    assert [name for name, _ in ratios] == ["pi_old pass", "training step", "RL step, N = 1",
                                            "RL step, N = 8"]
    assert all(0 < float(value) < 1 for _, value in ratios)
