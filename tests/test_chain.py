"""chain.py end to end at a small size: every stage as a script, against the fake OpenAI server (whose
yields are known, unlike the embedded model's), then real training under ZeRO-2 and real vLLM
evaluation of a tiny model, then report.py. Counts must agree from each stage to the next."""
import json
import re
import shutil
import socket
import subprocess

import pytest
import yaml

from conftest import DATA, ROOT, run_script
from personamath.data import load_any
from personamath.evaluation import build_parser, resolve_protocol
from fake_server import FakeServerConfig, start_in_thread
from personamath.jsonl import read_jsonl
from personamath.precision import choose_dtype

pytestmark = pytest.mark.slow  # DeepSpeed training and vLLM evaluation in every test
N_GSM8K, N_MATH, N_EVAL = 6, 6, 4


@pytest.fixture(scope="module")
def train_problems():
    return [p for path in (DATA / "gsm8k/train.jsonl", DATA / "math/MATH_train.jsonl") for p in load_any(path)[1]]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, embedded_model):
    from tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("base") / "model", tokenizer_dir=embedded_model)


def small(url, base_model, model="fake-llm") -> list[str]:
    """The embedded recipe, made small and pointed at the fake server: overrides of its sections."""
    return [f"chain.n_gsm8k={N_GSM8K}", f"chain.n_math={N_MATH}", "chain.serve_embedded=false",
            f"x-llm.base_url={url}", f"x-llm.model={model}", "gen_cot.num_samples=1", "persona_augment.k=2",
            "reflection.k=2", f"train.model_name_or_path={base_model}", "train.num_train_epochs=1",
            f"eval_gsm8k.limit={N_EVAL}", f"eval_math.limit={N_EVAL}", "x-eval.max_tokens=16", "build_dataset.judge=llm",
            f"build_dataset.judge_model={model}", f"build_dataset.judge_base_url={url}"]


def chain(runs_dir, url, base_model, *extra):
    return run_script("chain.py", "--runs_dir", str(runs_dir), "--name", "small", "--progress_interval", "2",
                      *small(url, base_model), *extra, timeout=900)


