"""A full-scale rehearsal: the whole generation chain on every GSM8K and MATH train question, against a
simulated gpt-4o-mini account, with faults and a kill in the middle.

chain.py --recipe paper-v1 --stop_after dataset (gen_cot -> persona_augment -> reflection ->
build_dataset with the LLM judge) runs against the fake OpenAI server (tests/fake_server.py, its own
process) shaped like a Tier-2 account (5,000 RPM and 2,000,000 TPM per minute, prompt + max_tokens
counted, the x-ratelimit-* headers) with time compressed --factor times: the limits are factor times
Tier 2's (over a minute, as OpenAI's), the answers take latency/factor s (log-normal, median --latency,
sigma --latency_sigma: a long tail), and the client's --timeout and --stall_timeout are divided alike. Faults at a low rate (--faults: 500s,
malformed and empty answers, answers slower than the timeout, truncations, stray 429s). Once
persona_augment is --kill_at of the way, the chain and all its processes are killed (SIGKILL), and the
same command resumes it.

It prints, for each step and in all, the wall time against the ideal the limits allow (the requests
and tokens the server admitted during the step, at the limits' rate), the share answered 429, the client's CPU time per 1,000 requests, the peak memory of each
step, the rows kept, the ledger against the server's bill, and the checks: every question accounted
for once, no row twice, every rewrite accounted for, no answer paid twice. Then the same figures scaled
back to the real account (x factor).

    python bench/bench_rehearsal.py [--factor 12] [--n_gsm8k all --n_math all] [--judge_top_k 10]
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from chain import latest_line  # noqa: E402
from personamath.jsonl import read_jsonl  # noqa: E402
from personamath.llm import ResponseCache, cost_of, price_of  # noqa: E402

TRAIN = [ROOT / "data" / "gsm8k" / "train.jsonl", ROOT / "data" / "math" / "MATH_train.jsonl"]
TEST = [ROOT / "data" / "gsm8k" / "test.jsonl", ROOT / "data" / "math" / "MATH_test.jsonl"]
STEPS = ("gen_cot", "persona_augment", "reflection", "build_dataset")


class Watch(threading.Thread):
    """Polls a process tree: each process's peak memory (RSS) and CPU time, by the step it belongs to."""

    def __init__(self, root_pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval, self.stop = root_pid, interval, threading.Event()
        self.cpu = {}  # pid -> (step, user + system seconds) at the last look
        self.peak = Counter()  # step -> the largest RSS of one of its processes, bytes
        self.peak_tree = 0  # the largest RSS of the whole tree at once

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.root)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in processes:
                try:
                    with p.oneshot():
                        step = step_of(p.cmdline())
                        rss, times = p.memory_info().rss, p.cpu_times()
                except psutil.Error:
                    continue
                total += rss
                self.peak[step] = max(self.peak[step], rss)
                self.cpu[p.pid] = (step, times.user + times.system)  # a waited child's: counted as its own
            self.peak_tree = max(self.peak_tree, total)
            self.stop.wait(self.interval)

    def cpu_by_step(self) -> Counter:
        found = Counter()
        for step, seconds in self.cpu.values():
            found[step] += seconds
        return found


def step_of(cmdline: list[str]) -> str:
    words = " ".join(cmdline)
    for step in STEPS:
        if f"{step}.py" in words:
            return step
    # the stages' math-verify workers, and chain.py's recipe check (which imports the training stack)
    return "spawned helpers" if "multiprocessing" in words or "spawn" in words else "chain"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def start_server(args, tmp: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, str(ROOT / "tests" / "fake_server.py"), "--problems", *map(str, TRAIN + TEST),
               "--model", "gpt-4o-mini", "--latency", str(args.latency / args.factor), "--latency_sigma",
               str(args.latency_sigma), "--rpm", str(round(args.rpm * args.factor)), "--tpm",
               str(round(args.tpm * args.factor)), "--window_s", "60",
               "--faults", args.faults, "--slow_seconds", str(2 * args.timeout / args.factor),
               "--port_file", str(tmp / "port")]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server.stdout.readline()  # "listening on ..." once it serves
    return server, f"http://127.0.0.1:{(tmp / 'port').read_text().strip()}/v1"


