"""The launch scripts in examples/ start what they say, at layouts their machines allow.

Every script that trains is checked by pretrain_rl.py's own start-up checks at the world
size it launches: the GPU scripts through their DRY_RUN=1 mode (what a user runs on a
login node), the CPU script by recording what it hands torchrun. The GPU trainer converts
the user's Hugging Face checkpoint when no megatron checkpoint exists and starts RL from
it; the SGLang launcher keeps its API key off the command line.
"""

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_rl.arguments import parse_launch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SHELL_SCRIPTS = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".sh", ".sbatch"))
# Scripts that train: they call pretrain_rl.py, or the shared launcher that does.
LAUNCHERS = sorted(
    p.relative_to(ROOT).as_posix() for p in SHELL_SCRIPTS
    if "lib" not in p.relative_to(EXAMPLES).parts
    and any(("pretrain_rl.py" in line or "lib/rl_launch.sh" in line)
            and not line.lstrip().startswith("#") for line in p.read_text().splitlines())
)
# Each script that trains -> how this file checks it.
CHECKED = {
    "examples/qwen3_30b_a3b_minirl.sh": "dry run, through the sbatch; recorded launches",
    "examples/slurm/qwen3_30b_a3b.sbatch": "dry run",
    "examples/train_single_node_gpu.sh": "dry run",
    "examples/train_tiny_cpu.sh": "recorded launches",
}


def test_every_training_script_is_checked():
    assert set(LAUNCHERS) == set(CHECKED), sorted(set(LAUNCHERS) ^ set(CHECKED))


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):  # not installed everywhere; bash -n always runs
        result = subprocess.run(["shellcheck", "-x", str(script.relative_to(ROOT))],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def _hf_dir(tmp_path: Path) -> Path:
    """Stands in for the user's HF model: the dry run reads its tokenizer (to check that
    the longest prompt fits --seq-length), nothing else."""
    from megatron_rl.model.tokenizer import build_char_tokenizer

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    build_char_tokenizer().save_pretrained(hf)
    return hf


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                            for i in range(300)))
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE"))}
    env.update(PYTHON=sys.executable, MODEL_HF=str(_hf_dir(tmp_path)),
               PROMPTS=str(_prompts(tmp_path)), RUN=str(tmp_path / "run"),
               INIT=str(tmp_path / "init"))
    env.update(extra)
    return env


@pytest.mark.slow
def test_gpu_scripts_dry_run_at_their_world_size(tmp_path):
    """DRY_RUN=1 runs every start-up check of the real launch (one CPU process each, both
    at once) and prints the plan; the conversion the first launch does is announced."""
    runs = {
        # N = 4 by default: r3, so the trainer generates on the 8 servers themselves.
        "slurm": (["bash", "examples/slurm/qwen3_30b_a3b.sbatch"], 32,
                  ["layout: TP 2, PP 2, VPP 1, CP 1, DP 8, EP 8",
                   "rollout: 8 server URL(s): http://rollout-0:30000, http://rollout-0:30001",
                   "routed experts requested", "4 update(s) of 1024 responses"]),
        "single": (["bash", "examples/train_single_node_gpu.sh"], 6,
                   ["layout: TP 1, PP 3, VPP 1, CP 1, DP 2, EP 2",
                    "rollout: 1 server URL(s): http://127.0.0.1:30000"]),
    }
    procs = {}
    for name, (cmd, _, _) in runs.items():
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path / name, DRY_RUN="1"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    for name, (_, world, expected) in runs.items():
        out, err = procs[name].communicate(timeout=300)
        assert procs[name].returncode == 0, f"{name}: {err[-3000:]}"
        assert f"world size {world} (--world-size)" in out, out
        assert "configuration: valid" in out
        for text in expected:
            assert text in out, (text, out)
        assert "tools/convert_checkpoint.py to-megatron --hf" in err, err


def _fake_launchers(tmp_path: Path) -> tuple[Path, Path]:
    """A torchrun that records its arguments instead of starting processes (and, beside
    them in ``launch_env.jsonl``, the rollout API key its environment hands the trainer)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "launches.jsonl"
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(record)!r}, "a") as handle:
            handle.write(json.dumps(sys.argv[1:]) + "\\n")
        with open({str(tmp_path / "launch_env.jsonl")!r}, "a") as handle:
            handle.write(json.dumps(os.environ.get("MEGATRON_RL_ROLLOUT_API_KEY")) + "\\n")
        """))
    torchrun.chmod(0o755)
    return bin_dir, record


