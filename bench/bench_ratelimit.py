"""Generation at a rate-limited server's real limits: the share of the limit a stage reaches and the share
of its requests answered 429, for every way a provider may enforce its limits.

The fake OpenAI server (tests/fake_server.py, its own process) enforces an RPM or a TPM limit scaled to
a window of --window_s seconds instead of a minute: over the whole window (a full minute's quota may
burst), or also over slices of window / 60 (OpenAI: "60,000 RPM may be enforced as 1,000
requests/second"); with or without the x-ratelimit-* headers; counting refused requests against the
limit or not. gen_cot.py (one request per GSM8K question, --pacing headers, --concurrency 256) runs
against a fresh server in each case, and in the shared cases two gen_cot processes run at once on the
same limits. For each case: the share of the limit reached (admitted requests, or tokens, a second
against the limit's rate) in the first window (above 100% where a client spends the burst a full
window's quota allows) and after it (the steady state: the first window's end to the last admitted
request), and the share answered 429 over the whole run; for two clients, measured while both send (the
second's first request to the first one's last; the server tells them apart by model name), each one's
admitted requests/s then and its 429s over its run.
Targets: >= 95% of the limit with <= 1% answered 429, from the first window on; two clients together
>= 90%, each <= 1% 429s, neither starved. --pacing off at --concurrency 256 is the baseline.

    python bench/bench_ratelimit.py [--rpm 900] [--window_s 30] [--latency 0.25] [--seconds 30] [--quick]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT / "data" / "gsm8k" / "train.jsonl"
MAX_TOKENS = 256
TOKENS_PER_REQUEST = 100 + MAX_TOKENS  # about: a GSM8K solve prompt and all of max_tokens


def start_server(args, port_file: Path, case: dict) -> subprocess.Popen:
    # Both limits, as OpenAI has: the other one at twice what the run needs
    rpm, tpm = args.rpm, args.rpm * TOKENS_PER_REQUEST
    limit = ["--rpm", str(rpm), "--tpm", str(2 * tpm)] if case["bound"] == "RPM" else ["--rpm", str(2 * rpm),
                                                                                        "--tpm", str(tpm)]
    command = [sys.executable, str(ROOT / "tests" / "fake_server.py"), "--problems", str(GSM8K), "--latency",
               str(args.latency), *limit, "--window_s", str(args.window_s), "--port_file", str(port_file)]
    if case["enforce"] == "second":
        command += ["--enforce_s", str(args.window_s / 60)]
    if not case["headers"]:
        command.append("--no_ratelimit_headers")
    if case["count_refused"]:
        command.append("--count_refused")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()  # "listening on ..." once it serves
    return process


def gen_cot(url: str, out: Path, items: int, offset: int, pacing: str, model: str) -> subprocess.Popen:
    inputs = out / "questions.jsonl"
    out.mkdir(parents=True)
    with GSM8K.open() as f:
        lines = f.readlines()[offset:offset + items]
    inputs.write_text("".join(lines))
    return subprocess.Popen([sys.executable, str(ROOT / "gen_cot.py"), "--inputs", str(inputs), "--base_url", url,
                             "--model", model, "--concurrency", "256", "--pacing", pacing, "--max_tokens",
                             str(MAX_TOKENS), "--output_dir", str(out), "--stall_timeout", "120"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(out / "stderr.log", "w"), text=True)


def run_case(args, case: dict, pacing: str = "headers") -> dict:
    """gen_cot (one or two processes) against a fresh rate-limited server: the server's verdicts."""
    rate = args.rpm / args.window_s  # requests a second the limit allows (tokens: as many requests' worth)
    # Enough to go on past the first window for --seconds at the limit, after a whole window's burst
    items = int(rate * (args.window_s + args.seconds)) + (args.rpm if case["enforce"] == "minute" else 0)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args, Path(tmp) / "port", case)
        try:
            url = f"http://127.0.0.1:{(Path(tmp) / 'port').read_text().strip()}/v1"
            clients = [gen_cot(url, Path(tmp) / f"client{i}", items // case["clients"], offset=i * items,
                               pacing=pacing, model=f"fake-llm-{i}") for i in range(case["clients"])]
            for client in clients:
                client.wait()
            with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as response:
                stats = json.loads(response.read())
            ledgers = [json.loads((Path(tmp) / f"client{i}" / "cot.stats.json").read_text())["ledger"]
                       for i in range(case["clients"])]
        finally:
            server.terminate()
            server.wait()
    counts = stats["ratelimit"]
    answers = counts["answers"]  # (seconds since the first request, admitted, tokens, the client's model)
    models = [f"fake-llm-{i}" for i in range(case["clients"])]
    # The limits reached while every client was sending: from the last one's first request to the first
    # one's last admitted request (each client's own requests/s and 429s over the same span)
    together_from = max(min(t for t, _, _, m in answers if m == model) for model in models)
    span = min(max(t for t, ok, _, m in answers if ok and m == model) for model in models)
    unit = 1 if case["bound"] == "RPM" else TOKENS_PER_REQUEST

    def share(start: float, end: float) -> float:
        admitted = sum(1 if case["bound"] == "RPM" else tokens for t, ok, tokens, _ in answers if ok and start <= t < end)
        return admitted / (rate * unit * (end - start))  # against the limit's steady rate

    refused = counts["rejected"] / max(1, counts["admitted"] + counts["rejected"])
    first = min(together_from + args.window_s, span)
    per_client = []
    for model, ledger in zip(models, ledgers):
        mine = [(t, ok) for t, ok, _, m in answers if m == model and together_from <= t < span]
        per_client.append({"requests": ledger["requests"], "rate_limited": ledger["rate_limited"],
                           "requests_per_s": sum(ok for _, ok in mine) / max(span - together_from, 1e-9)})
    return {"share": share(first, span) if span > first + 1 else float("nan"),
            "first_window": share(together_from, first), "refused": refused,
            "requests": counts["admitted"] + counts["rejected"], "span": span, "clients": per_client}


