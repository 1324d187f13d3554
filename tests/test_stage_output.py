"""A stage's rows leave memory as its items finish: in input order whatever order they finish in, items
that never finish skipped, and files that take their names only when the stage ends without an error."""
import asyncio
import random

import pytest

from personamath.jsonl import read_jsonl, write_jsonl
from personamath.llm import BudgetExceeded, LLMClient
from personamath.stage import Outcome, StageOutput, run_items, stage_parser


def client(tmp_path) -> LLMClient:
    """A real client that is never asked anything (the items here make no request)."""
    args = stage_parser("gen_cot", "test").parse_args(["--base_url", "http://127.0.0.1:9/v1", "--model", "gpt-4o-mini"])
    return LLMClient(args, tmp_path)


def test_outcomes_are_emitted_in_input_order_whatever_order_items_finish_in(tmp_path):
    """200 items finishing in a shuffled order, every tenth out of budget: the others arrive in input
    order, once each, and the counts are theirs."""
    rng = random.Random(0)
    delays = [rng.random() / 20 for _ in range(200)]

    async def work(i):
        await asyncio.sleep(delays[i])
        if i % 10 == 3:
            raise BudgetExceeded()
        return Outcome(kept=[{"id": i}] if i % 2 else [], rejected=[] if i % 2 else [{"id": i, "reason": "wrong"}],
                       attempted=1)

    emitted = []
    result = asyncio.run(run_items(list(range(200)), work, client(tmp_path), "test", 1, stall_timeout=60,
                                   emit=lambda outcome: emitted.extend(r["id"] for r in outcome.kept + outcome.rejected),
                                   item_id=str))
    expected = [i for i in range(200) if i % 10 != 3]
    assert emitted == expected
    assert (result.finished, result.attempted, result.kept) == (180, 180, sum(i % 2 for i in expected))
    assert result.reasons == {"wrong": sum(1 for i in expected if i % 2 == 0)}


def test_the_files_take_their_names_only_when_the_stage_ends_without_an_error(tmp_path):
    write_jsonl(tmp_path / "cot.jsonl", [{"id": "last complete run"}])
    with pytest.raises(RuntimeError):
        with StageOutput(tmp_path, "cot", "cot_failed") as output:
            output.add(Outcome(kept=[{"id": "new"}], rejected=[{"id": "new", "reason": "wrong"}]))
            raise RuntimeError("the driver stopped")
    assert read_jsonl(tmp_path / "cot.jsonl") == [{"id": "last complete run"}]  # as it was
    assert not (tmp_path / "cot_failed.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cot.jsonl"]  # no temporary file left
    with StageOutput(tmp_path, "cot", "cot_failed") as output:
        output.add(Outcome(kept=[{"id": "new"}], rejected=[{"id": "new", "reason": "wrong"}]))
        assert read_jsonl(tmp_path / "cot.jsonl") == [{"id": "last complete run"}]  # not yet
    assert read_jsonl(tmp_path / "cot.jsonl") == [{"id": "new"}]
    assert read_jsonl(tmp_path / "cot_failed.jsonl") == [{"id": "new", "reason": "wrong"}]
