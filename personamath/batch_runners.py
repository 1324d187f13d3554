"""What a batch runner takes and gives, and the runners: the OpenAI Batch API (Files and Batches
endpoints) and vLLM's offline `run_batch` on a local model.

Both read and write the Batch JSONL format: one `{"custom_id", "method": "POST", "url":
"/v1/chat/completions", "body"}` line per request, the body exactly as the online request sends it, and
custom_id = its response-cache key (llm.ResponseCache.key). A runner uploads a file, creates a batch of
it, polls it, reads its output and error files, and cancels it; the driver (batch.py) decides when.
"""
import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

from .errors import UserError
from .llm import CHARS_PER_TOKEN, MESSAGE_OVERHEAD_TOKENS, RETRIED_STATUS, Reply, parse_reply

BATCH_URL = "/v1/chat/completions"
MAX_REQUESTS_PER_FILE = 50_000  # the Batch API's limits per input file
MAX_BYTES_PER_FILE = 200 * 1000 * 1000
TERMINAL = ("completed", "failed", "expired", "cancelled")
VLLM_ENDPOINT = "vllm://localhost/run_batch"  # the cache identity of --batch_runner vllm's answers


# ---------------------------------------------------------------------------------------------
# the Batch JSONL format


def estimated_tokens(body: dict) -> int:
    """Input tokens of a request, roughly (what an enqueued-token limit counts)."""
    return sum(len(m["content"]) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS for m in body["messages"])


def batch_line(key: str, body: dict) -> bytes:
    return (json.dumps({"custom_id": key, "method": "POST", "url": BATCH_URL, "body": body}, ensure_ascii=False)
            + "\n").encode()


def split_files(lines: list[bytes], max_requests: int, max_bytes: int) -> list[list[int]]:
    """Indices of `lines` in consecutive files of at most max_requests lines and max_bytes bytes."""
    files, current, size = [], [], 0
    for i, line in enumerate(lines):
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append(i)
        size += len(line)
    return files + [current] if current else files


def read_result_line(line) -> tuple[str, Reply | str]:
    """One line of an output or error file: ("ok", Reply), ("rejected", why) or ("failed", why).
    Answered means status 200 with a choice that has text, whatever `error` says; a 4xx other than
    408/409/429 is refused for good (its `error` may be null, the reason in the body); the rest fails."""
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    status, body = response.get("status_code"), response.get("body")
    if status == 200 and isinstance(body, dict):
        reply = parse_reply(json.dumps(body))
        return ("ok", reply) if reply is not None else ("failed", "status 200 without a choice with text")
    error = line.get("error")
    if not error and isinstance(body, dict):
        error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message") or error.get("code") or json.dumps(error)
    message = f"status {status}: {error or 'no error given'}" if status is not None else str(error or "no response")
    if isinstance(status, int) and 400 <= status < 500 and status not in RETRIED_STATUS:
        return "rejected", f"HTTP {status}: {error or 'refused'} (in a batch)"
    return "failed", message


def parse_jsonl(text: str) -> tuple[list[dict], int]:
    """The JSON objects of a result file, and the number of lines that are not one."""
    lines, broken = [], 0
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            broken += 1
            continue
        if isinstance(record, dict):
            lines.append(record)
        else:
            broken += 1
    return lines, broken


# ---------------------------------------------------------------------------------------------
# runners


