"""Every flag the example launch scripts pass to pretrain_rl.py exists."""

import re
from pathlib import Path

import pytest

from megatron_rl.arguments import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _launches(text: str) -> bool:
    return any("pretrain_rl.py" in line and not line.lstrip().startswith("#")
               for line in text.splitlines())


SCRIPTS = sorted(
    p for p in (ROOT / "examples").rglob("*")
    if p.suffix in (".sh", ".sbatch") and _launches(p.read_text())
)


def _known_flags() -> set[str]:
    flags = set()
    for action in build_parser()._actions:
        flags.update(action.option_strings)
    return flags


def _pretrain_flags(text: str) -> list[str]:
    logical = re.sub(r"\\\n", " ", text)
    flags = []
    for line in logical.splitlines():
        if "pretrain_rl.py" in line and not line.lstrip().startswith("#"):
            tail = line.split("pretrain_rl.py", 1)[1]
            flags += re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", tail)
    return flags


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_scripts_use_existing_flags(script):
    flags = _pretrain_flags(script.read_text())
    unknown = sorted(set(flags) - _known_flags() - {"--help"})
    assert flags, "found no pretrain_rl.py flags to check"
    assert not unknown, f"{script.name} passes unknown flags {unknown}"


def test_the_launch_scripts_were_found():
    names = {p.name for p in SCRIPTS}
    assert {"train_tiny_cpu.sh", "qwen3_30b_a3b_minirl.sh"} <= names


def test_demo_driver_uses_existing_flags():
    text = (ROOT / "examples" / "demo.py").read_text()
    flags = set(re.findall(r'"(--[a-z][a-z0-9-]*)"', text)) - {"--nproc-per-node",
                                                               "--master-addr", "--master-port",
                                                               "--save", "--nproc"}
    assert flags
    assert not flags - _known_flags(), sorted(flags - _known_flags())
