"""The GPU image's Dockerfile installs this package and names only paths that exist.

Its build needs a Docker engine and NVIDIA's base image, which CI does not have; this
checks what can be checked without building it."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            yield keyword.upper(), rest.strip()


def test_copy_sources_exist_in_the_repository():
    copies = [rest for kw, rest in _instructions() if kw == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_installs_this_package_with_gpu_extra():
    runs = " ".join(rest for kw, rest in _instructions() if kw == "RUN")
    assert re.search(r'pip install -e "?\.\[gpu', runs), "the image must pip install this package"
    assert "sglang" in runs and "megatron-core" in runs
    base = [rest for kw, rest in _instructions() if kw in ("FROM", "ARG")]
    assert any("nvcr.io/nvidia/pytorch" in b for b in base)


def test_paths_set_in_the_image_are_where_files_were_copied():
    workdirs = [rest for kw, rest in _instructions() if kw == "WORKDIR"]
    assert workdirs
    workdir = workdirs[-1]
    envs = " ".join(rest for kw, rest in _instructions() if kw == "ENV")
    for path in re.findall(r"PYTHONPATH=(\S+)", envs):
        for part in path.split(":"):
            assert part == workdir, f"PYTHONPATH entry {part} is not the copied tree {workdir}"
    # Every file the CMD runs was copied into the working directory.
    cmd = [rest for kw, rest in _instructions() if kw == "CMD"][-1]
    for token in re.findall(r'"([^"]+\.py)"', cmd):
        assert (ROOT / token).exists(), token


def test_gpu_extra_pins_live_in_setup_py():
    setup = (ROOT / "setup.py").read_text()
    for name in ("transformer-engine", "apex", "sglang"):
        assert f'"{name}"' in setup
    assert '"gpu": [PINS["transformer-engine"], PINS["apex"], PINS["sglang"]]' in setup