class RunnerError(Exception):
    """A runner call failed; `final`: retrying the same call cannot help."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


class OpenAIRunner:
    """The Files and Batches endpoints of --base_url, through the openai client. Its own retries are
    off: creating a batch is not idempotent, and the driver retries at the next poll, creating only
    after looking for a batch already made from the same file."""
    name, resumable, max_in_flight = "openai", True, None

    def __init__(self, llm, args):
        self.base_url, self.api_key = llm.base_url, llm.api_key
        self.timeout = max(args.timeout, 600.0)  # an upload of up to 200 MB
        self.poll_interval = args.batch_poll_interval
        self.client = None

    async def open(self) -> None:
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    @staticmethod
    def _error(err) -> RunnerError:
        import openai

        status = getattr(err, "status_code", None)
        final = isinstance(err, openai.APIStatusError) and status < 500 and status not in RETRIED_STATUS
        return RunnerError(f"{type(err).__name__}: {err}", final=final)

    async def _call(self, coro):
        import openai

        try:
            return await coro
        except openai.APIError as err:
            raise self._error(err) from None

    async def upload(self, record: dict, data: bytes) -> None:
        file = await self._call(self.client.files.create(file=(f"{record['local_id']}.jsonl", data), purpose="batch"))
        record["file_id"] = file.id

    async def create(self, record: dict) -> bool:
        """Create the batch of the uploaded file, or adopt the one a killed run created; True if adopted."""
        try:
            found = await self._call(self._batch_of(record["file_id"], since=record["created"] - 60))
        except RunnerError as err:
            if not err.final:  # whether a batch exists for the file is unknown: try again later
                raise
            found = None  # an endpoint that lists no batches: nothing to adopt
        if found is not None:
            record["batch_id"] = found
            return True
        batch = await self._call(self.client.batches.create(
            input_file_id=record["file_id"], endpoint=BATCH_URL, completion_window="24h",
            metadata={"personamath_batch": record["local_id"]}))
        record["batch_id"] = batch.id
        return False

    async def _batch_of(self, file_id: str, since: float) -> str | None:
        """The id of a batch made from this file, looking through those created since `since`."""
        async for batch in self.client.batches.list(limit=100):  # newest first, every page
            if batch.input_file_id == file_id:
                return batch.id
            if batch.created_at < since:
                return None
        return None

    async def poll(self, record: dict) -> str:
        batch = await self._call(self.client.batches.retrieve(record["batch_id"]))
        record["output_file_id"], record["error_file_id"] = batch.output_file_id, batch.error_file_id
        errors = (batch.errors.data if batch.errors and batch.errors.data else None) or []
        record["errors"] = [{"code": e.code, "message": e.message} for e in errors]
        return batch.status

    async def results(self, record: dict) -> tuple[list[dict], int]:
        lines, broken = [], 0
        for file_id in (record.get("output_file_id"), record.get("error_file_id")):
            if file_id:
                content = await self._call(self.client.files.content(file_id))
                more, bad = parse_jsonl(content.content.decode("utf-8", errors="replace"))
                lines += more
                broken += bad
        return lines, broken

    async def cancel(self, record: dict) -> None:
        await self._call(self.client.batches.cancel(record["batch_id"]))


def engine_flags(settings: dict) -> list[str]:
    """vLLM engine keyword arguments as command-line flags: {"enforce_eager": True} -> --enforce-eager."""
    flags = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            flags.append(f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


class VLLMRunner:
    """vLLM's offline batch runner on a local model: one `run_batch` process per batch, one at a time,
    its files under OUTPUT_DIR/batches/. Not resumable: a killed run redoes the round it was in."""
    name, resumable, max_in_flight, poll_interval = "vllm", False, 1, 0.5

    def __init__(self, args, output_dir: Path):
        self.model_dir = Path(args.vllm_model_dir or args.model)
        if not (self.model_dir / "config.json").is_file():
            raise UserError(f"--batch_runner vllm: {self.model_dir} is not a model folder (pass the folder as --model "
                            f"or --vllm_model_dir; `python -m personamath.embedded_model` prints the embedded one)")
        self.served_name = args.model
        self.dtype, self.extra = args.vllm_dtype, shlex.split(args.vllm_args or "")
        self.folder = Path(output_dir) / "batches"
        self.processes = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.kill()
                await process.wait()
        self.processes.clear()

    def paths(self, record: dict) -> tuple[Path, Path, Path]:
        stem = self.folder / record["local_id"]
        return stem.with_suffix(".input.jsonl"), stem.with_suffix(".output.jsonl"), stem.with_suffix(".log")

    def command(self, input_path: Path, output_path: Path) -> tuple[list[str], dict]:
        from .inference import cpu_engine_env, cpu_engine_settings, on_cpu
        from .precision import resolve_dtype

        command = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(input_path), "-o",
                   str(output_path), "--model", str(self.model_dir), "--served-model-name", self.served_name,
                   "--dtype", resolve_dtype(self.dtype).dtype, "--seed", "0"]
        env = dict(os.environ)
        if on_cpu():  # as serve.py starts it: no CUDA graphs, no chunked prefill, the engine in one process
            command += [*engine_flags(cpu_engine_settings()), "--distributed-executor-backend", "uni"]
            env.update(cpu_engine_env())
        return command + self.extra, env

    async def upload(self, record: dict, data: bytes) -> None:
        input_path, _, _ = self.paths(record)
        self.folder.mkdir(parents=True, exist_ok=True)
        input_path.write_bytes(data)
        record["file_id"] = str(input_path)

    async def create(self, record: dict) -> bool:
        input_path, output_path, log = self.paths(record)
        output_path.unlink(missing_ok=True)
        command, env = await asyncio.to_thread(self.command, input_path, output_path)
        with log.open("w") as log_file:
            self.processes[record["local_id"]] = await asyncio.create_subprocess_exec(
                *command, stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env)
        record["batch_id"] = f"vllm-run_batch-pid{self.processes[record['local_id']].pid}"
        return False

    async def poll(self, record: dict) -> str:
        process = self.processes.get(record["local_id"])
        if process is None:
            return "failed"
        if process.returncode is None:
            return "in_progress"
        _, _, log = self.paths(record)
        if process.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
            record["errors"] = [{"code": f"exit {process.returncode}", "message": f"see {log}: " + " | ".join(tail)}]
            return "failed"
        return "completed"

    async def results(self, record: dict) -> tuple[list[dict], int]:
        _, output_path, _ = self.paths(record)
        if not output_path.is_file():
            return [], 0
        return parse_jsonl(output_path.read_text(errors="replace"))

    async def cancel(self, record: dict) -> None:
        process = self.processes.get(record["local_id"])
        if process is not None and process.returncode is None:
            process.kill()