def count(path) -> int:
    return len(read_jsonl(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chain_runs_every_stage_and_counts_agree(tmp_path, train_problems, tiny_base):
    run, gen = tmp_path / "small", tmp_path / "small/gen"
    # One address for the three runs, as a user's --llm_url is: the judge's cache is keyed by it.
    fake = FakeServerConfig(problems=train_problems, port=free_port())
    # A failing step (here training, whose rows cannot fit one token) stops the chain with its log's
    # tail; what finished is kept, and the rerun resumes at that step.
    with start_in_thread(fake) as server:
        failed = chain(tmp_path, server.url, tiny_base, "train.model_max_length=1")
        assert server.stats()["requests"] > 0
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "error: step train failed" in failed.stderr and "model_max_length 1" in failed.stderr
    assert "run the same command again to resume from train" in failed.stderr
    assert (run / ".done/build_dataset").exists() and not (run / ".done/train").exists()
    with start_in_thread(fake) as server:
        result = chain(tmp_path, server.url, tiny_base)
        assert server.stats()["requests"] == 0
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gen_cot: done before, skipped" in result.stdout and "train: running" in result.stdout

    def stats(name):
        return json.loads((gen / f"{name}.stats.json").read_text())

    # Stage 1 read the slice; what it kept and failed is what stages 2 and 3 read.
    assert count(run / "inputs/gsm8k_train_slice.jsonl") == N_GSM8K and count(run / "inputs/math_train_slice.jsonl") == N_MATH
    assert stats("cot")["inputs"] == N_GSM8K + N_MATH == count(gen / "cot.jsonl") + count(gen / "cot_failed.jsonl")
    assert 0 < count(gen / "cot.jsonl") == stats("cot")["kept"] == stats("persona")["inputs"]
    assert stats("persona")["attempted"] == 2 * stats("persona")["inputs"]
    assert count(gen / "persona.jsonl") == stats("persona")["kept"] > 0
    assert 0 < count(gen / "cot_failed.jsonl") == stats("reflection")["inputs"]
    assert count(gen / "reflection.jsonl") == stats("reflection")["kept"] > 0
    assert count(gen / "reflection_persona.jsonl") == stats("reflection_persona")["kept"]
    assert stats("reflection_persona")["inputs"] == stats("reflection")["kept"]
    # The recipe's reflection format, solution: the corrected solution alone, no attempt to show.
    assert all(r["wrong_attempt"] is None and not r["response"].startswith("Reflection:")
               for r in read_jsonl(gen / "reflection.jsonl"))
    # build_dataset read exactly the kept rows of the four stages; train.py trained on its rows.
    dataset = json.loads((run / "dataset/stats.json").read_text())
    kept_rows = sum(count(gen / f"{n}.jsonl") for n in ("cot", "persona", "reflection", "reflection_persona"))
    assert dataset["rows_read"]["total"] == kept_rows
    judge = dataset["decontamination"]["judge"]  # the chain's LLM judged every candidate pair
    assert (judge["model"], judge["base_url"], dataset["settings"]["judge"]) == ("fake-llm", server.url, "llm")
    assert dataset["kept"]["total"] == count(run / "dataset/PersonaMathQA.jsonl") > 0
    assert json.loads((run / "train/train_data_stats.json").read_text())["examples"] == dataset["kept"]["total"]
    assert (run / "train/model.safetensors").is_file()
    # Both models evaluated on both tasks (one engine each: evaluate.py), each under its own name, and
    # the report shows them.
    base, trained = tiny_base.name, f"PersonaMath-{tiny_base.name}"
    for label in (base, trained):
        for task in ("gsm8k", "math"):
            summary = json.loads((run / f"eval/{label}/{task}/summary.json").read_text())
            assert summary["n"] == N_EVAL
    assert json.loads((run / f"eval/{trained}/math/summary.json").read_text())["model"] == str(run / "train")
    report = (run / "report.md").read_text()
    assert f"| {base} |" in report and f"| {trained} |" in report and f"| cot | {N_GSM8K + N_MATH} |" in report
    assert "[dataset/viewer.html](dataset/viewer.html)" in report  # the main job leaves a viewer, linked
    assert (run / "dataset/viewer_data/index.js").stat().st_size > 0 and (run / "dataset/PersonaMathQA.parquet").exists()
    decontaminated = dataset["decontamination"]
    assert f"| contaminated | {decontaminated['removed']} |" in report
    assert (f"Decontamination (judge): siblings of test items kept (same template, another problem; "
            f"`dataset/siblings_kept.jsonl`): {decontaminated['siblings_kept']}.") in report
    # whether training took: the rows, the loss, the weights, both models on the training set's questions
    summary = json.loads((run / "train/training_summary.json").read_text())
    assert summary["examples"] == dataset["kept"]["total"] and summary["optimizer_steps"] > 0
    assert f"Trained on **{summary['examples']} rows**" in report and "## Did the training take?" in report
    for label in (base, trained):
        assert json.loads((run / f"eval/{label}/training_questions/math/summary.json").read_text())["n"] > 0
        assert re.search(rf"^\| {re.escape(label)} \| .*\d+/\d+\)", report.split("## Did the training take?")[1], re.M)
    for plot in ("math_by_level", "math_by_subject", "stage_yields", "training_loss"):
        assert (run / f"plots/{plot}.png").stat().st_size > 1000
    assert "[chain] finished" in result.stdout and "| model | GSM8K paper (ours) |" in result.stdout
    # Live progress: a step that runs longer than --progress_interval shows its latest line on the
    # console; a stage's own bar counts requests, with kept rows and tokens/s, into its log.
    assert re.search(r"^\[chain\] train: \d+ s( \(no output for \d+ s\))?: \S", result.stdout, re.M), result.stdout
    assert re.search(r"^gen_cot: 100%\|.*\| (\d+)/\1 .*kept \d+, [\d.]+ output tok/s", (run / "logs/gen_cot.log")
                     .read_text(), re.M)

    # The recipe as run was written, every step was handed it, and each script wrote the settings it used
    # beside its outputs: the recipe's, not defaults of its own, and no setting passed by the chain.
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["chain"]["n_gsm8k"] == N_GSM8K and recipe["notes"]["train"]["model_max_length"]
    command, env, _ = json.loads((run / ".done/train").read_text())
    assert command[1:] == [f"run_zero{recipe['chain']['zero_stage']}.sh", "--config", str(run / "recipe.yaml"),
                           "--model_name_or_path", str(tiny_base), "--data_path", str(run / "dataset/PersonaMathQA.jsonl"),
                           "--output_dir", str(run / "train")]
    assert set(env) == {"NUM_GPUS", "PRECISION", "DEEPSPEED", "PATH"}  # the launcher's own choices only
    for path, section in ((run / "train/settings.train.yaml", "train"), (gen / "settings.reflection.yaml", "reflection"),
                          (run / f"eval/{base}/math/settings.eval_math.yaml", "eval_math"),
                          (run / "dataset/settings.build_dataset.yaml", "build_dataset")):
        used = yaml.safe_load(path.read_text())
        assert used["config"] == str(run / "recipe.yaml") and used["section"] == section, path
        for key, value in recipe[section].items():
            if key not in ("model_name_or_path", "base_url", "judge_base_url") and value is not None:
                assert used["settings"][key] == value and key in used["from"]["recipe"], (path, key)
    command, _, _ = json.loads((run / ".done/eval_base").read_text())
    assert "evaluate.py" in command[1] and command[command.index("--tasks") + 1:][:2] == ["gsm8k", "math"]
    assert command[command.index("--training_questions") + 1] == str(run / "dataset/PersonaMathQA.jsonl")

    # Every output that carries a number says what made it: this checkout's commit, the versions, the device.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    outputs = [*gen.glob("*.stats.json"), run / "dataset/stats.json", run / "train/train_data_stats.json",
               run / "train/trainer_state.json", *run.glob("eval/*/*/summary.json")]
    assert len(outputs) == 4 + 1 + 2 + 4
    for path in outputs:
        record = json.loads(path.read_text())["provenance"]
        assert record["code"]["git_commit"] == commit and record["versions"]["torch"].startswith("torch=="), path
    assert "solve" in json.loads((gen / "cot.stats.json").read_text())["provenance"]["prompts"]
    for path in (report := run / "report.md", run / "dataset/stats.md", *run.glob("eval/*/*/summary.md")):
        assert "## Provenance" in path.read_text() and commit[:12] in path.read_text(), path
    assert report.read_text().count(f"commit {commit[:12]}") == 4  # each evaluation's line names its own

    # A rerun finds every step done and only rebuilds the report.
    with start_in_thread(fake) as server:
        rerun = chain(tmp_path, server.url, tiny_base)
        assert server.stats()["requests"] == 0
    assert rerun.returncode == 0 and rerun.stdout.count("done before, skipped") >= 5

    # report.py puts a model named as in the published table beside its published figures (the hub's
    # '-hf' suffix aside) when it was evaluated under the authors' protocol, unchanged; under ours (the
    # chain's recipe), the published figures are not shown; a model without a published row gets none.
    authors = resolve_protocol(build_parser("gsm8k").parse_args(["--protocol", "authors"]))
    for label, source, protocol in (("PersonaMath-Qwen2.5-7B", trained, authors), ("Llama-2-7b-hf", base, authors),
                                    ("PersonaMath-LLaMA-2-7B", trained, None)):
        shutil.copytree(run / f"eval/{source}", run / f"eval/{label}")
        for path in (run / f"eval/{label}").glob("*/summary.json"):
            summary = json.loads(path.read_text())
            path.write_text(json.dumps({**summary, "protocol": protocol or summary["protocol"]}))
    assert run_script("report.py", "--run_dir", str(run)).returncode == 0
    results = (run / "report.md").read_text().split("## Results")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0]: line for line in results.splitlines() if line.startswith("| ")}
    assert rows["| PersonaMath-Qwen2.5-7B"].endswith("| 84.3 | 56.6 |")
    assert rows["| Llama-2-7b-hf"].endswith("| 14.6 | 2.5 |")
    assert rows["| PersonaMath-LLaMA-2-7B"].endswith("| not shown (ours) | not shown (ours) |")
    assert rows[f"| {trained}"].endswith("| — | — |")


