import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, from the repo root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# `make test-fast` leaves out the tests marked slow: those that start a vLLM engine (these fixtures,
# eval scripts, the chain) or a DeepSpeed process, and those that grade whole datasets.
ENGINE_FIXTURES = {"vllm_engine", "embedded_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if ENGINE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from personamath.embedded_model import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def vllm_engine(embedded_model):
    """One vLLM engine (CPU) on the embedded model, shared by every test that generates in-process."""
    from personamath.inference import make_llm

    llm = make_llm(str(embedded_model))
    yield llm
    llm.llm_engine.engine_core.shutdown()  # now, while pytest still captures the engine's last log lines


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory, embedded_model):
    """vLLM's OpenAI-compatible server on the embedded model, on a free loopback port, for the session;
    in float32 whatever the CPU, the path every machine can take."""
    from personamath.serve import embedded_server as serve

    with serve(tmp_path_factory.mktemp("server") / "server.json", embedded_model, dtype="float32") as info:
        yield info
