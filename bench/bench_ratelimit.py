"""Throughput of a generation stage under a server's rate limits: pacing on the x-ratelimit-* headers
vs a fixed concurrency.

The fake OpenAI server (tests/fake_server.py, its own process) enforces an RPM and a TPM limit as
OpenAI does, scaled to a window of --window_s seconds instead of a minute: token buckets holding the
limit and refilling it over the window; a request takes 1 request and its prompt tokens plus all of
its max_tokens, or is answered 429 with Retry-After; every answer carries the x-ratelimit-* headers.
gen_cot.py (one request per GSM8K question) runs against a fresh server (full buckets) with each
client: the pacing client (--pacing headers, --concurrency 256 as its ceiling) and today's client
(--pacing off) at a fixed --concurrency of 4, 32 and 256. For each it prints requests/s, the share
of what the limits allowed during the run (a full bucket at the start plus the refill from the
server's first request to its last answer; the binding limit of the two: requests/s above the
limit's rate is that first bucket), the share of requests answered 429, and the items that failed
after every retry (--max_retries 6). Targets for pacing: >= 90% of the limit with <= 1% answered 429.

    python bench/bench_ratelimit.py [--rpm 300] [--tpm 90000] [--window_s 10] [--latency 0.25] [--items 800]
"""
import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the test doubles
import gen_cot  # noqa: E402

GSM8K = ROOT / "data" / "gsm8k" / "train.jsonl"
MAX_TOKENS = 256


def start_server(args, port_file: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_server.py"), "--problems", str(GSM8K),
                                "--latency", str(args.latency), "--rpm", str(args.rpm), "--tpm", str(args.tpm),
                                "--window_s", str(args.window_s), "--port_file", str(port_file)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()  # "listening on ..." once it serves
    return process


def run(args, pacing: str, concurrency: int, items: int) -> dict:
    """gen_cot over `items` questions against a fresh rate-limited server: the server's counts."""
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args, Path(tmp) / "port")
        try:
            url = f"http://127.0.0.1:{(Path(tmp) / 'port').read_text().strip()}/v1"
            argv = ["--inputs", str(GSM8K), "--limit", str(items), "--base_url", url, "--model", "fake-llm",
                    "--concurrency", str(concurrency), "--pacing", pacing, "--max_tokens", str(MAX_TOKENS),
                    "--output_dir", str(Path(tmp) / "out")]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                gen_cot.main(argv)
            with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as response:
                stats = json.loads(response.read())
            failed = len(json.loads((Path(tmp) / "out" / "cot.stats.json").read_text())["request_failed_ids"])
        finally:
            server.terminate()
            server.wait()
    counts = stats["ratelimit"]
    span = counts["last_at"] - counts["first_at"]
    windows = 1 + span / args.window_s  # what the limits allow in the span: a full bucket, then the refill
    share = max(counts["admitted"] / (args.rpm * windows), counts["admitted_tokens"] / (args.tpm * windows))
    return {"items": items, "span": span, "admitted": counts["admitted"],
            "rejected": counts["rejected"], "rate": counts["admitted"] / span, "share": share,
            "rejected_share": counts["rejected"] / (counts["admitted"] + counts["rejected"]), "failed": failed,
            "max_concurrent": stats["max_concurrent"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rpm", type=int, default=300, help="requests per window")
    p.add_argument("--tpm", type=int, default=90_000, help="tokens (prompt + max_tokens) per window")
    p.add_argument("--window_s", type=float, default=10.0, help="the limits' window (OpenAI's: 60)")
    p.add_argument("--latency", type=float, default=0.25, help="seconds the server takes to answer")
    p.add_argument("--items", type=int, default=800, help="questions per run (half for --concurrency 4)")
    args = p.parse_args()
    clients = [("paced: --pacing headers --concurrency 256", "headers", 256, args.items),
               ("fixed: --pacing off --concurrency 4", "off", 4, args.items // 2),
               ("fixed: --pacing off --concurrency 32", "off", 32, args.items),
               ("fixed: --pacing off --concurrency 256", "off", 256, args.items)]
    results = {name: run(args, pacing, concurrency, items) for name, pacing, concurrency, items in clients}
    print(f"server: {args.rpm} requests and {args.tpm} tokens per {args.window_s:g} s window "
          f"({args.rpm / args.window_s:.1f} requests/s, {args.tpm / args.window_s:.0f} tokens/s), "
          f"{args.latency:g} s latency; requests of ~100 prompt tokens + max_tokens {MAX_TOKENS}")
    print("| client | items | s (server) | requests/s | share of the limit | answered 429 | failed items "
          "| most in flight |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['items']} | {r['span']:.1f} | {r['rate']:.1f} | {r['share']:.1%} | "
              f"{r['rejected']} ({r['rejected_share']:.1%}) | {r['failed']} | {r['max_concurrent']} |")
    paced, *fixed = results.values()
    best = max(fixed, key=lambda r: r["share"])
    best_name = next(name for name, r in results.items() if r is best).split("--concurrency ")[1]
    print(f"paced / fixed 4 = {paced['share'] / fixed[0]['share']:.2f}x the share of the limit; paced / best fixed "
          f"({best_name}) = {paced['share'] / best['share']:.2f}x, answered 429 {paced['rejected_share']:.1%} vs "
          f"{best['rejected_share']:.1%} (targets: paced >= 90% of the limit: "
          f"{'met' if paced['share'] >= 0.9 else 'NOT met'}; <= 1% answered 429: "
          f"{'met' if paced['rejected_share'] <= 0.01 else 'NOT met'})")


if __name__ == "__main__":
    main()
