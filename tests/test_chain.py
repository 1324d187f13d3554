"""chain.py end to end at a small size: every stage as a script, against the fake OpenAI server (whose
yields are known, unlike the embedded model's), then real training under ZeRO-2 and real vLLM
evaluation of a tiny model, then report.py. Counts must agree from each stage to the next."""
import json

import pytest

from conftest import DATA, run_script
from personamath.data import load_any
from personamath.fake_server import FakeServerConfig, start_in_thread
from personamath.jsonl import read_jsonl

N_GSM8K, N_MATH, N_EVAL = 6, 6, 4


@pytest.fixture(scope="module")
def train_problems():
    return [p for path in (DATA / "gsm8k/train.jsonl", DATA / "math/MATH_train.jsonl") for p in load_any(path)[1]]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, embedded_model):
    from personamath.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("base") / "model", tokenizer_dir=embedded_model)


def chain(runs_dir, url, base_model, *extra):
    return run_script("chain.py", "--runs_dir", str(runs_dir), "--name", "small", "--n_gsm8k", str(N_GSM8K),
                      "--n_math", str(N_MATH), "--num_samples", "1", "--k1", "2", "--k2", "2", "--llm_url", url,
                      "--llm_model", "fake-llm", "--base_model", str(base_model), "--epochs", "1",
                      "--eval_gsm8k", str(N_EVAL), "--eval_math", str(N_EVAL), "--eval_max_tokens", "16", *extra,
                      timeout=900)


def count(path) -> int:
    return len(read_jsonl(path))


def test_chain_runs_every_stage_and_counts_agree(tmp_path, train_problems, tiny_base):
    with start_in_thread(FakeServerConfig(problems=train_problems)) as server:
        result = chain(tmp_path, server.url, tiny_base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run, gen = tmp_path / "small", tmp_path / "small/gen"

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
    # build_dataset read exactly the kept rows of the four stages; train.py trained on its rows.
    dataset = json.loads((run / "dataset/stats.json").read_text())
    kept_rows = sum(count(gen / f"{n}.jsonl") for n in ("cot", "persona", "reflection", "reflection_persona"))
    assert dataset["rows_read"]["total"] == kept_rows
    assert dataset["kept"]["total"] == count(run / "dataset/PersonaMathQA.jsonl") > 0
    assert json.loads((run / "train/train_data_stats.json").read_text())["examples"] == dataset["kept"]["total"]
    assert (run / "train/model.safetensors").is_file()
    # Both models evaluated on both tasks, and the report shows them.
    for label in ("base", "trained"):
        for task in ("gsm8k", "math"):
            summary = json.loads((run / f"eval/{label}/{task}/summary.json").read_text())
            assert summary["n"] == N_EVAL
    assert json.loads((run / "eval/trained/math/summary.json").read_text())["model"] == str(run / "train")
    report = (run / "report.md").read_text()
    assert "| base |" in report and "| trained |" in report and f"| cot | {N_GSM8K + N_MATH} |" in report
    for plot in ("math_by_level", "math_by_subject", "stage_yields"):
        assert (run / f"plots/{plot}.png").stat().st_size > 1000
    assert "[chain] finished" in result.stdout and "| model | GSM8K paper |" in result.stdout

    # A rerun finds every step done and only rebuilds the report.
    with start_in_thread(FakeServerConfig(problems=train_problems)) as server:
        rerun = chain(tmp_path, server.url, tiny_base)
        assert server.stats()["requests"] == 0
    assert rerun.returncode == 0 and rerun.stdout.count("done before, skipped") >= 5


def test_chain_with_nothing_kept_stops_clearly_and_keeps_what_finished(tmp_path, train_problems, tiny_base):
    config = FakeServerConfig(problems=train_problems, hard_fraction=1.0, hopeless_fraction=1.0)
    with start_in_thread(config) as server:
        result = chain(tmp_path, server.url, tiny_base)
    assert result.returncode == 2
    assert "the generation stages kept no row, so there is nothing to train on" in result.stderr
    run = tmp_path / "small"
    assert count(run / "gen/cot_failed.jsonl") == N_GSM8K + N_MATH and count(run / "gen/cot.jsonl") == 0
    assert (run / ".done/gen_cot").exists() and (run / ".done/reflection").exists()
    assert not (run / "train").exists()
    # The rerun resumes: the finished stages are skipped, and it stops at the same point.
    with start_in_thread(config) as server:
        rerun = chain(tmp_path, server.url, tiny_base)
        assert server.stats()["requests"] == 0
    assert rerun.returncode == 2 and "gen_cot: running" not in rerun.stdout
    assert "the generation stages kept no row" in rerun.stderr
