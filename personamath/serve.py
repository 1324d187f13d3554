"""The embedded local LLM: vLLM's OpenAI-compatible server on 127.0.0.1 with the embedded SmolLM2.

    python -m personamath.serve start [--model DIR] [--state FILE] [--dtype D]   # prints the base URL
    python -m personamath.serve stop [--state FILE]

The stages reach it with `--base_url URL --model SmolLM2-135M-Instruct`. The server runs detached;
its pid, URL and log path are kept in the state file (default runs/server.json).
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .embedded_model import DEFAULT_DIR, ensure_embedded_model
from .errors import UserError, exit_on_user_error
from .inference import cpu_engine_env, on_cpu
from .precision import CHOICES, ENV_VAR, resolve_dtype

SERVED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_STATE = Path("runs/server.json")


def free_port(preferred: int | None = None) -> int:
    """`preferred` when it is free, else any free port on 127.0.0.1."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise UserError("no free port on 127.0.0.1")


def server_command(model: Path, port: int, served_name: str, dtype: str) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--seed", "0", "--disable-uvicorn-access-log"]
    if on_cpu():
        # The same settings as inference.cpu_engine_settings(); with chunked prefill, a per-request
        # seed kills the CPU engine.
        command += ["--enforce-eager", "--no-enable-chunked-prefill", "--distributed-executor-backend", "uni"]
    return command


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start(model: Path = DEFAULT_DIR, state: Path = DEFAULT_STATE, served_name: str = SERVED_NAME,
          timeout: float = 600, dtype: str | None = None, port: int | None = None) -> dict:
    """Start the server detached and wait until it answers; return its state (pid, url, model, log,
    dtype and the reason for it). `dtype` None or "auto": chosen by precision.choose_dtype(). `port`:
    the one to use if it is free (the response cache is keyed by the URL, so a server restarted on the
    same port finds its earlier answers)."""
    choice = resolve_dtype(dtype)
    if state.exists():
        running = json.loads(state.read_text())
        if _healthy(running["url"]) and running.get("dtype") == choice.dtype:
            return running
        stop(state)
    model = ensure_embedded_model(model) if model == DEFAULT_DIR else model
    if not (model / "config.json").is_file():
        raise UserError(f"model {model}: not a model directory")
    port = free_port(port)
    state.parent.mkdir(parents=True, exist_ok=True)
    log = state.with_suffix(".log")
    env = {**os.environ, **(cpu_engine_env() if on_cpu() else {})}
    with log.open("w") as log_file:
        process = subprocess.Popen(server_command(model, port, served_name, choice.dtype), stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    info = {"pid": process.pid, "url": f"http://127.0.0.1:{port}/v1", "model": served_name, "log": str(log),
            "dtype": choice.dtype, "dtype_reason": choice.reason}
    deadline = time.time() + timeout
    while not _healthy(info["url"]):
        if process.poll() is not None or time.time() > deadline:
            _kill(process.pid)
            raise UserError(f"the vLLM server did not start; see {log}")
        time.sleep(1)
    state.write_text(json.dumps(info) + "\n")
    return info


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # the server and its engine processes
    except ProcessLookupError:
        return
    for _ in range(30):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pid, signal.SIGKILL)


def stop(state: Path = DEFAULT_STATE) -> None:
    if not state.exists():
        return
    _kill(json.loads(state.read_text())["pid"])
    state.unlink()


@contextmanager
def embedded_server(state: Path, model: Path = DEFAULT_DIR, dtype: str | None = None):
    info = start(model, state, dtype=dtype)
    try:
        yield info
    finally:
        stop(state)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m personamath.serve",
                                description="Start or stop the embedded local LLM server.")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--model", type=Path, default=DEFAULT_DIR)
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.add_argument("--dtype", choices=CHOICES, default=None,
                   help=f"vLLM dtype (default: ${ENV_VAR}, else bf16 where the CPU computes it natively, else fp32)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    with exit_on_user_error():
        if args.action == "start":
            print(start(args.model, args.state, dtype=args.dtype)["url"])
        else:
            stop(args.state)


if __name__ == "__main__":
    main()
