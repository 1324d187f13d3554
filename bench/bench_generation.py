"""Throughput of a generation stage against a server of known capacity, concurrent vs sequential.

The fake OpenAI server (tests/fake_server.py, its own process) answers every request after a
fixed latency L with M parallel slots: its capacity is M / L requests/s. gen_cot.py (one request per
question here) runs over N GSM8K questions with --concurrency M, then over a few with --concurrency 1,
each with a fresh cache. Prints items/s of both, the concurrent run's share of the server's capacity,
and the ratio. Target at M = 32: >= 90% of capacity and >= 20x sequential.

    python bench/bench_generation.py [--slots 32] [--latency 0.5] [--items 2048] [--sequential_items 16]
"""
import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the test doubles
import gen_cot  # noqa: E402

GSM8K = ROOT / "data" / "gsm8k" / "train.jsonl"


def start_server(latency: float, slots: int, port_file: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_server.py"), "--problems", str(GSM8K),
                                "--latency", str(latency), "--slots", str(slots), "--port_file", str(port_file)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()  # "listening on ..." once it serves
    return process


def items_per_second(url: str, items: int, concurrency: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        argv = ["--inputs", str(GSM8K), "--limit", str(items), "--base_url", url, "--model", "fake-llm",
                "--concurrency", str(concurrency), "--output_dir", out]
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            gen_cot.main(argv)
        return items / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--sequential_items", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.latency, args.slots, Path(tmp) / "port")
        try:
            url = f"http://127.0.0.1:{(Path(tmp) / 'port').read_text().strip()}/v1"
            concurrent = items_per_second(url, args.items, args.slots)
            sequential = items_per_second(url, args.sequential_items, 1)
        finally:
            server.terminate()
            server.wait()
    capacity = args.slots / args.latency
    print(f"server: {args.slots} slots x {args.latency:g} s latency = {capacity:.1f} requests/s capacity")
    print("| client | items | items/s | share of capacity |\n|---|---|---|---|")
    print(f"| gen_cot --concurrency {args.slots} | {args.items} | {concurrent:.1f} | {concurrent / capacity:.1%} |")
    print(f"| gen_cot --concurrency 1 | {args.sequential_items} | {sequential:.2f} | {sequential / capacity:.1%} |")
    print(f"concurrent / sequential = {concurrent / sequential:.1f}x "
          f"(targets: >= 90% of capacity: {'met' if concurrent >= 0.9 * capacity else 'NOT met'}; "
          f">= 20x sequential: {'met' if concurrent >= 20 * sequential else 'NOT met'})")


if __name__ == "__main__":
    main()