def test_chain_with_nothing_kept_stops_clearly_and_keeps_what_finished(tmp_path, train_problems, tiny_base):
    config = FakeServerConfig(problems=train_problems, hard_fraction=1.0, hopeless_fraction=1.0)
    with start_in_thread(config) as server:  # one server: the stages' cache is keyed by its URL
        result = chain(tmp_path, server.url, tiny_base)
        assert result.returncode == 2
        assert "the generation stages kept no row, so there is nothing to train on" in result.stderr
        run = tmp_path / "small"
        assert count(run / "gen/cot_failed.jsonl") == N_GSM8K + N_MATH and count(run / "gen/cot.jsonl") == 0
        assert (run / ".done/gen_cot").exists() and (run / ".done/reflection").exists()
        assert not (run / "train").exists()
        # The rerun resumes: the finished stages are skipped, and it stops at the same point.
        server.reset_stats()
        rerun = chain(tmp_path, server.url, tiny_base)
        assert server.stats()["requests"] == 0
        assert rerun.returncode == 2 and "gen_cot: running" not in rerun.stdout
        assert "the generation stages kept no row" in rerun.stderr
        # With more attempts the stages run again, and only the new attempts are sent (the rest is cached).
        server.reset_stats()
        more = chain(tmp_path, server.url, tiny_base, "gen_cot.num_samples=2")
        assert server.stats()["by_kind"]["solve"] == N_GSM8K + N_MATH
    assert more.returncode == 2 and "gen_cot: running" in more.stdout


