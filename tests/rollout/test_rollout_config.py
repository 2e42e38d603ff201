"""RolloutConfig: flags derived from the fields, validation naming the flag."""

from __future__ import annotations

import argparse

import pytest

from megatron_rl.arguments import RunConfig
from megatron_rl.config.flags import ConfigError, add_config_flags, config_from_flags
from megatron_rl.rollout.config import API_KEY_ENV, RolloutConfig


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


def test_api_key_from_a_private_file_or_the_environment(tmp_path, monkeypatch):
    secret = "s3cret-" + "x" * 40
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert RolloutConfig().resolved_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, secret)
    assert RolloutConfig().resolved_api_key() == secret
    key_file = tmp_path / "rollout.key"
    key_file.write_text(f"  {secret}-file\n")
    key_file.chmod(0o600)
    config = parse("--rl-rollout-api-key-file", str(key_file))
    config.validate(RunConfig())
    # The file comes before the environment, the flag before both.
    assert config.resolved_api_key() == f"{secret}-file"
    assert RolloutConfig(api_key="flag").resolved_api_key() == "flag"
    monkeypatch.setenv(API_KEY_ENV, "")  # empty is unset, as for the embedded server
    assert RolloutConfig().resolved_api_key() is None

    refusals = []
    for mode in (0o640, 0o604):
        key_file.chmod(mode)
        with pytest.raises(ConfigError, match=rf"{key_file} may be read by other users .*chmod 600") as err:
            RolloutConfig(api_key_file=str(key_file)).validate(RunConfig())
        refusals.append(str(err.value))
    key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="--rl-rollout-api-key and --rl-rollout-api-key-file"):
        RolloutConfig(api_key="k", api_key_file=str(key_file)).validate(RunConfig())
    with pytest.raises(ConfigError, match=f"{tmp_path / 'missing'} cannot be read") as missing:
        RolloutConfig(api_key_file=str(tmp_path / "missing")).validate(RunConfig())
    refusals.append(str(missing.value))
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match=f"--rl-rollout-api-key-file {empty} is empty"):
        RolloutConfig(api_key_file=str(empty)).validate(RunConfig())
    monkeypatch.setenv(API_KEY_ENV, "   ")
    with pytest.raises(ConfigError, match=f"\\${API_KEY_ENV} is empty"):
        RolloutConfig().validate(RunConfig())
    assert len(refusals) == 3 and not any(secret in message for message in refusals)
