"""A fake of OpenAI's Files and Batches endpoints, on 127.0.0.1 only, for the tests of `--batch`.

Each batch line is answered by tests/fake_server.py's fake LLM: a FakeServer runs beside this one, in the
same event loop, and every line's body is POSTed to it as an online request would be, so a line's answer
(and the inner server's faults and counts) is exactly the online one. `/v1/chat/completions` here is
passed on to it too (what `--batch_fallback online` sends).

The ways real batches go wrong, each configurable (FakeBatchConfig): lines missing from both the output
and the error file (curator #244), lines failed with status 500, lines refused with status 400 in the
output file and `error: null` (openai-openapi #302), status 200 without a choice, batches that expire
with part of their lines answered (curator #226), batches that fail validation (no output at all), a
create whose answer is lost after the batch was made, and slow batches (`completion_seconds`, or `hold`
until release()). Transient faults hit a custom_id the first time it is sent only. `GET /stats` counts
uploads, creates, polls, cancels and, per custom_id, the lines received and the answers delivered.

    python tests/fake_batch_server.py --problems data/gsm8k/train.jsonl --lost 0.1 --expire_batches 1
"""
import argparse
import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from aiohttp import ClientSession, web

from fake_server import FakeServer, FakeServerConfig, InThread, _unit, serve_until_signal
from personamath.data import load_any


@dataclass
class FakeBatchConfig:
    completion_seconds: float = 0.0  # a batch stays in_progress this long before its lines are answered
    hold: bool = False  # batches stay in_progress until release()
    lost: float = 0.0  # custom_ids missing from both files, the first time they are sent
    lost_always: bool = False  # ... every time they are sent
    failed_lines: float = 0.0  # custom_ids answered status 500 in the error file, the first time
    refused: float = 0.0  # custom_ids answered status 400 in the OUTPUT file with `error: null`, every time
    no_choice: float = 0.0  # custom_ids answered status 200 with no choice, the first time
    expire_batches: int = 0  # the first N batches expire, answering only `partial` of their lines
    fail_batches: int = 0  # the first N batches (after those) fail validation: no output file
    partial: float = 0.5
    create_response_lost: int = 0  # the first N creates make the batch, then answer 500
    unavailable: bool = False  # polls (GET /batches/ID) answer 503 while set; batches go on meanwhile
    port: int = 0


def _now() -> int:
    return int(time.time())


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                             status=status)