def test_chain_starts_generates_through_and_stops_the_embedded_server(tmp_path, tiny_base):
    """The main command's own path: with no --llm_url, chain.py starts vLLM's server on the embedded
    SmolLM2, generates through it over real HTTP, and stops it, whatever the model's (low) yield."""
    result = run_script("chain.py", "--runs_dir", str(tmp_path), "--name", "embedded", "chain.n_gsm8k=0",
                        "chain.n_math=3", "gen_cot.num_samples=2", "x-llm.max_tokens=128", "persona_augment.k=1",
                        "reflection.k=1", "reflection.limit=2", f"train.model_name_or_path={tiny_base}",
                        "train.num_train_epochs=1", "eval_gsm8k.limit=2", "eval_math.limit=2", "x-eval.max_tokens=8",
                        timeout=900)
    run = tmp_path / "embedded"
    assert "[chain] starting the embedded LLM server" in result.stdout, result.stderr[-3000:]
    assert "[chain] embedded LLM server stopped" in result.stdout and not (run / "server.json").exists()
    dtype = choose_dtype().dtype  # served as the CPU computes it, as precision.choose_dtype() decided
    assert f"dtype=torch.{dtype}" in (run / "server.log").read_text()
    command = (run / "logs/gen_cot.log").read_text().splitlines()[0].split()
    port = int(command[command.index("--base_url") + 1].split(":")[-1].removesuffix("/v1"))
    assert re.search(rf"^\[chain\] embedded LLM server at http://127\.0\.0\.1:{port}/v1 in {dtype} \(.+\)$",
                     result.stdout, re.M), result.stdout
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    cot = json.loads((run / "gen/cot.stats.json").read_text())
    assert (cot["inputs"], cot["model"]) == (3, "SmolLM2-135M-Instruct") and cot["ledger"]["completion_tokens"] > 0
    assert count(run / "gen/cot.jsonl") + count(run / "gen/cot_failed.jsonl") == 3
    rows = json.loads((run / "dataset/stats.json").read_text())["kept"]["total"]
    if rows:
        assert result.returncode == 0 and (run / "report.md").exists(), result.stderr[-3000:]
    else:
        assert result.returncode == 2 and "the generation stages kept no row" in result.stderr


