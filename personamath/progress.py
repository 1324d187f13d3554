"""A generation stage's progress on stderr, counted in requests, so that a slow server is told apart
from a stuck one: requests answered (from the server or the cache), rows kept, output tokens/s and
the time left.

The bar's total is the most requests the items can still need; an item that finishes with fewer
(a question solved at its first attempt) lowers it, so the time left is an upper bound that tightens.
On a terminal the bar redraws in place; in a log file it is written as a plain line every `interval`
seconds, which is what chain.py shows on the console.
"""
import sys
import time

from tqdm import tqdm


class _Lines:
    """tqdm's output as whole lines: it redraws in place with carriage returns, which a log cannot."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class RequestProgress:
    def __init__(self, desc: str, items: int, max_requests_per_item: int, interval: float = 10.0):
        tty = sys.stderr.isatty()
        self.max_per_item = max_requests_per_item
        self.kept = 0
        self.output_tokens = 0  # generated this run (cached answers are not)
        self.started = time.monotonic()
        self.bar = tqdm(total=items * max_requests_per_item, desc=desc, unit="req", dynamic_ncols=tty,
                        mininterval=0.1 if tty else interval, file=sys.stderr if tty else _Lines(sys.stderr),
                        postfix=self._status())

    def _status(self) -> str:
        rate = self.output_tokens / max(time.monotonic() - self.started, 1e-9)
        return f"kept {self.kept}, {rate:.1f} output tok/s"

    def _postfix(self) -> None:
        self.bar.set_postfix_str(self._status(), refresh=False)

    def request_done(self, completion_tokens: int, cached: bool) -> None:
        if not cached:
            self.output_tokens += completion_tokens
        self._postfix()
        self.bar.update()

    def item_done(self, requests_used: int, kept: int) -> None:
        self.kept += kept
        # Requests this item will never need; never below what was already counted.
        self.bar.total = max(self.bar.n, self.bar.total - max(0, self.max_per_item - requests_used))
        self._postfix()
        self.bar.update(0)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
