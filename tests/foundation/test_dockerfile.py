"""The GPU image's Dockerfile agrees with setup.py and never replaces the image's torch.

Its build needs a Docker engine, Docker Hub and an NVIDIA toolchain, which CI does not
have; this checks what can be checked without building it: the versions it installs are
the ones setup.py pins, every path it copies exists, and no pip install in it can swap
the torch that SGLang's image ships (and that sglang pins exactly)."""

import ast
import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TORCH_STACK = {"torch", "torchvision", "torchaudio", "triton"}


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    args = {}
    for kw, rest in _instructions():
        if kw == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def _setup() -> tuple[dict[str, str], str, dict[str, list[str]]]:
    """PINS, APEX_COMMIT and the extras, read from setup.py without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    names: dict = {}
    extras = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("PINS", "APEX_COMMIT"):
                names[node.targets[0].id] = ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            extras = eval(compile(ast.Expression(node.value), "setup.py", "eval"),
                          {"PINS": names["PINS"]})
    return names["PINS"], names["APEX_COMMIT"], extras


def _commands(shell: str) -> list[list[str]]:
    """A RUN line's simple commands (split at &&, ||, |, ;, outside quotes)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in ("&&", "||", "|", ";"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [*commands, words]


def _pip_installs() -> list[tuple[list[str], bool]]:
    """Each pip install's words (ARGs substituted), and whether ENV PIP_CONSTRAINT was
    in force for it."""
    args, constrained, installs = _args(), False, []
    for kw, rest in _instructions():
        if kw == "ENV" and "PIP_CONSTRAINT=" in rest:
            constrained = True
        if kw != "RUN":
            continue
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        for words in _commands(rest):
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)  # VAR=value prefixes
            if words[:2] == ["pip", "install"]:
                installs.append((words[2:], constrained))
    return installs


def _requirements(words: list[str]) -> list[Requirement]:
    reqs, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("-c", "-r", "--constraint", "--config-settings"):
            skip = True
        elif not word.startswith("-") and word != ".":
            reqs.append(Requirement(word))
    return reqs


def test_installs_pin_what_setup_py_pins():
    pins, apex_commit, _ = _setup()
    by_name = {canonicalize_name(Requirement(spec).name): Requirement(spec)
               for key, spec in pins.items() if key != "megatron-core-cpu"}
    checked = set()
    for words, _ in _pip_installs():
        for req in _requirements(words):
            name = canonicalize_name(req.name)
            if req.url:
                assert name == "apex", f"{req}: only apex comes from a git URL"
                assert req.url.endswith("@" + apex_commit), f"{req.url} is not APEX_COMMIT"
                checked.add(name)
                continue
            if name not in by_name:
                continue
            pin = by_name[name]
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:  # the image's version must be one setup.py accepts
                assert pin.specifier.contains(exact[0], prereleases=True), (req, pin)
            else:
                assert req.specifier == pin.specifier, (req, pin)
            assert req.extras == pin.extras, (req, pin)
            checked.add(name)
    assert {"megatron-core", "transformer-engine", "sglang-router", "wandb", "apex",
            "reasoning-gym"} <= checked, checked
    # The tested megatron-core.
    assert _args()["MEGATRON_CORE_VERSION"] == "0.19.2"


def test_starts_from_the_sglang_release_setup_py_pins():
    pins, _, _ = _setup()
    sglang = Requirement(pins["sglang"])
    (version,) = [s.version for s in sglang.specifier if s.operator == "=="]
    base = _args()["SGLANG_IMAGE"]
    assert base == f"lmsysorg/sglang:v{version}", base
    assert ("FROM", "${SGLANG_IMAGE}") in _instructions()


def test_no_pip_install_can_replace_the_images_torch():
    installs = _pip_installs()
    assert installs
    for words, constrained in installs:
        named = {canonicalize_name(r.name) for r in _requirements(words)}
        assert not named & TORCH_STACK, f"pip install {' '.join(words)} names torch"
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"} & set(words)
        assert "--no-deps" in words or constrained, (
            f"pip install {' '.join(words)}: neither --no-deps nor under PIP_CONSTRAINT")
    # The constraints file holds the image's torch stack, and the build stops without it.
    runs = " ".join(rest for kw, rest in _instructions() if kw == "RUN")
    made = re.search(r"pip list --format=freeze\s*\|\s*grep -iE '([^']+)'\s*>\s*(\S+)", runs)
    assert made, "the constraints file must come from the image's installed packages"
    pattern, path = made.groups()
    for package in ("torch", "triton", "sglang", "nvidia-nccl-cu13"):
        assert re.match(pattern, f"{package}==1.0", re.IGNORECASE), package
    assert f"grep -q '^torch==' {path}" in runs
    assert ("ENV", f"PIP_CONSTRAINT={path}") in _instructions()


def test_compiled_extensions_build_against_the_images_torch():
    for words, _ in _pip_installs():
        names = {canonicalize_name(r.name) for r in _requirements(words)}
        if names & {"transformer-engine", "apex"}:
            assert "--no-build-isolation" in words, words


def test_gpu_extra_resolves_with_pip():
    """No git URL (pip would clone and build apex even where it is installed, and fail
    offline), no sglang[all] (diffusion and tracing extras serving does not need)."""
    _, _, extras = _setup()
    for spec in extras["gpu"]:
        req = Requirement(spec)
        assert req.url is None, spec
        assert canonicalize_name(req.name) != "apex", spec
        if req.name == "sglang":
            assert not req.extras, spec
    assert {canonicalize_name(Requirement(s).name) for s in extras["gpu"]} == {
        "transformer-engine", "sglang", "sglang-router"}


def test_copy_sources_exist_in_the_repository():
    copies = [rest for kw, rest in _instructions() if kw == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_installs_this_package_and_paths_point_at_it():
    installs = [words for words, _ in _pip_installs()]
    assert ["--no-deps", "-e", "."] in installs, "the image must pip install this package"
    workdir = [rest for kw, rest in _instructions() if kw == "WORKDIR"][-1]
    envs = " ".join(rest for kw, rest in _instructions() if kw == "ENV")
    for path in re.findall(r"PYTHONPATH=(\S+)", envs):
        for part in path.split(":"):
            assert part == workdir, f"PYTHONPATH entry {part} is not the copied tree {workdir}"
    cmd = [rest for kw, rest in _instructions() if kw == "CMD"][-1]
    for token in re.findall(r'"([^"]+\.py)"', cmd):
        assert (ROOT / token).exists(), token


def test_readme_says_the_image_is_not_built_here():
    readme = (ROOT / "README.md").read_text()
    assert "docker build -t megatron_rl ." in readme
    assert "not built in CI" in readme
