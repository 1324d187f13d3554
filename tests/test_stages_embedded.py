"""The generation stages over real HTTP against vLLM's server with the real embedded model.

SmolLM2-135M solves almost nothing, so these tests check what must hold whatever the yield: every
input accounted for, files and stats agreeing, and a rerun served from the cache without a request.
"""
import json

from conftest import DATA, run_script

from personamath.data import load_problems
from personamath.jsonl import read_jsonl, write_jsonl


def llm_flags(server):
    return ["--base_url", server["url"], "--model", server["model"], "--max_tokens", "160", "--concurrency", "8"]


def stats(out, name):
    return json.loads((out / f"{name}.stats.json").read_text())


def test_gen_cot_real_model_and_rerun(tmp_path, embedded_server):
    out = tmp_path / "gen"
    args = ["gen_cot.py", "--output_dir", str(out), "--limit", "6", "--num_samples", "2", *llm_flags(embedded_server)]
    first = run_script(*args)
    assert first.returncode in (0, 1), first.stderr[-2000:]  # 1: nothing kept, said clearly
    kept, failed = read_jsonl(out / "cot.jsonl"), read_jsonl(out / "cot_failed.jsonl")
    assert len(kept) + len(failed) == 6
    assert {r["source"] for r in kept + failed} == {"gsm8k", "math"}  # --limit shares out over both inputs
    assert all(len(r["attempts"]) == 2 for r in failed)
    s = stats(out, "cot")
    assert (s["inputs"], s["attempted"], s["kept"], s["complete"]) == (6, 6, len(kept), True)
    sent = s["ledger"]["requests"]
    assert sent == 2 * len(failed) + sum(r["attempt"] + 1 for r in kept)
    assert s["ledger"]["completion_tokens"] > 0
    if not kept:
        assert "no rows kept" in first.stderr

    again = run_script(*args)
    assert again.returncode == first.returncode
    s2 = stats(out, "cot")
    assert s2["ledger"]["requests"] == 0 and s2["ledger"]["cache_hits"] == sent
    assert read_jsonl(out / "cot.jsonl") == kept and read_jsonl(out / "cot_failed.jsonl") == failed


def test_persona_and_reflection_real_model(tmp_path, embedded_server):
    out = tmp_path / "gen"
    problems = load_problems("gsm8k", DATA / "gsm8k" / "train.jsonl")[:2]
    write_jsonl(out / "cot.jsonl", [{"id": f"gsm8k/{p.id}", "source": "gsm8k", "stage": "cot", "problem": p.question,
                                     "response": "(given)", "gold": p.gold} for p in problems])
    result = run_script("persona_augment.py", "--output_dir", str(out), "--k", "2", *llm_flags(embedded_server))
    assert result.returncode == 0, result.stderr[-2000:]
    kept, rejected = read_jsonl(out / "persona.jsonl"), read_jsonl(out / "persona_rejected.jsonl")
    assert len(kept) + len(rejected) == 4 == stats(out, "persona")["attempted"]
    for row in kept + rejected:
        assert row["parent_id"] in {f"gsm8k/{p.id}" for p in problems} and row["persona"]

    write_jsonl(out / "cot_failed.jsonl", [{"id": f"gsm8k/{p.id}", "source": "gsm8k", "problem": p.question,
                                            "gold": p.gold, "attempts": [{"attempt": 0, "response": "It is 3."}]}
                                           for p in problems])
    result = run_script("reflection.py", "--output_dir", str(out), "--k", "1", "--persona_source", "llm",
                        *llm_flags(embedded_server))
    assert result.returncode == 0, result.stderr[-2000:]
    corrected, still_wrong = read_jsonl(out / "reflection.jsonl"), read_jsonl(out / "reflection_failed.jsonl")
    assert len(corrected) + len(still_wrong) == 2
    assert stats(out, "reflection")["ledger"]["by_kind"] == {"reflect": 2}


def test_embedded_server_answers_in_float32(embedded_server, embedded_model):
    """The server the stages use on a CPU without native bf16: float32 weights, served in float32."""
    from openai import OpenAI

    config = json.loads((embedded_model / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"  # stored as dequantized, exactly
    assert embedded_server["dtype"] == "float32"
    log = open(embedded_server["log"]).read()
    assert "dtype=torch.float32" in log
    client = OpenAI(base_url=embedded_server["url"], api_key="EMPTY", timeout=120, max_retries=0)
    reply = client.chat.completions.create(model=embedded_server["model"], max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is 2 + 2?"}])
    assert reply.choices[0].message.content.strip() and reply.usage.completion_tokens > 0