def _launches(record: Path) -> list[list[str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def _script_args(launch: list[str], script: str) -> list[str]:
    return launch[launch.index(script) + 1:]


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_gpu_trainer_converts_the_hf_checkpoint_once_and_starts_from_it(tmp_path):
    """No megatron checkpoint yet: the launch converts MODEL_HF at the training layout, then
    trains with --load on the conversion. Once it exists, no second conversion."""
    from tools.convert_checkpoint import _parser as convert_parser

    bin_dir, record = _fake_launchers(tmp_path)
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", MASTER_ADDR="trainer-0",
               ROLLOUT_URL="http://rollout-0:30100",
               ROLLOUT_WORKER_URLS="http://rollout-0:30000 http://rollout-0:30001",
               ROLLOUT_API_KEY="k" * 64, N="2")
    subprocess.run(["bash", "examples/qwen3_30b_a3b_minirl.sh"], cwd=ROOT, env=env, check=True)
    convert, train = _launches(record)
    assert "--rdzv-endpoint" in convert and "--nnodes" in convert
    assert _flag(convert, "--rdzv-endpoint") != _flag(train, "--rdzv-endpoint")
    conv_args = _script_args(convert, "tools/convert_checkpoint.py")
    ns = convert_parser().parse_args(conv_args)  # every flag exists in the converter
    assert (ns.command, ns.hf, ns.save) == ("to-megatron", env["MODEL_HF"], env["INIT"])
    assert ns.model_preset == "qwen3-30b-a3b"

    args = _script_args(train, "pretrain_rl.py")
    assert _flag(args, "--load") == env["INIT"]
    # The API key reaches the trainer through its environment, never its command line
    # (which every user of the node can read).
    assert not any(env["ROLLOUT_API_KEY"] in arg for arg in convert + train)
    assert "--rl-rollout-api-key" not in args
    keys = [json.loads(line) for line in (tmp_path / "launch_env.jsonl").read_text().splitlines()]
    assert keys[-1] == env["ROLLOUT_API_KEY"]
    assert _flag(args, "--tokenizer") == env["MODEL_HF"]
    run = parse_launch(args, world_size=32).run  # the real launch's flags, all valid
    # r2: /generate through the router, control calls to each server; the router drops
    # routed experts, so the agreement metric (which needs them) is off.
    assert run.rollout.urls == ("http://rollout-0:30100",)
    assert run.rollout.worker_urls == ("http://rollout-0:30000", "http://rollout-0:30001")
    assert run.replay.routing_replay == "r2" and run.training.global_batch_size == 2048
    assert not run.rl.router_agreement
    # Training and conversion use one layout.
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--expert-model-parallel-size", "--context-parallel-size"):
        assert _flag(conv_args, flag) == _flag(args, flag)
    # Megatron-LM's defaults are not RL's: the script says what it wants.
    assert (run.training.lr_decay_style, run.training.adam_beta2) == ("constant", 0.98)

    # Once converted, no second conversion. N = 4 means r3: the trainer sends /generate
    # to the servers themselves (the router would drop the routes R3 replays).
    Path(env["INIT"]).mkdir()
    (Path(env["INIT"]) / "latest_checkpointed_iteration.txt").write_text("0")
    record.unlink()
    subprocess.run(["bash", "examples/qwen3_30b_a3b_minirl.sh"], cwd=ROOT,
                   env={**env, "N": "4"}, check=True)
    (train,) = _launches(record)
    run = parse_launch(_script_args(train, "pretrain_rl.py"), world_size=32).run
    assert run.replay.routing_replay == "r3"
    assert run.rollout.urls == ("http://rollout-0:30000", "http://rollout-0:30001")
    assert run.rollout.worker_urls == () and run.rl.router_agreement


def test_tiny_cpu_script_stages_pass_start_up_checks(tmp_path):
    """Both torchrun launches of the CPU example, through pretrain_rl.py's parser and
    validation at the script's world size. The RL stage's --load is the SFT stage's
    output, which only a real run makes: its existence is not checked here."""
    bin_dir, record = _fake_launchers(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN": str(tmp_path)}
    subprocess.run(["bash", "examples/train_tiny_cpu.sh"], cwd=ROOT, env=env, check=True)
    launches = _launches(record)
    assert len(launches) == 2
    for launch, stage in zip(launches, ("sft", "rl"), strict=True):
        world = int(_flag(launch, "--nproc-per-node"))
        run = parse_launch(_script_args(launch, "pretrain_rl.py"), world_size=world).run
        assert run.stage == stage


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A `python` for sglang_server.sh that records its argv and the --config file it got,
    then waits to be stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "server.json"
    fake = bin_dir / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys, time
        argv = sys.argv[1:]
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        info = {{"argv": argv, "config": config}}
        if config:
            info["text"] = open(config).read()
            info["mode"] = os.stat(config).st_mode & 0o777
            info["dir_mode"] = os.stat(os.path.dirname(config)).st_mode & 0o777
        with open({str(record)!r}, "w") as handle:
            json.dump(info, handle)
        time.sleep(60)
        """))
    fake.chmod(0o755)
    return bin_dir, record


def test_sglang_server_keeps_the_api_key_off_the_command_line(tmp_path):
    bin_dir, record = _fake_python(tmp_path)
    key = "s3cr'et-" + "x" * 40
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOST": "0.0.0.0",
           "API_KEY": key, "TMPDIR": str(tmp_path), "TP": "4"}
    proc = subprocess.Popen(["bash", "examples/sglang_server.sh", str(_hf_dir(tmp_path)),
                             "30001"], cwd=ROOT, env=env)
    deadline = time.time() + 30
    while not record.exists() and time.time() < deadline:
        time.sleep(0.05)
    info = json.loads(record.read_text())
    assert not any(key in arg for arg in info["argv"]), info["argv"]
    assert info["argv"][:2] == ["-m", "sglang.launch_server"]
    assert {"--enable-return-routed-experts", "--host", "0.0.0.0", "--port", "30001",
            "--tp-size", "4"} <= set(info["argv"])
    assert info["text"] == "api_key: 's3cr''et-" + "x" * 40 + "'\n"  # YAML single-quoted
    assert (info["mode"] & 0o077, info["dir_mode"]) == (0, 0o700)
    proc.terminate()  # as SLURM or the single-node script stops it: passed to the server
    assert proc.wait(timeout=30) != 0
    assert not os.path.exists(info["config"]), "the key file outlived the server"
    assert not any(p.name.startswith("sglang_server.") for p in tmp_path.iterdir())


def test_sglang_server_refuses_an_open_port_without_api_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    result = subprocess.run(["bash", "examples/sglang_server.sh", str(_hf_dir(tmp_path))],
                            cwd=ROOT, env={**env, "HOST": "0.0.0.0"},
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "HOST=0.0.0.0 without API_KEY" in result.stderr


def test_scripts_are_executable_where_run_directly():
    for script in SHELL_SCRIPTS:
        if "lib" in script.relative_to(EXAMPLES).parts:
            continue
        assert script.stat().st_mode & stat.S_IXUSR, f"chmod +x {script.relative_to(ROOT)}"


def test_demo_driver_uses_existing_flags():
    import re

    from megatron_rl.arguments import build_parser

    known = {o for action in build_parser()._actions for o in action.option_strings}
    text = (EXAMPLES / "demo.py").read_text()
    flags = set(re.findall(r'"(--[a-z][a-z0-9-]*)"', text)) - {
        "--nproc-per-node", "--master-addr", "--master-port", "--save", "--nproc"}
    assert flags
    assert not flags - known, sorted(flags - known)


def test_demo_refuses_to_resume_an_rl_run_over_a_new_cold_start(tmp_path, monkeypatch, capsys):
    """The RL stage resumes from its own checkpoint; kept while the cold start trains again,
    its figures would be reported under the new cold start's."""
    spec = importlib.util.spec_from_file_location("demo_driver", EXAMPLES / "demo.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    launched = []
    monkeypatch.setattr(driver, "torchrun", lambda *a, **k: launched.append(a))

    def checkpoint(run: Path, step: int) -> None:
        run.mkdir(parents=True, exist_ok=True)
        (run / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")

    def demo(save: Path) -> int:
        monkeypatch.setattr(sys, "argv", ["demo.py", "--save", str(save)])
        return driver.main()

    stale = tmp_path / "stale"
    checkpoint(stale / "rl", 40)
    checkpoint(stale / "coldstart", 200)  # interrupted: it would train on from here
    assert demo(stale) == 2
    err = capsys.readouterr().err
    assert f"{stale / 'rl'} holds an RL run (checkpoint of step 40)" in err
    assert "Remove the RL folder" in err
    assert launched == []  # nothing ran
    (stale / "coldstart" / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert driver.stale_rl_run(stale) is not None
    # A complete cold start: the RL run is its own continuation, resumed as before.
    checkpoint(stale / "coldstart", 800)
    assert driver.stale_rl_run(stale) is None
    assert driver.stale_rl_run(tmp_path / "fresh") is None
