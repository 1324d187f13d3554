"""Which dtype vLLM serves and evaluates in: decided here, once, and logged with its reason.

bf16 only where the processor computes it natively (x86: AMX or AVX-512 BF16; Arm: the BF16
extension). Elsewhere torch runs bf16 matrix products on a scalar fallback that is so slow that the
vLLM engine stalls (measured on an AVX2-only AMD EPYC: 0 answers in 150 s, fp32 25). On a GPU vLLM
picks from the model's own dtype. `--dtype` (server, eval scripts, chain) or $PERSONAMATH_DTYPE
overrides the choice.
"""
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

ENV_VAR = "PERSONAMATH_DTYPE"
CHOICES = ("auto", "float32", "bfloat16", "float16")
X86_NATIVE_BF16 = ("amx_bf16", "avx512_bf16")
ARM_NATIVE_BF16 = ("bf16",)  # the Linux hwcap name of Armv8.6 BF16 (Graviton3, Neoverse V1/N2, Apple M2)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # a vLLM --dtype value
    reason: str

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "reason": self.reason}


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of /proc/cpuinfo: x86's `flags` lines, Arm's `Features` lines."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.exists() else ""


def choose_dtype(override: str | None = None, *, gpu: bool | None = None, cpuinfo: str | None = None,
                 machine: str | None = None) -> DtypeChoice:
    """The dtype to serve in: `override`, else $PERSONAMATH_DTYPE, else by capability. The keyword
    arguments stand in for this machine's facts (tests give other machines')."""
    for value, source in ((override, "--dtype"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if value and value != "auto":
            if value not in CHOICES:
                raise UserError(f"{source} {value!r}: expected one of {', '.join(CHOICES)}")
            return DtypeChoice(value, f"set by {source}")
    if gpu is None:
        gpu = has_gpu()
    if gpu:
        return DtypeChoice("auto", "GPU: vLLM serves the model in its own dtype (fp16 for a float32 model)")
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)
    native = X86_NATIVE_BF16 if machine in ("x86_64", "amd64", "i686") else ARM_NATIVE_BF16
    found = sorted(flags.intersection(native))
    if found:
        return DtypeChoice("bfloat16", f"CPU ({machine}) computes bf16 natively ({', '.join(found)})")
    return DtypeChoice("float32", f"CPU ({machine}) has no native bf16 ({' or '.join(native)} absent), where "
                                  "torch's bf16 matrix products take a fallback slow enough to stall vLLM")


def has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_dtype(override: str | None = None) -> DtypeChoice:
    """choose_dtype() for this machine, logged on stderr with its reason."""
    choice = choose_dtype(override)
    print(f"[personamath] vLLM dtype {choice.dtype}: {choice.reason}", file=sys.stderr, flush=True)
    return choice
