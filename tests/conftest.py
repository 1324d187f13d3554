import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from personamath.errors import exit_on_user_error

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT))  # the stage scripts, for run_here


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, from the repo root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_here(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a stage script's main() as its `__main__` block does (a UserError is one line and exit 2), but in
    this process: the code and the files are the same, and each run saves the interpreter's start (seconds:
    openai's import, the grading workers' math-verify). Tests that kill the process, or change what it
    imports, run it with subprocess. `env` is set for the run. An exception is raised as it is."""
    module = importlib.import_module(Path(script).stem)
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                with exit_on_user_error():
                    code = module.main(list(map(str, args)))
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess([script, *args], code or 0, stdout.getvalue(), stderr.getvalue())


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
