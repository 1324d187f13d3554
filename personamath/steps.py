"""The steps the generation stages are made of: the prompts' requests, the parsing of their answers,
and the LLM steps (solve, reflect, rewrite, persona proposal, persona variants of a question)."""
import asyncio
import re

from .async_grading import AsyncGrader
from .llm import LLMClient
from .prompts import load_prompt
from .rewrites import rewrite_problem
from .stage import Outcome

SOLVE, REWRITE, PROPOSE, REFLECT = (load_prompt(n) for n in ("solve", "rewrite_persona", "propose_personas", "reflect"))


# ---------------------------------------------------------------------------------------------
# requests and the parsing of their answers


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def solve_messages(problem: str) -> list[dict]:
    return user(SOLVE.render(problem=problem))


def rewrite_messages(problem: str, persona: str) -> list[dict]:
    return user(REWRITE.render(problem=problem, persona=persona))


def propose_messages(problem: str, k: int) -> list[dict]:
    return user(PROPOSE.render(problem=problem, k=str(k)))


def reflect_messages(problem: str, attempt: str) -> list[dict]:
    return user(REFLECT.render(problem=problem, attempt=attempt))


_LABEL = re.compile(r"^\s*(rewritten problem|problem|question)\s*:\s*", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
_CORRECTED = re.compile(r"\**corrected solution\s*:?\**\s*:?", re.IGNORECASE)


def parse_rewrite(text: str) -> str | None:
    """The rewritten problem, without a leading label; None when the model wrote nothing usable."""
    text = _LABEL.sub("", text.strip()).strip()
    return text if len(text) >= 10 else None


def parse_personas(text: str, k: int) -> list[str]:
    """Up to k distinct persona lines, list markers removed."""
    personas = []
    for line in text.splitlines():
        line = _LIST_MARK.sub("", line).strip().strip('"')
        if len(line) >= 10 and line not in personas:
            personas.append(line)
    return personas[:k]


def split_reflection(text: str) -> tuple[str, str]:
    """(reflection, corrected solution) of a reflect answer; all of it is the solution without the heading."""
    parts = _CORRECTED.split(text, maxsplit=1)
    if len(parts) == 1:
        return "", text.strip()
    return parts[0].strip(), parts[1].strip()


# ---------------------------------------------------------------------------------------------
# the steps the stages are made of


async def solve(llm: LLMClient, grader: AsyncGrader, source: str, problem: str, gold: str,
                sample: int = 0) -> tuple[str, bool]:
    """A fresh solution (never shown any earlier one) and whether its answer is the gold one."""
    reply = await llm.chat(solve_messages(problem), sample=sample, kind="solve")
    return reply.text, await grader.correct(source, reply.text, gold, problem, truncated=reply.finish_reason == "length")


async def reflect(llm: LLMClient, grader: AsyncGrader, source: str, problem: str, gold: str,
                  wrong: str) -> tuple[str, str, bool]:
    """The LLM is told its attempt is wrong (never the gold answer): (reflection, corrected solution, correct)."""
    reply = await llm.chat(reflect_messages(problem, wrong), kind="reflect")
    reflection, solution = split_reflection(reply.text)
    return reflection, solution, await grader.correct(source, solution, gold, problem,
                                                      truncated=reply.finish_reason == "length")


async def rewrite(llm: LLMClient, problem: str, persona: str) -> str | None:
    """The problem as the persona would pose it; None when the answer is unusable."""
    reply = await llm.chat(rewrite_messages(problem, persona), kind="rewrite")
    return parse_rewrite(reply.text) if reply.finish_reason != "length" else None


async def personas_for(llm: LLMClient, row: dict, pool, k: int, seed: int) -> list:
    """k personas for one question: drawn from the pool, or proposed by the LLM when there is none."""
    from .personas import choose, proposed

    if pool is not None:
        return choose(pool, row["id"], k, seed)
    reply = await llm.chat(propose_messages(row["problem"], k), kind="propose")
    return [proposed(text) for text in parse_personas(reply.text, k)]


async def persona_variants(llm: LLMClient, grader: AsyncGrader, row: dict, pool, k: int, seed: int, stage: str,
                           fix=None) -> Outcome:
    """Rewrite one solved question through k personas and solve each rewrite afresh; a rewrite is kept
    if its answer is the question's gold one. `fix(problem, wrong)` may turn a wrong solution into a
    correct one, returning (response, correct, fields for the row: the wrong attempt the response refers
    to or None, and the record of how it was fixed)."""
    personas = await personas_for(llm, row, pool, k, seed)

    async def one(j, persona):
        base = {"id": f"{row['id']}#p{j}", "parent_id": row["id"], "source": row["source"], "persona": persona.text,
                "persona_id": persona.id, "gold": row["gold"]}
        problem = await rewrite(llm, row["problem"], persona.text)
        if problem is None:
            return None, {**base, "reason": "unusable rewrite"}
        invalid = rewrite_problem(row["problem"], problem, row["gold"])
        if invalid:  # rejected before a request is spent on solving it
            return None, {**base, "problem": problem, "reason": invalid}
        response, correct = await solve(llm, grader, row["source"], problem, row["gold"])
        versions, fixed = f"{REWRITE.version}+{SOLVE.version}", {"wrong_attempt": None}
        if not correct and fix is not None:
            response, correct, fixed = await fix(problem, response)
            versions += f"+{REFLECT.version}"
        if not correct:
            return None, {**base, "problem": problem, "response": response, **fixed, "reason": "rewrite solved wrong"}
        return {**base, "stage": stage, "problem": problem, "response": response, **fixed,
                "level": row.get("level"), "subject": row.get("subject"), "model": llm.model,
                "prompt_version": versions}, None

    results = await asyncio.gather(*(one(j, p) for j, p in enumerate(personas)))
    return Outcome(attempted=len(personas), kept=[k for k, _ in results if k], rejected=[r for _, r in results if r])


# --dry_run's stand-in for a persona the LLM has not proposed yet: about the length of a real one.
PLACEHOLDER_PERSONA = "I am a person who works with quantities like these every day and asks about them. " * 2


def persona_requests(rows: list[dict], pool, k: int, seed: int, wrong_attempt: str | None = None) -> list:
    """Every request persona_variants may send for these rows, for --dry_run: the personas' proposal
    (without a pool), each rewrite and its solve (estimated on the original question: the rewrite is not
    known yet) and, given a `wrong_attempt` stand-in, the reflection on a wrong solve."""
    from .personas import choose

    requests = []
    for row in rows:
        if pool is None:
            requests.append((propose_messages(row["problem"], k), 0))
            texts = [PLACEHOLDER_PERSONA] * k
        else:
            texts = [p.text for p in choose(pool, row["id"], k, seed)]
        for text in texts:
            rewritten = f"{text} {row['problem']}"
            requests += [(rewrite_messages(row["problem"], text), 0), (solve_messages(rewritten), 0)]
            if wrong_attempt is not None:
                requests.append((reflect_messages(rewritten, wrong_attempt), 0))
    return requests
