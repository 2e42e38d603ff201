"""RolloutConfig: flags derived from the fields, validation naming the flag."""

from __future__ import annotations

import argparse

import pytest

from megatron_rl.arguments import RunConfig
from megatron_rl.config.flags import ConfigError, add_config_flags, config_from_flags
from megatron_rl.rollout.config import RolloutConfig


def parse(*argv: str) -> RolloutConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, RolloutConfig)
    return config_from_flags(RolloutConfig, parser.parse_args(list(argv)))


def test_flags():
    config = parse(
        "--rl-rollout-url", "http://a:30000", "http://b:30000", "--rl-rollout-api-key", "k",
        "--rl-rollout-concurrency", "8", "--rl-rollout-timeout", "30", "--rl-rollout-retries", "2",
        "--rl-rollout-on-server-failure", "fail", "--rl-temperature", "0.7", "--rl-top-p", "0.9",
        "--rl-top-k", "50", "--rl-max-new-tokens", "64", "--rl-rollout-seed", "9",
        "--rl-stop-token-ids", "3", "7", "--rl-rollout-dtype", "fp32", "--no-rl-rollout-progress",
    )  # fmt: skip
    config.validate(RunConfig())
    assert config.urls == ("http://a:30000", "http://b:30000") and not config.embedded
    assert (config.api_key, config.concurrency, config.timeout_s, config.retries) == (
        "k",
        8,
        30.0,
        2,
    )
    assert (
        config.on_server_failure == "fail" and config.dtype == "fp32" and config.progress is False
    )
    sampling = config.sampling_params()
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens) == (
        0.7,
        0.9,
        50,
        64,
    )
    assert sampling.stop_token_ids == (3, 7)
    defaults = parse()
    defaults.validate(RunConfig())
    assert defaults.embedded and defaults.temperature == 1.0 and defaults.host == "127.0.0.1"
    assert defaults.quantization == "none"
    assert parse("--rl-rollout-quantization", "w8a8_fp8").quantization == "w8a8_fp8"


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"urls": ("localhost:30000",)}, "--rl-rollout-url"),
        ({"urls": ("http://a:1", "http://a:1")}, "twice"),
        ({"api_key": " "}, "--rl-rollout-api-key"),
        ({"concurrency": 0}, "--rl-rollout-concurrency"),
        ({"timeout_s": 0.0}, "--rl-rollout-timeout"),
        ({"retries": -1}, "--rl-rollout-retries"),
        ({"temperature": -0.5}, "--rl-temperature"),
        ({"top_p": 0.0}, "--rl-top-p"),
        ({"top_k": 0}, "--rl-top-k"),
        ({"max_new_tokens": 0}, "--rl-max-new-tokens"),
        ({"port": 70000}, "--rl-rollout-port"),
        ({"port": 30000, "num_servers": 2}, "--rl-rollout-num-servers"),
        ({"threads": 0}, "--rl-rollout-threads"),
        ({"quantization": "fp8", "dtype": "fp32"}, "--rl-rollout-quantization fp8 .*bf16"),
        ({"quantization": "fp8", "urls": ("http://a:1",)}, "start SGLang with --quantization"),
    ],
)
def test_validation_names_the_flag(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        RolloutConfig(**changes).validate(RunConfig())