def test_chain_budget_and_dry_run_against_what_the_server_billed(tmp_path, train_problems, tiny_base):
    """--dry_run sends nothing and bounds the requests; --max_cost is one budget for the whole chain: the
    chain stops, resumable, before a request that does not fit, and a rerun with more pays nothing twice.
    Checked against the fake server's own count of the tokens it billed."""
    from personamath.llm import cost_of, price_of

    price = price_of("gpt-4o-mini", "https://api.openai.com/v1")
    fake = FakeServerConfig(problems=train_problems, port=free_port())
    run = tmp_path / "small"

    def priced(*extra):  # training cannot start (no row fits one token): the test stops after generation
        return chain(tmp_path, server.url, tiny_base, *small(server.url, tiny_base, model="gpt-4o-mini"),
                     "train.model_max_length=1", *extra)

    def billed() -> float:
        usage = server.stats()["usage"]
        return cost_of(price, usage["prompt_tokens"], usage["completion_tokens"])

    with start_in_thread(fake) as server:
        dry = priced("--dry_run")
        assert dry.returncode == 0 and server.stats()["requests"] == 0, dry.stderr[-3000:]
        bound = int(re.search(r"chain --dry_run: at most ([\d,]+) requests to send, estimated cost \$([\d.]+)",
                              dry.stdout)[1].replace(",", ""))
        gen_cot_planned = int(re.search(r"gen_cot --dry_run: (\d+) requests", dry.stdout)[1])
        assert gen_cot_planned == N_GSM8K + N_MATH  # one attempt per question (gen_cot.num_samples=1)

        cap = 0.0006
        stopped = priced("--max_cost", str(cap))
        assert stopped.returncode == 2 and "stopped at the chain's budget" in stopped.stderr, stopped.stderr[-3000:]
        assert 0 < billed() <= cap
        spent = json.loads((run / "spend.json").read_text())
        assert billed() <= sum(e["spent_usd_at_most"] for e in spent) <= cap  # the stages' bound holds the bill

        first_bill, cap = billed(), 0.05
        resumed = priced("--max_cost", str(cap))  # goes on to training, which fails by design
        assert "error: step train failed" in resumed.stderr, resumed.stderr[-3000:]
        assert billed() <= cap and server.stats()["by_kind"]["solve"] >= gen_cot_planned
        by_kind = server.stats()["by_kind"]
        generation = sum(n for kind, n in by_kind.items() if kind != "judge")
        assert 0 < generation <= bound, by_kind  # the dry run's bound held (the judge comes on top, as it says)
        build_log = (run / "logs/build_dataset.log").read_text().splitlines()[0]
        assert "--judge_max_cost" in build_log  # the judge, too, spends from what is left
        left = float(build_log.split("--judge_max_cost ")[1].split()[0])
        assert left == pytest.approx(cap - sum(e["spent_usd_at_most"] for e in json.loads(
            (run / "spend.json").read_text()) if e["step"] != "build_dataset"), abs=1e-6)
    assert first_bill > 0


def test_chain_stop_after_dataset_trains_nothing_and_reports_the_data(tmp_path, train_problems, tiny_base):
    with start_in_thread(FakeServerConfig(problems=train_problems)) as server:
        result = chain(tmp_path, server.url, tiny_base, "--stop_after", "dataset")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "small"
    assert (run / ".done/build_dataset").exists() and count(run / "dataset/PersonaMathQA.jsonl") > 0
    assert not (run / "train").exists() and not (run / "eval").exists() and "train: running" not in result.stdout
    report = (run / "report.md").read_text()
    assert "No model was evaluated in this run" in report and "## Generation yields" in report
