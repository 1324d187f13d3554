"""Headless Chromium (Debian's `chromium` package), driven over the DevTools protocol with aiohttp's
websocket client (no driver package): open a page, evaluate script in it, collect every console error
and uncaught exception, take a screenshot. Used by the viewer's test and bench/bench_viewer.py.

    with Browser() as browser:
        page = browser.open(path)          # waits until document.body.dataset.ready
        page.evaluate("document.title")
        page.errors                         # console errors and exceptions, as text
        page.screenshot(png_path)
"""
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process and a page in it; an event loop in a thread of its own runs the
    protocol, so that the methods are plain calls. `timeout`: seconds any one step may take."""

    def __init__(self, width: int = 1400, height: int = 900, timeout: float = 120.0):
        executable = find_chromium()
        if executable is None:
            raise BrowserError("no Chromium found (apt-get install chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="personamath-chromium-")
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        try:
            endpoint = self._devtools_endpoint()
            self._call(self._connect(endpoint))
        except BaseException:
            self.close()
            raise

    def _devtools_endpoint(self) -> str:
        deadline = time.monotonic() + self.timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            seen.append(line)
            if match := re.search(r"DevTools listening on (ws://\S+)", line):
                threading.Thread(target=self.process.stderr.read, daemon=True).start()  # drain it
                return match.group(1)
        raise BrowserError(f"Chromium did not start: {''.join(seen)[-2000:]}")

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, self.timeout), self.loop).result()

    async def _connect(self, browser_endpoint: str) -> None:
        port = re.search(r":(\d+)/", browser_endpoint).group(1)
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.pending, self.events, self.errors, self.next_id = {}, {}, [], 0
        self.reader = asyncio.ensure_future(self._read())
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            await self._send(method)

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                              for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append(f"log: {params['entry'].get('text')} ({params['entry'].get('url', '')})")
            for waiter in self.events.pop(method, []):
                if not waiter.done():
                    waiter.set_result(params)

    async def _send(self, method: str, **params) -> dict:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        reply = await future
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def _open(self, url: str) -> None:
        loaded = asyncio.get_running_loop().create_future()
        self.events.setdefault("Page.loadEventFired", []).append(loaded)
        await self._send("Page.navigate", url=url)
        await loaded

    def open(self, path, ready: str = "document.body && document.body.dataset.ready === '1'") -> "Browser":
        """Load a file (or URL) and wait until `ready` is true in it; the errors so far are cleared first."""
        self.errors.clear()
        url = path if isinstance(path, str) and "://" in path else Path(path).resolve().as_uri()
        self._call(self._open(url))
        deadline = time.monotonic() + self.timeout
        while not self.evaluate(f"Boolean({ready})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"{url}: not ready after {self.timeout:.0f} s; errors: {self.errors}")
            time.sleep(0.05)
        return self

    def evaluate(self, expression: str):
        """The value of a script expression in the page (awaited if it is a promise)."""
        result = self._call(self._send("Runtime.evaluate", expression=expression, returnByValue=True,
                                       awaitPromise=True))
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:200]}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def screenshot(self, path) -> None:
        data = self._call(self._send("Page.captureScreenshot", format="png"))["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        async def shut():
            for closing in (getattr(self, "ws", None), getattr(self, "session", None)):
                if closing is not None:
                    await closing.close()
        try:
            if getattr(self, "session", None) is not None:
                asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chromium_or_skip(pytest):
    """Chromium's path; where there is none, install Debian's package if this is a root Debian (the
    project's set-up does too), else skip with the reason."""
    if find_chromium() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium here, and it could not be installed (as root on Debian: apt-get install chromium)")
    return path
