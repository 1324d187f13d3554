"""The dataset viewer at full scale: viewer.html over a synthetic dataset of v2's size (128.9K kept rows),
opened from disk in headless Chromium (Debian's package), against the same page over 1/100 of it.

The synthetic run is made of the real train questions: 14,973 GSM8K + MATH questions, 10,467 solved by
gen_cot and 4,506 not (the full-scale rehearsal's yield; at 1/100, 1/100 of them), persona rewrites (the question with a persona
preamble) and reflection rows up to --rows kept rows, and --dropped dropped items (rewrites solved wrong
or invalid, duplicates, contaminated rows). Each response is a question's reference solution padded to
a length drawn log-normal around --response_chars (gpt-4o-mini's chains of thought are longer than
GSM8K's reference answers). The viewer is written by personamath/viewer.py as build_dataset.py does.

It prints the size of viewer_data/ (and of index.js, what opening reads), the time from navigation to
the page being ready (index parsed, filters filled, the list drawn) and to problems.js read (the
problems, which the lineage and the search of problems need), the
time each filter takes to answer (stage, source, persona, a search of the problems for a common and
for a rare word, all cleared; a search of the solutions too, first when it reads every chunk of texts,
then again), the time to show a row whose chunk is not read yet, and the page's JS heap, for both
scales. Targets (issue 21): opens in a few seconds, every filter answers in under a second.

    python bench/bench_viewer.py [--rows 128900] [--dropped 90000]
"""
import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from browser import Browser, find_chromium  # noqa: E402
from personamath.jsonl import write_jsonl  # noqa: E402
from personamath.viewer import write_viewer  # noqa: E402

PERSONAS = [f"A {job} who {habit}." for job in ("nurse", "baker", "pilot", "farmer", "teacher", "welder", "chemist",
                                                 "librarian", "carpenter", "cashier")
            for habit in ("plans every week ahead", "counts stock each morning", "keeps a logbook",
                          "trains apprentices", "budgets for a family of four", "runs marathons",
                          "repairs old radios", "grows tomatoes", "sings in a choir", "collects stamps")]
FILTERS = [("stage", "persona"), ("source", "math"), ("persona", "7"), ("text", "apples"), ("text", "zyzzyva"),
           ("solutions", "apples"), ("solutions", "zyzzyva"), ("text", "")]


def questions() -> list[dict]:
    found = []
    for i, line in enumerate((ROOT / "data/gsm8k/train.jsonl").open()):
        r = json.loads(line)
        found.append({"id": f"gsm8k/train:{i}", "source": "gsm8k", "problem": r["question"],
                      "solution": r["answer"], "gold": r["answer"].rsplit("####", 1)[-1].strip()})
    for i, line in enumerate((ROOT / "data/math/MATH_train.jsonl").open()):
        r = json.loads(line)
        found.append({"id": f"math/train:{i}", "source": "math", "problem": r["problem"], "solution": r["solution"],
                      "gold": "x", "level": r["level"].removeprefix("Level "), "subject": r["type"]})
    return found


def response(rng: random.Random, solution: str, median: int) -> str:
    length = int(median * math.exp(rng.gauss(0, 0.5)))
    text = f"Let's solve this step by step.\n\n{solution}"
    while len(text) < length:
        text += f"\n\nChecking the step again: {solution}"
    return text[:length] + " The answer is $\\boxed{42}$."


