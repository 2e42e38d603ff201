"""Every repository path named in the docs, docstrings, comments, examples and the
Makefile exists, and every ``megatron_rl.x.y`` they name resolves to a module (or a name
defined in one): a renamed module or a removed script must not leave a stale pointer."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_rl"

TOP = r"(?:megatron_rl|tests|benchmarks|examples|docs|tools|\.ci)"
SUBPACKAGES = "|".join(sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()))
# A path from the repository root, or one inside the package (``training/rl_loop.py``).
ROOT_PATH = re.compile(rf"(?<![\w/.-]){TOP}/[\w./-]*\w")
PACKAGE_PATH = re.compile(rf"(?<![\w/.-])(?:{SUBPACKAGES})/[\w/-]+\.py\b")
PLACEHOLDER = re.compile(r"[<>{}*$]")


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "Dockerfile", ROOT / "pretrain_rl.py",
             ROOT / "setup.py", ROOT / ".ci" / "run"]
    files += sorted((ROOT / "docs").glob("*.md"))
    for folder in ("megatron_rl", "tools", "benchmarks", "examples"):
        files += sorted(p for p in (ROOT / folder).rglob("*")
                        if p.suffix in (".py", ".sh", ".sbatch", ".md") and p.is_file())
    return [f for f in files if f.exists()]


def _named_paths(text: str) -> set[str]:
    names = set(ROOT_PATH.findall(text)) | set(PACKAGE_PATH.findall(text))
    return {n.rstrip(".") for n in names if not PLACEHOLDER.search(n)}


def _exists(name: str) -> bool:
    return (ROOT / name).exists() or (PACKAGE / name).exists()


# ``megatron_rl.log`` and the like are file names, not modules.
DOTTED = re.compile(r"(?<![\w.])megatron_rl(?:\.\w+)+(?!\w)(?<!\.log)(?<!\.json)(?<!\.jsonl)")


def _module_file(parts: list[str]) -> Path | None:
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _dotted_resolves(name: str) -> bool:
    """``megatron_rl.a.b`` is a module, or a module plus one name defined in it."""
    parts = name.split(".")
    if _module_file(parts):
        return True
    module = _module_file(parts[:-1])
    if module is None:
        return False
    name = parts[-1]
    defined = rf"^\s*(?:def|class|async def)\s+{name}\b|^\s*{name}\s*[:=]"
    imported = rf"^from [\w.]+ import [^\n]*\b{name}\b|^\s+{name},?$"  # a re-export
    return re.search(f"{defined}|{imported}", module.read_text(), re.M) is not None


def test_the_scanner_finds_paths_and_misses_nothing_it_should_see():
    text = "see megatron_rl/training/rl_loop.py and `training/nope.py`; docs/ARCHITECTURE.md."
    assert _named_paths(text) == {"megatron_rl/training/rl_loop.py", "training/nope.py",
                                  "docs/ARCHITECTURE.md"}
    assert not _exists("training/nope.py") and _exists("training/rl_loop.py")
    assert _dotted_resolves("megatron_rl.inference.server")
    assert _dotted_resolves("megatron_rl.data.teachers.hedging_teacher")
    assert not _dotted_resolves("megatron_rl.rollout.server")
    assert not _dotted_resolves("megatron_rl.data.teachers.careless_sign_teacher")


def test_every_named_path_exists():
    missing = []
    for source in _sources():
        for name in sorted(_named_paths(source.read_text(errors="replace"))):
            if not _exists(name):
                missing.append(f"{source.relative_to(ROOT)} names {name}")
        for name in sorted(set(DOTTED.findall(source.read_text(errors="replace")))):
            if not _dotted_resolves(name):
                missing.append(f"{source.relative_to(ROOT)} names {name}")
    assert not missing, "stale paths:\n" + "\n".join(missing)
