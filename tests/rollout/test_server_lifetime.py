"""The embedded server's command line (SGLang's names, unsupported flags refused by name)
and its lifetime: it dies with the process that started it, even mid-generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from megatron_rl.inference.launcher import API_KEY_ENV
from megatron_rl.inference.server import FlagError, main, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_sglang_flag_names_and_the_old_spellings():
    args = parse_args(["--model-path", "m", "--dtype", "bfloat16", "--host", "0.0.0.0",
                       "--port", "31000", "--enable-return-routed-experts", "--tp-size", "1",
                       "--enable-deterministic-inference", "--skip-tokenizer-init",
                       "--random-seed", "3", "--max-running-requests", "8",
                       "--context-length", "512", "--max-total-tokens", "4096",
                       "--max-prefill-tokens", "2048", "--device", "cpu"])  # fmt: skip
    assert (args.model_path, args.dtype, args.random_seed, args.max_running_requests) == (
        "m", "bf16", 3, 8)  # fmt: skip
    assert args.skip_tokenizer_init and args.max_total_tokens == 4096
    old = parse_args(["--model", "m", "--dtype", "fp32", "--max-batch-size", "4", "--seed", "1"])
    assert (old.model_path, old.dtype, old.max_running_requests, old.random_seed) == (
        "m", "fp32", 4, 1)  # fmt: skip
    assert parse_args(["--model-path", "m", "--dtype", "auto"]).dtype == "bf16"
    assert parse_args(["--model-path", "m", "--quantization=fp8"]).quantization == "fp8"
    assert parse_args(["--model-path", "m"]).quantization is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tp-size", "2"], "--tp-size 2 is not supported by the embedded server: .*tensor"),
        (["--quantization", "awq"], "--quantization awq is not supported.*fp8 and w8a8_fp8"),
        (["--quantization=gptq"], "--quantization gptq is not supported"),
        (["--quantization", "fp8", "--dtype", "float32"], "computes in bfloat16"),
        (["--trust-remote-code"], "--trust-remote-code is not supported"),
        (["--frobnicate", "1"], "--frobnicate is not a flag of the embedded server"),
        (["--max-running-requests", "0"], "--max-running-requests must be >= 1"),
    ],
)
def test_flags_it_cannot_honour_are_refused_by_name(flags, message):
    with pytest.raises(FlagError, match=message):
        parse_args(["--model-path", "m", *flags])


def test_refusal_is_one_line_and_the_key_comes_from_the_environment(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-path", "m", "--tp-size", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --tp-size 2 is not supported"), err
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args(["--model-path", "m"]).api_key == "from-env"
    assert parse_args(["--model-path", "m", "--api-key", "flag"]).api_key == "flag"


PARENT = """
import json, sys, time
from megatron_rl.inference.launcher import start_server_process
handle = start_server_process(sys.argv[1], max_batch_size=64, startup_timeout_s=240)
print(json.dumps({"pid": handle.pid, "url": handle.url, "log": str(handle.log_path)}), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_server_dies_with_its_parent_even_mid_generation(checkpoints, tmp_path):
    """SIGKILL the process that started the server while the server generates: the server
    must be gone within seconds (parent-death signal, then its own shutdown)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(checkpoints.main)], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    server = None
    try:
        info = json.loads(parent.stdout.readline())
        server = psutil.Process(info["pid"])
        assert server.ppid() == parent.pid
        outcome = {}

        def long_generation() -> None:  # 64 sequences of 4000 tokens: minutes if left alone
            body = {"input_ids": [5, 6, 7], "sampling_params": {
                "n": 64, "max_new_tokens": 4000, "ignore_eos": True}}  # fmt: skip
            try:
                outcome["status"] = httpx.post(f"{info['url']}/generate", json=body,
                                               timeout=120).status_code  # fmt: skip
            except httpx.TransportError as exc:
                outcome["status"] = type(exc).__name__

        client = threading.Thread(target=long_generation)
        client.start()
        time.sleep(1.5)  # well into the batch
        assert server.is_running() and client.is_alive()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        start = time.monotonic()
        server.wait(timeout=15)
        gone_after = time.monotonic() - start
        client.join(timeout=30)
        assert gone_after < 8, f"the server outlived its parent by {gone_after:.1f} s"
        assert outcome["status"] in (503, "RemoteProtocolError", "ReadError"), outcome
        Path(info["log"]).unlink(missing_ok=True)  # the parent died before it could
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if server is not None and server.is_running():
            server.kill()
            pytest.fail("the server was still running after its parent died")