def chain_command(args, url: str, runs: Path) -> list[str]:
    timeout, stall = args.timeout / args.factor, args.stall_timeout / args.factor
    judge_args = f"--concurrency {args.concurrency} --timeout {timeout:g} --stall_timeout {stall:g}"
    return [sys.executable, "chain.py", "--recipe", "paper-v1", "--name", "rehearsal", "--runs_dir", str(runs),
            "--stop_after", "dataset", "--progress_interval", "30",
            f"chain.n_gsm8k={args.n_gsm8k}", f"chain.n_math={args.n_math}",
            f"x-llm.base_url={url}", f"x-llm.concurrency={args.concurrency}", f"x-llm.timeout={timeout:g}",
            f"x-llm.stall_timeout={stall:g}", "build_dataset.judge=llm", f"build_dataset.judge_base_url={url}",
            f"build_dataset.top_k={args.judge_top_k}", f"build_dataset.judge_args={json.dumps(judge_args)}"]


def run_chain(command: list[str], log: Path, kill_when=None) -> dict:
    """Run the chain (in its own process group); `kill_when()` true: SIGKILL the whole group. Its wall
    time, exit code, Watch, whether it was killed, and each step's (start, end) on time.monotonic()."""
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OPENAI_API_KEY": "sk-rehearsal", "PYTHONUNBUFFERED": "1"})
    watch = Watch(process.pid)
    watch.start()
    killed, steps, seen = False, {}, 0
    while True:
        running = process.poll() is None
        if running and kill_when is not None and not killed and kill_when():
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
        lines = log.read_text(errors="replace").splitlines()
        for line in lines[seen:]:  # a step's start and end, as the chain reports them (within 0.5 s)
            if m := re.match(r"\[chain\] (\w+): running", line):
                steps[m.group(1)] = [time.monotonic(), None]
            elif m := re.match(r"\[chain\] (\w+): done in", line):
                steps[m.group(1)][1] = time.monotonic()
        seen = len(lines)
        if not running:
            break
        time.sleep(0.5)
    now, after = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    watch.stop.set()
    watch.join()
    # The CPU time of every process of the tree: as the kernel counted it for those waited for (a
    # killed tree's are not), else as last seen
    waited = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall": now - started, "code": process.returncode, "watch": watch, "killed": killed,
            "cpu": sum(watch.cpu_by_step().values()) if killed else waited,
            "steps": {name: (begin, end or now, end is not None) for name, (begin, end) in steps.items()}}


def progress(log: Path) -> float:
    """The share done of a step, from its progress bar's latest line (0 before one)."""
    if not log.exists():
        return 0.0
    match = re.search(r"(\d+)%\|", latest_line(log))
    return int(match.group(1)) / 100 if match else 0.0


def cache_usage(path: Path) -> tuple[int, int, int]:
    """(answers, prompt tokens, completion tokens) held in a response cache."""
    if not path.exists():
        return 0, 0, 0
    replies = list(ResponseCache(path).replies())
    return len(replies), sum(r.prompt_tokens for r in replies), sum(r.completion_tokens for r in replies)


def rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def checks(run: Path, k: int) -> list[tuple[str, bool, str]]:
    """No question lost or doubled, every rewrite accounted for: (check, passed, detail)."""
    gen = run / "gen"
    questions = sum(1 for path in (run / "inputs").glob("*.jsonl") for _ in path.open())
    cot, failed = rows(gen / "cot.jsonl"), rows(gen / "cot_failed.jsonl")
    cot_stats = json.loads((gen / "cot.stats.json").read_text())
    ids = [r["id"] for r in cot + failed]
    found = [("every question kept or failed, once", len(ids) == len(set(ids)) == questions,
              f"{len(cot)} kept + {len(failed)} failed = {len(ids)} of {questions} questions, "
              f"{len(ids) - len(set(ids))} twice; {len(cot_stats.get('failed_ids') or [])} requests failed for good")]
    for stage, parents in (("persona", cot), ("reflection_persona", rows(gen / "reflection.jsonl"))):
        kept, rejected = rows(gen / f"{stage}.jsonl"), rows(gen / f"{stage}_rejected.jsonl")
        rewrites = kept + rejected
        per_parent = Counter(r["parent_id"] for r in rewrites)
        short = [p["id"] for p in parents if per_parent[p["id"]] != k]
        doubled = len(rewrites) - len({r["id"] for r in rewrites})
        found.append((f"{stage}: {k} rewrites of each parent, once each", not short and not doubled,
                      f"{len(kept)} kept + {len(rejected)} rejected for {len(parents)} parents; {len(short)} "
                      f"parents without exactly {k}; {doubled} ids twice"))
    final = rows(run / "dataset" / "PersonaMathQA.jsonl")
    doubled = len(final) - len({r["id"] for r in final})
    found.append(("dataset: no row twice", not doubled, f"{len(final)} rows, {doubled} ids twice"))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=float, default=12.0,
                   help="time compression: limits x factor, latencies and timeouts / factor")
    p.add_argument("--rpm", type=int, default=5000, help="the account's requests per minute (Tier 2)")
    p.add_argument("--tpm", type=int, default=2_000_000, help="the account's tokens per minute (Tier 2)")
    p.add_argument("--latency", type=float, default=4.0, help="median seconds per answer at the real account")
    p.add_argument("--latency_sigma", type=float, default=0.7, help="log-normal sigma (0.7: p99 = 5x the median)")
    p.add_argument("--faults", default="500=0.002,malformed=0.001,empty=0.001,slow=0.001,length=0.002,429=0.001")
    p.add_argument("--timeout", type=float, default=120.0, help="the client's --timeout at the real account")
    p.add_argument("--stall_timeout", type=float, default=300.0, help="and its --stall_timeout")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--n_gsm8k", default="all")
    p.add_argument("--n_math", default="all")
    p.add_argument("--judge_top_k", type=int, default=10, help="candidate test items per row the judge decides")
    p.add_argument("--kill_at", type=float, default=0.4, help="kill the chain once persona_augment is this far")
    p.add_argument("--keep", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = p.parse_args()
    cpu = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", Path("/proc/cpuinfo").read_text())))
    print(f"rehearsal: a Tier-2-shaped account ({args.rpm:,} RPM, {args.tpm:,} TPM) x {args.factor:g} in time (= "
          f"{args.rpm * args.factor:,.0f} RPM, {args.tpm * args.factor:,.0f} TPM), answers {args.latency:g} s median "
          f"(sigma {args.latency_sigma:g}) / {args.factor:g}; judge top_k {args.judge_top_k}; faults {args.faults}; kill at persona_augment {args.kill_at:.0%}; "
          f"{os.cpu_count()} CPUs ({', '.join(cpu) or 'no avx2'})", flush=True)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="rehearsal-"))
    tmp.mkdir(parents=True, exist_ok=True)
    server, url = start_server(args, tmp)
    try:
        command = chain_command(args, url, tmp / "runs")
        run = tmp / "runs" / "rehearsal"
        persona_log = run / "logs" / "persona_augment.log"
        first = run_chain(command, tmp / "chain.1.log", kill_when=lambda: progress(persona_log) >= args.kill_at)
        print(f"first run: {first['wall']:.0f} s, killed: {first['killed']} (exit {first['code']})", flush=True)
        second = run_chain(command, tmp / "chain.2.log")
        print(f"resumed run: {second['wall']:.0f} s, exit {second['code']}", flush=True)
        stats = get(url.removesuffix("/v1") + "/stats")
        server_cpu = psutil.Process(server.pid).cpu_times()
    finally:
        server.terminate()
        server.wait()
    report(args, run, stats, first, second, server_cpu.user + server_cpu.system, tmp)
    if args.keep is None:
        shutil.rmtree(tmp)