def synthesize(folder: Path, rows: int, dropped: int, response_chars: int, seed: int = 0):
    """Stage outputs of a full run in folder/gen: (the stage outputs, the dataset's rows, its stats)."""
    rng = random.Random(seed)
    qs = questions()
    rng.shuffle(qs)
    scale = min(1.0, rows / 128_900)  # the questions in the same proportion to the rows as at full scale
    solved, failed = qs[:round(10_467 * scale)], qs[10_467:10_467 + round(4_506 * scale)]
    base = lambda q: {k: q[k] for k in ("id", "source", "problem", "gold")} | {  # noqa: E731
        "level": q.get("level"), "subject": q.get("subject"), "model": "gpt-4o-mini", "prompt_version": "v1"}
    gen = folder / "gen"
    cot = [base(q) | {"parent_id": None, "stage": "cot", "response": response(rng, q["solution"], response_chars),
                      "persona": None, "persona_id": None} for q in solved]
    write_jsonl(gen / "cot_failed.jsonl", [base(q) | {"attempts": [{"attempt": 0, "response": response(
        rng, q["solution"], response_chars)}]} for q in failed])
    corrected = failed[: len(failed) // 2]
    reflection = [base(q) | {"parent_id": None, "stage": "reflection", "response": response(rng, q["solution"],
                                                                                              response_chars),
                             "wrong_attempt": None, "reflection": "I added where I should have multiplied.",
                             "reflected_on": response(rng, q["solution"], response_chars // 2),
                             "persona": None, "persona_id": None} for q in corrected]
    persona, persona_rejected = [], []
    parents = solved + corrected
    while len(cot) + len(reflection) + len(persona) < rows:
        q = rng.choice(parents)
        p = rng.randrange(len(PERSONAS))
        persona.append({"id": f"{q['id']}#p{len(persona)}", "parent_id": q["id"], "source": q["source"],
                        "stage": "persona", "problem": f"{PERSONAS[p]} {q['problem']}", "gold": q["gold"],
                        "response": response(rng, q["solution"], response_chars), "persona": PERSONAS[p],
                        "persona_id": f"p-{p}", "model": "gpt-4o-mini", "prompt_version": "v1"})
    for n in range(dropped):
        q = rng.choice(parents)
        p = rng.randrange(len(PERSONAS))
        persona_rejected.append({"id": f"{q['id']}#r{n}", "parent_id": q["id"], "source": q["source"],
                                 "problem": f"{PERSONAS[p]} {q['problem']}", "gold": q["gold"],
                                 "response": response(rng, q["solution"], response_chars), "persona": PERSONAS[p],
                                 "persona_id": f"p-{p}", "reason": rng.choice(
                                     ["rewrite solved wrong", "invalid rewrite: drops numbers of the original (3)"])})
    for name, data in (("cot", cot), ("reflection", reflection), ("persona", persona),
                       ("persona_rejected", persona_rejected)):
        write_jsonl(gen / f"{name}.jsonl", data)
    dataset = cot + reflection + persona
    rng.shuffle(dataset)
    stats = {"yield": [], "kept": {"total": len(dataset), "by_stage_source": {}, "by_stage": {}}}
    inputs = [gen / f"{name}.jsonl" for name in ("cot", "persona", "reflection")]
    return inputs, dataset, stats


def measure(page_path: Path) -> dict:
    with Browser(timeout=300) as browser:
        started = time.monotonic()
        page = browser.open(page_path)
        wall = time.monotonic() - started
        found = {"ready_ms": page.evaluate("window.viewerReadyMs"), "wall_s": wall, "errors": list(page.errors),
                 "rows": page.evaluate("DATA.kept.length"), "dropped": page.evaluate("DATA.dropped.length")}
        found["problems_read_ms"] = page.evaluate("problems().then(() => performance.now())")
        found["show an unread row (ms)"] = page.evaluate("""(async () => { await window.viewerSettled();
            const t = performance.now(); await select(DATA.kept.length - 1); return performance.now() - t; })()""")
        for n, (name, value) in enumerate(FILTERS):
            element = f"f-{name}" if name not in ("text", "solutions") else "f-text"
            first_of_solutions = name == "solutions" and all(earlier != "solutions" for earlier, _ in FILTERS[:n])
            key = f"{name}={value or '(cleared)'}" + (" (reads every chunk)" if first_of_solutions else "")
            found[key] = page.evaluate(f"""(async () => {{
                for (const e of document.querySelectorAll('#filters select, #filters input')) e.value = '';
                document.getElementById('f-solutions').checked = {json.dumps(name == "solutions")};
                const e = document.getElementById('{element}'); e.value = {json.dumps(value)};
                const t = performance.now(); await applyFilters(); return [performance.now() - t, state.shown.length]; }})()""")
        found["heap_mb"] = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize / 2**20 : null")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=128_900, help="kept rows (v2: 128.9K)")
    p.add_argument("--dropped", type=int, default=90_000, help="dropped items (rejected rewrites)")
    p.add_argument("--response_chars", type=int, default=1200, help="median response length, characters")
    args = p.parse_args()
    if find_chromium() is None:
        sys.exit("bench_viewer: no Chromium (apt-get install chromium)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, rows, dropped in (("1/100", args.rows // 100, args.dropped // 100),
                                     ("full", args.rows, args.dropped)):
            folder = Path(tmp) / label.replace("/", "_")
            started = time.monotonic()
            inputs, dataset, stats = synthesize(folder, rows, dropped, args.response_chars)
            write_viewer(folder / "dataset", inputs, dataset, [], [], stats)
            data = folder / "dataset/viewer_data"
            size = sum(f.stat().st_size for f in data.iterdir())
            results[label] = {"write_s": time.monotonic() - started, "size_mb": size / 2**20,
                              "index_mb": (data / "index.js").stat().st_size / 2**20,
                              **measure(folder / "dataset/viewer.html")}
    cpu = sorted({flag for line in open("/proc/cpuinfo") if line.startswith("flags")
                  for flag in line.split() if flag in ("avx2", "avx512_bf16", "amx_bf16")})
    print(f"bench_viewer: {args.rows:,} kept rows + {args.dropped:,} dropped (responses ~{args.response_chars} chars) "
          f"against 1/100 of it; headless Chromium; CPU flags {' '.join(cpu)}")
    keys = ["size_mb", "index_mb", "write_s", "ready_ms", "problems_read_ms", "wall_s", "show an unread row (ms)"] + [
        k for k in results["full"] if "=" in k] + ["heap_mb"]
    print("| measure | 1/100 | full | full / (1/100) |\n|---|---:|---:|---:|")
    for key in keys:
        small, full = results["1/100"][key], results["full"][key]
        if isinstance(full, list):  # (ms, rows shown)
            print(f"| filter {key} (ms; rows) | {small[0]:.0f}; {small[1]:,} | {full[0]:.0f}; {full[1]:,} | "
                  f"{full[0] / max(small[0], 0.01):.0f} |")
        elif full is not None:
            print(f"| {key} | {small:.1f} | {full:.1f} | {full / max(small, 1e-9):.1f} |")
    full = results["full"]
    slowest = max(v[0] for k, v in full.items() if "=" in k and "reads every chunk" not in k)
    print(f"errors in the page: {full['errors'] or 'none'}; opens in {full['ready_ms'] / 1000:.1f} s "
          f"(target: a few seconds), slowest filter {slowest:.0f} ms (target: under 1,000; the first search "
          f"of the solutions, which reads every chunk of texts, apart)")


if __name__ == "__main__":
    main()
