"""Configuration: keyword-only dataclasses mapped to Megatron-style command-line flags."""

from megatron_rl.config.flags import (
    ConfigError,
    add_config_flags,
    config_from_flags,
    field_help,
    flag_name,
)

__all__ = ["ConfigError", "add_config_flags", "config_from_flags", "field_help", "flag_name"]