class FakeBatchServer(InThread):
    def __init__(self, llm_config: FakeServerConfig, config: FakeBatchConfig | None = None):
        self.config = config or FakeBatchConfig()
        self.llm = FakeServer(llm_config)
        self.port = self.config.port
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}  # in creation order
        self._faulted: set[tuple[str, str]] = set()
        self._expire_left, self._fail_left = self.config.expire_batches, self.config.fail_batches
        self._create_lost_left = self.config.create_response_lost
        self._loop = self._thread = self._runner = self._session = None
        self._released = None
        self.reset_stats()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset_stats(self) -> None:
        self._stats = {"uploads": 0, "creates": 0, "batches_made": 0, "retrieves": Counter(), "lists": 0,
                       "cancels": 0, "downloads": 0, "lines_received": Counter(), "answered": Counter(),
                       "refused": Counter(), "failed": Counter(), "lost": Counter(), "online_requests": 0,
                       "batch_status": {}}

    def stats(self) -> dict:
        """A copy: Counters as dicts, and the inner fake LLM's own stats under `llm`."""
        copy = {k: dict(v) if isinstance(v, dict) else v for k, v in self._stats.items()}
        copy["batch_status"] = {b["id"]: b["status"] for b in self.batches.values()}
        copy["batch_inputs"] = {b["id"]: b["input_file_id"] for b in self.batches.values()}
        copy["llm"] = self.llm.stats()
        return copy

    def release(self) -> None:
        """Let held batches go on (thread-safe)."""
        self.config.hold = False
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._released.set)

    # --- files ------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or upload is None or isinstance(upload, str):
            return _error(400, "expected a `file` and purpose=batch")
        data = upload.file.read()
        file = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(data), "created_at": _now(),
                "filename": upload.filename or "upload.jsonl", "purpose": "batch", "status": "processed"}
        self.files[file["id"]] = {**file, "data": data}
        self._stats["uploads"] += 1
        return web.json_response(file)

    def _new_file(self, name: str, lines: list[dict], purpose: str = "batch_output") -> str | None:
        if not lines:
            return None
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": _now(),
                               "filename": name, "purpose": purpose, "status": "processed", "data": data}
        return file_id

    async def _file(self, request: web.Request) -> web.Response:
        file = self.files.get(request.match_info["id"])
        if file is None:
            return _error(404, "no such file")
        return web.json_response({k: v for k, v in file.items() if k != "data"})

    async def _content(self, request: web.Request) -> web.Response:
        file = self.files.get(request.match_info["id"])
        if file is None:
            return _error(404, "no such file")
        self._stats["downloads"] += 1
        return web.Response(body=file["data"], content_type="application/octet-stream")

    # --- batches ----------------------------------------------------------------------------------

    def _public(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._stats["creates"] += 1
        if body.get("input_file_id") not in self.files:
            return _error(400, f"no file {body.get('input_file_id')}")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        batch = {"id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": body["endpoint"],
                 "errors": None, "input_file_id": body["input_file_id"], "completion_window": "24h",
                 "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": _now(),
                 "in_progress_at": None, "expires_at": _now() + 86400, "finalizing_at": None, "completed_at": None,
                 "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
                 "_cancel": asyncio.Event()}
        self.batches[batch["id"]] = batch
        self._stats["batches_made"] += 1
        batch["_task"] = asyncio.ensure_future(self._process(batch))
        if self._create_lost_left > 0:  # made, but the client never hears of it
            self._create_lost_left -= 1
            return _error(500, "the connection was lost (fake)")
        return web.json_response(self._public(batch))

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "no such batch")
        self._stats["retrieves"][batch["id"]] += 1
        if self.config.unavailable:
            return _error(503, "the service is unavailable (fake)")
        return web.json_response(self._public(batch))

    async def _list(self, request: web.Request) -> web.Response:
        self._stats["lists"] += 1
        newest_first = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query.get("limit", 20))
        page = newest_first[:limit]
        return web.json_response({"object": "list", "data": [self._public(b) for b in page],
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None,
                                  "has_more": len(newest_first) > limit})

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "no such batch")
        self._stats["cancels"] += 1
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch["status"], batch["cancelling_at"] = "cancelling", _now()
            batch["_cancel"].set()
        return web.json_response(self._public(batch))

    def _first_time(self, fault: str, custom_id: str) -> bool:
        if (fault, custom_id) in self._faulted:
            return False
        self._faulted.add((fault, custom_id))
        return True

    async def _answer(self, line: dict) -> tuple[str, dict | None]:
        """("output" | "error" | "lost", the result line) for one input line."""
        c, cid = self.config, line["custom_id"]
        self._stats["lines_received"][cid] += 1
        if _unit(f"lost:{cid}") < c.lost and (c.lost_always or self._first_time("lost", cid)):
            self._stats["lost"][cid] += 1
            return "lost", None
        result = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": cid, "error": None}
        request_id = f"req_{uuid.uuid4().hex[:16]}"
        if _unit(f"refused:{cid}") < c.refused:
            self._stats["refused"][cid] += 1
            result["response"] = {"status_code": 400, "request_id": request_id, "body": {"error": {
                "message": "This model's maximum context length is 128 tokens (fake)",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}}
            return "output", result  # in the output file, `error` null: only the status says it failed
        if _unit(f"failed:{cid}") < c.failed_lines and self._first_time("failed", cid):
            self._stats["failed"][cid] += 1
            error = {"message": "The server had an error (fake)", "type": "server_error"}
            result["response"] = {"status_code": 500, "request_id": request_id, "body": {"error": error}}
            return "error", result
        async with self._session.post(f"{self.llm.url}/chat/completions", json=line["body"]) as response:
            status, text = response.status, await response.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        if status == 200 and _unit(f"no_choice:{cid}") < c.no_choice and self._first_time("no_choice", cid):
            body = {**body, "choices": []}
        elif status == 200 and isinstance(body, dict) and body.get("choices"):
            self._stats["answered"][cid] += 1
        result["response"] = {"status_code": status, "request_id": request_id, "body": body}
        return ("output" if status == 200 else "error"), result

    async def _process(self, batch: dict) -> None:
        data = self.files[batch["input_file_id"]]["data"].decode()
        lines = [json.loads(raw) for raw in data.splitlines() if raw.strip()]
        batch["request_counts"]["total"] = len(lines)
        await asyncio.sleep(0.05)
        if self._expire_left == 0 and self._fail_left > 0:
            self._fail_left -= 1
            batch.update(status="failed", failed_at=_now(), errors={"object": "list", "data": [{
                "code": "token_limit_exceeded", "message": "Enqueued token limit reached (fake)", "param": None,
                "line": None}]})
            return
        batch.update(status="in_progress", in_progress_at=_now())
        cancel = batch["_cancel"]
        waits = [asyncio.ensure_future(cancel.wait())]
        if self.config.completion_seconds:
            waits.append(asyncio.ensure_future(asyncio.sleep(self.config.completion_seconds)))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self.config.hold and not cancel.is_set():
            await asyncio.wait([waits[0], asyncio.ensure_future(self._released.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        expire = False
        if cancel.is_set():
            answered_count, ending = 0, ("cancelled", "batch_cancelled")
        elif self._expire_left > 0:
            self._expire_left -= 1
            answered_count, ending, expire = int(len(lines) * self.config.partial), ("expired", "batch_expired"), True
        else:
            answered_count, ending = len(lines), ("completed", None)
        semaphore = asyncio.Semaphore(16)

        async def answer(line):
            async with semaphore:
                return await self._answer(line)

        results = await asyncio.gather(*(answer(line) for line in lines[:answered_count]))
        output = [r for where, r in results if where == "output"]
        errors = [r for where, r in results if where == "error"]
        unanswered = {"code": ending[1], "message": f"This request could not be executed before the batch {ending[0]}."}
        for line in lines[answered_count:]:
            errors.append({"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
                           "response": None, "error": unanswered})
        output.reverse()  # not in input order: results are to be matched by custom_id
        status = ending[0]
        batch.update(status=status, output_file_id=self._new_file(f"{batch['id']}_output.jsonl", output),
                     error_file_id=self._new_file(f"{batch['id']}_error.jsonl", errors),
                     request_counts={"total": len(lines), "completed": len(output),
                                     "failed": len(lines) - len(output)})
        batch[{"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]] = _now()
        if expire:
            batch["errors"] = None

    # --- online, passed on to the fake LLM ------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.Response:
        self._stats["online_requests"] += 1
        async with self._session.post(f"{self.llm.url}/chat/completions", data=await request.read(),
                                      headers={"Content-Type": "application/json"}) as response:
            headers = {k: v for k, v in response.headers.items() if k.lower().startswith("retry-after")}
            return web.Response(body=await response.read(), status=response.status, headers=headers,
                                content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.llm.config.model, "object": "model",
                                                              "created": 0, "owned_by": "fake"}]})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def start(self) -> None:
        await self.llm.start()
        self._session = ClientSession()
        self._released = asyncio.Event()
        app = web.Application(client_max_size=300 * 1024 * 1024)
        app.add_routes([web.post("/v1/files", self._upload), web.get("/v1/files/{id}", self._file),
                        web.get("/v1/files/{id}/content", self._content), web.post("/v1/batches", self._create),
                        web.get("/v1/batches", self._list), web.get("/v1/batches/{id}", self._retrieve),
                        web.post("/v1/batches/{id}/cancel", self._cancel), web.post("/v1/chat/completions", self._chat),
                        web.get("/v1/models", self._models), web.get("/stats", self._get_stats)])
        await self._listen(app)

    async def close(self) -> None:
        for batch in self.batches.values():
            batch["_task"].cancel()
        await self._runner.cleanup()
        await self._session.close()
        await self.llm.close()



def start_in_thread(llm_config: FakeServerConfig, config: FakeBatchConfig | None = None) -> FakeBatchServer:
    """A started server (and its fake LLM), running their own event loop in a daemon thread."""
    server = FakeBatchServer(llm_config, config)
    server._loop = asyncio.new_event_loop()
    server._thread = threading.Thread(target=server._loop.run_forever, name="fake-batch-server", daemon=True)
    server._thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), server._loop).result()
    return server


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=[], help="JSONL files (or datasets) of the known problems")
    p.add_argument("--port", type=int, default=0)
    for name, kind in (("completion_seconds", float), ("lost", float), ("failed_lines", float), ("refused", float),
                       ("no_choice", float), ("expire_batches", int), ("fail_batches", int), ("partial", float),
                       ("create_response_lost", int)):
        p.add_argument(f"--{name}", type=kind, default=getattr(FakeBatchConfig, name))
    args = p.parse_args(argv)
    problems = [problem for path in args.problems for problem in load_any(path)[1]]
    config = FakeBatchConfig(**{k: v for k, v in vars(args).items() if k in FakeBatchConfig.__dataclass_fields__})
    asyncio.run(serve_until_signal(FakeBatchServer(FakeServerConfig(problems=problems), config)))


if __name__ == "__main__":
    main()