def report(args, run: Path, stats: dict, first: dict, second: dict, server_cpu: float, tmp: Path) -> None:
    limits = stats["ratelimit"]
    rates = (args.rpm * args.factor / 60, args.tpm * args.factor / 60)  # requests and tokens a second
    answers = [(limits["first_at"] + t, ok, tokens) for t, ok, tokens, _ in limits["answers"]]

    def account(begin: float, end: float) -> tuple[float, int, int]:
        """The ideal seconds for what the server admitted in [begin, end), its requests, its 429s."""
        inside = [(ok, tokens) for t, ok, tokens in answers if begin <= t < end]
        admitted = [tokens for ok, tokens in inside if ok]
        return max(len(admitted) / rates[0], sum(admitted) / rates[1]), len(inside), len(inside) - len(admitted)

    print()
    print("| step (run) | wall | ideal at the limits | ideal / wall | requests | answered 429 | client CPU (sampled) | "
          "peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = Counter()
    for label, result in (("first", first), ("resumed", second)):
        cpu = result["watch"].cpu_by_step()
        for name, (begin, end, finished) in result["steps"].items():
            ideal, sent, refused = account(begin, end)
            totals.update(wall=end - begin, ideal=ideal, sent=sent, refused=refused, cpu=cpu[name])
            if name != "build_dataset":
                totals.update(gen_wall=end - begin, gen_ideal=ideal)
            state = "" if finished else ", killed" if result["killed"] else ", failed"
            print(f"| {name} ({label} run{state}) | "
                  f"{end - begin:.0f} s | {ideal:.0f} s | {ideal / (end - begin):.1%} | {sent:,} | {refused:,} | "
                  f"{cpu[name]:.0f} s | {result['watch'].peak[name] / 2**20:.0f} MiB |")
    wall = first["wall"] + second["wall"]
    ideal_all = account(0, float("inf"))[0]
    sent, refused = stats["requests"], limits["rejected"]
    client_cpu = first["cpu"] + second["cpu"]
    price = price_of("gpt-4o-mini", "https://api.openai.com/v1")
    bill = cost_of(price, stats["usage"]["prompt_tokens"], stats["usage"]["completion_tokens"])
    caches = [cache_usage(run / "gen" / "llm_cache.sqlite"), cache_usage(run / "dataset" / "judge_cache.sqlite")]
    cached = cost_of(price, sum(c[1] for c in caches), sum(c[2] for c in caches))
    ledgers = [json.loads(path.read_text())["ledger"] for path in sorted((run / "gen").glob("*.stats.json"))]
    dataset_stats = json.loads((run / "dataset" / "stats.json").read_text())
    judge = (dataset_stats.get("decontamination") or {}).get("judge") or {}
    ledgers += [judge["ledger"]] if judge.get("ledger") else []
    ledger_usd = sum(entry["cost_usd"] or 0 for entry in ledgers)
    peaks = first["watch"].peak + Counter()
    for step, rss in second["watch"].peak.items():
        peaks[step] = max(peaks[step], rss)
    f = args.factor
    print()
    print(f"| | rehearsal (x{f:g}) | scaled back to the account (x{f:g} in time) |")
    print("|---|---:|---:|")
    print(f"| wall time, both runs (kill and resume included) | {wall:.0f} s | {wall * f / 3600:.2f} h |")
    print(f"| ideal: every admitted request and token at the limits' rate | {ideal_all:.0f} s | "
          f"{ideal_all * f / 3600:.2f} h |")
    print(f"| ideal / wall: the whole chain | {ideal_all / wall:.1%} | |")
    print(f"| ideal / wall: the generation steps (gen_cot, persona, reflection) | "
          f"{totals['gen_ideal'] / totals['gen_wall']:.1%} | |")
    print(f"| requests sent (retries included) | {sent:,} | |")
    print(f"| answered 429 by the limits | {refused:,} ({refused / sent:.2%}) | |")
    print(f"| client CPU, every step's processes | {client_cpu:.0f} s: {1000 * client_cpu / sent:.1f} s per 1,000 "
          f"requests | {client_cpu / (wall * f):.1%} of a core |")
    print(f"| the fake server's CPU | {server_cpu:.0f} s | |")
    print(f"| peak memory of one process | {', '.join(f'{k} {v / 2**20:.0f} MiB' for k, v in peaks.items())} | |")
    print(f"| peak memory of the process tree | {max(first['watch'].peak_tree, second['watch'].peak_tree) / 2**20:.0f}"
          f" MiB | |")
    print(f"| the server's bill: every answer it sent | ${bill:.2f} ({stats['completed']:,} answers) | |")
    print(f"| the caches: every answer kept | ${cached:.2f} ({sum(c[0] for c in caches):,} answers) | |")
    print(f"| the stages' ledgers (the killed run's are lost with it) | ${ledger_usd:.2f} | |")
    print(f"| answers paid twice (a body answered twice) | {stats['paid_twice']} | |")
    print(f"| faults injected | {', '.join(f'{k} {v}' for k, v in stats['faults'].items() if v)} | |")
    print(f"| dataset rows | {dataset_stats['kept']['total']:,} | |")
    print()
    ok = True
    for name, passed, detail in checks(run, k=3):
        ok &= passed
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
    print(f"ideal / wall of the generation steps >= 90%: {totals['gen_ideal'] / totals['gen_wall'] >= 0.9}; "
          f"429s <= 1%: {refused <= 0.01 * sent}; answers paid twice: {stats['paid_twice']} (an answer in transit "
          f"at the kill is paid and lost)" + (f"; the run is kept in {tmp}" if args.keep else ""))


if __name__ == "__main__":
    main()
