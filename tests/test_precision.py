"""The dtype decision: bf16 only where the processor computes it natively, fp32 elsewhere, the GPU's
own choice on a GPU, and the override before all of them."""
import platform
import subprocess

import pytest

from personamath.errors import UserError
from personamath.precision import ENV_VAR, choose_dtype, cpu_flags

# /proc/cpuinfo as each kind of machine writes it (abridged)
AMD_EPYC_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni\n"
INTEL_SKYLAKE_AVX512 = "flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni\n"
INTEL_COOPER_LAKE = "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
INTEL_SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AMD_ZEN4 = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve svebf16 i8mm bf16 dgh rng\n"


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("machine, cpuinfo, expected", [
    ("x86_64", AMD_EPYC_AVX2, "float32"),
    ("x86_64", INTEL_SKYLAKE_AVX512, "float32"),  # AVX-512 without its BF16 extension
    ("x86_64", INTEL_COOPER_LAKE, "bfloat16"),
    ("x86_64", INTEL_SAPPHIRE_RAPIDS, "bfloat16"),
    ("x86_64", AMD_ZEN4, "bfloat16"),
    ("aarch64", GRAVITON2, "float32"),
    ("aarch64", GRAVITON3, "bfloat16"),
    ("x86_64", "", "float32"),  # no /proc/cpuinfo: the safe choice
    ("x86_64", GRAVITON3, "float32"),  # an Arm flag name means nothing on x86
])
def test_dtype_by_cpu_flags(machine, cpuinfo, expected):
    choice = choose_dtype(gpu=False, cpuinfo=cpuinfo, machine=machine)
    assert choice.dtype == expected
    assert machine in choice.reason
    assert ("natively" in choice.reason) == (expected == "bfloat16")


def test_svebf16_alone_is_not_bf16():
    """Only the exact flag counts: `svebf16` must not be read as `bf16`."""
    assert "bf16" not in cpu_flags("Features\t: fp asimd sve svebf16\n")
    assert choose_dtype(gpu=False, cpuinfo="Features\t: fp asimd sve svebf16\n", machine="aarch64").dtype == "float32"


def test_gpu_leaves_the_choice_to_vllm():
    assert choose_dtype(gpu=True, cpuinfo=AMD_EPYC_AVX2, machine="x86_64").dtype == "auto"


def test_override_wins_in_order(monkeypatch):
    assert choose_dtype("bfloat16", gpu=False, cpuinfo=AMD_EPYC_AVX2, machine="x86_64").dtype == "bfloat16"
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    choice = choose_dtype(gpu=False, cpuinfo=AMD_EPYC_AVX2, machine="x86_64")
    assert choice.dtype == "bfloat16" and ENV_VAR in choice.reason
    assert choose_dtype("float32", gpu=False, cpuinfo=INTEL_SAPPHIRE_RAPIDS, machine="x86_64").dtype == "float32"
    assert choose_dtype("auto", gpu=False, cpuinfo=AMD_EPYC_AVX2, machine="x86_64").dtype == "bfloat16"  # env
    monkeypatch.setenv(ENV_VAR, "bf16")
    with pytest.raises(UserError, match=ENV_VAR):
        choose_dtype(gpu=False, cpuinfo=AMD_EPYC_AVX2, machine="x86_64")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the grep is x86's")
def test_this_machine_agrees_with_its_flags():
    """The choice for the machine the tests run on, checked against grep, as the README tells users."""
    found = subprocess.run(["grep", "-o", "-w", "-E", "avx512_bf16|amx_bf16", "/proc/cpuinfo"],
                           capture_output=True, text=True).stdout.split()
    choice = choose_dtype(gpu=False)
    assert choice.dtype == ("bfloat16" if found else "float32"), choice.reason