def cases(quick: bool) -> list[dict]:
    found = []
    for bound in ("RPM", "TPM"):
        for enforce in ("minute", "second"):
            for headers in (True, False):
                for count_refused in (False, True):
                    found.append({"bound": bound, "enforce": enforce, "headers": headers,
                                  "count_refused": count_refused, "clients": 1})
    for headers in (True, False):
        found.append({"bound": "RPM", "enforce": "second", "headers": headers, "count_refused": True, "clients": 2})
    if quick:
        found = [c for c in found if c["bound"] == "RPM" and (c["count_refused"] or c["clients"] == 2)]
    return found


def describe(case: dict) -> str:
    return (f"{case['bound']}, per {case['enforce']}, {'headers' if case['headers'] else 'no headers'}, "
            f"{'refusals counted' if case['count_refused'] else 'refusals free'}"
            + (", 2 clients" if case["clients"] == 2 else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rpm", type=int, default=900, help="requests per window (TPM cases: as many requests' tokens)")
    p.add_argument("--window_s", type=float, default=30.0, help="the limits' window (OpenAI's: 60; per-second "
                                                                      "slices are window / 60)")
    p.add_argument("--latency", type=float, default=0.25, help="seconds the server takes to answer")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="how long the run goes on at the limit after its first window (sets the items)")
    p.add_argument("--quick", action="store_true", help="RPM cases with refusals counted, and the shared ones")
    p.add_argument("--only", default=None, help="the cases whose description holds this text, e.g. 'no headers'")
    p.add_argument("--baseline", action="store_true", help="also --pacing off at --concurrency 256 on each case")
    args = p.parse_args()
    print(f"server: {args.rpm} requests (or {args.rpm * TOKENS_PER_REQUEST:,} tokens) per {args.window_s:g} s "
          f"window ({args.rpm / args.window_s:.0f} requests/s), per-second slices of {args.window_s / 60:.3f} s, "
          f"{args.latency:g} s latency; gen_cot --concurrency 256, {args.seconds:g} s of requests at the limit")
    print("| case | client | share of the limit after the first window | in the first window | answered 429 | "
          "requests | per client (requests/s, 429s) | targets |")
    print("|---|---|---|---|---|---|---|---|")
    met = True
    for case in [c for c in cases(args.quick) if args.only is None or args.only in describe(c)]:
        for pacing in (["headers", "off"] if args.baseline else ["headers"]):
            r = run_case(args, case, pacing)
            per_client = "; ".join(f"{c['requests_per_s']:.1f}/s, {c['rate_limited']}" for c in r["clients"])
            if case["clients"] == 1:
                ok = r["share"] >= 0.95 and r["first_window"] >= 0.95 and r["refused"] <= 0.01
            else:
                rates = [c["requests_per_s"] for c in r["clients"]]
                ok = (r["share"] >= 0.90 and min(rates) >= 0.5 * max(rates)
                      and all(c["rate_limited"] <= 0.01 * c["requests"] for c in r["clients"]))
            met &= ok or pacing == "off"
            print(f"| {describe(case)} | {'paced' if pacing == 'headers' else 'fixed 256'} | {r['share']:.1%} | "
                  f"{r['first_window']:.1%} | {r['refused']:.1%} | {r['requests']} | {per_client} | "
                  f"{('met' if ok else 'NOT met') if pacing == 'headers' else '-'} |", flush=True)
    print(f"targets {'met in every case' if met else 'NOT met in some case (above)'}")


if __name__ == "__main__":
    main()
