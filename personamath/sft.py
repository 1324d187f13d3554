"""Supervised fine-tuning data: PersonaMathQA rows -> token ids with the prompt masked, tokenized once.

Each example is tokenized jointly (prompt + response, as the model will read it), the label mask
starts at the first token that holds a character of the response, and EOS is appended as an id, so
the trained tokens are exactly the response and EOS (the authors tokenized the prompt apart and
masked by its length, which can be off by one where the two tokenizations differ).
"""
import hashlib
import json
from pathlib import Path

from .data import records
from .errors import UserError
from .prompts import load_prompt, model_input

IGNORE_INDEX = -100
# --prompt_template -> (prompt file, whether it goes inside the tokenizer's chat template).
# `alpaca` is the authors' training prompt (Alpaca, no input, ending in "### Response:").
TEMPLATES = {"alpaca": ("alpaca_sft", False), "chat": ("chat_math", True)}
# A row whose response reflects on a wrong attempt (`wrong_attempt`, reflection.py --format reflection)
# is shown that attempt in its prompt, so the model is never trained on text that refers to what it
# cannot see; under `chat` this text is the user turn.
REFLECTION_PROMPT = "alpaca_reflection_sft"
# Column names accepted for the two fields, first found wins: PersonaMathQA, MetaMathQA, Alpaca, and
# the original GSM8K and MATH train files (for their own SFT baselines).
PROBLEM_KEYS = ("problem", "query", "instruction", "question")
RESPONSE_KEYS = ("response", "output", "solution", "answer")
# Pad tokens that exist in these vocabularies without being used in text (LLaMA-3.x has no pad token).
RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "[PAD]")


def _field(record: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    raise UserError(f"{where}: record has no {what} (a non-empty string in one of {', '.join(keys)}); "
                    f"its keys are {sorted(record)}")


def load_rows(sources: list[str]) -> list[dict]:
    """`problem`/`response` rows from JSONL or JSON files or `datasets` names, in the order given."""
    rows = []
    for source in sources:
        count = len(rows)
        for lineno, record in records(source):
            where = f"{source}:{lineno}"
            attempt = record.get("wrong_attempt")
            if attempt is not None and not isinstance(attempt, str):
                raise UserError(f"{where}: wrong_attempt must be text or null, not {type(attempt).__name__}")
            rows.append({"problem": _field(record, PROBLEM_KEYS, where, "problem"),
                         "response": _field(record, RESPONSE_KEYS, where, "response"),
                         "wrong_attempt": attempt if attempt and attempt.strip() else None})
        if len(rows) == count:
            raise UserError(f"{source}: no records")
    return rows


def choose_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token without adding one to the vocabulary (so the embeddings keep
    their size and the saved model its shape). Labels never come from padding, so any token will do;
    prefer the tokenizer's own, then an unused one, then EOS. Returns how it was chosen."""
    if tokenizer.pad_token is not None:
        return f"the tokenizer's own ({tokenizer.pad_token})"
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *RESERVED_PADS):
        if candidate is not None and candidate in vocab:
            tokenizer.pad_token = candidate
            return f"{candidate} (unused in text)"
    tokenizer.pad_token = tokenizer.eos_token
    return f"EOS ({tokenizer.eos_token}); padded positions are masked and never labels"


def tokenize_example(problem: str, response: str, tokenizer, template: str, max_length: int,
                     wrong_attempt: str | None = None) -> dict:
    """input_ids and labels for one row; labels are -100 over the prompt and over nothing else."""
    prompt_name, chat = TEMPLATES[template]
    if wrong_attempt:
        prompt, add_special_tokens = model_input(load_prompt(REFLECTION_PROMPT), problem, tokenizer, chat,
                                                 attempt=wrong_attempt)
    else:
        prompt, add_special_tokens = model_input(load_prompt(prompt_name), problem, tokenizer, chat)
    encoded = tokenizer(prompt + response, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = encoded["input_ids"] + [tokenizer.eos_token_id]
    offsets = encoded["offset_mapping"]
    # The first token that holds any character of the response. A token spanning the boundary is
    # trained (so no character of the response goes untrained) and counted as `straddled`.
    boundary = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(offsets))
    straddled = boundary < len(offsets) and offsets[boundary][0] < len(prompt)
    labels = [IGNORE_INDEX] * boundary + ids[boundary:]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "length": len(ids), "truncated": truncated,
            "straddled": straddled, "response_tokens": sum(label != IGNORE_INDEX for label in labels),
            "shows_wrong_attempt": bool(wrong_attempt)}


def _tokenize_batch(batch: dict, tokenizer, template: str, max_length: int) -> dict:
    out = [tokenize_example(p, r, tokenizer, template, max_length, a)
           for p, r, a in zip(batch["problem"], batch["response"], batch["wrong_attempt"])]
    return {key: [example[key] for example in out] for key in out[0]}


def tokenized_dataset(rows: list[dict], tokenizer, template: str, max_length: int, cache_dir, num_proc=None):
    """The rows tokenized with `datasets.map`, cached on disk under `cache_dir` by a hash of the rows,
    the tokenizer, the prompt and the length, so reruns and the other ranks read the cache."""
    import datasets
    from datasets.fingerprint import Hasher

    prompt_name, _ = TEMPLATES[template]
    rows = [{"problem": r["problem"], "response": r["response"], "wrong_attempt": r.get("wrong_attempt")} for r in rows]
    prompts = [load_prompt(prompt_name).text, load_prompt(REFLECTION_PROMPT).text]
    key = hashlib.sha256(json.dumps([rows, prompts, max_length], ensure_ascii=False)
                         .encode()).hexdigest()[:16] + Hasher.hash(tokenizer)[:16]
    cache = Path(cache_dir) / f"sft-{template}-{max_length}-{key}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_list(rows)
    return dataset.map(_tokenize_batch, batched=True, remove_columns=["problem", "response", "wrong_attempt"],
                       fn_kwargs={"tokenizer": tokenizer, "template": template, "max_length": max_length},
                       cache_file_name=str(cache), new_fingerprint=key, num_proc=num_proc,
                       desc=f"tokenizing ({template} prompt)")


def data_stats(dataset) -> dict:
    """What tokenization did to the data, for the log and the output folder."""
    lengths = dataset["length"]
    return {"examples": len(dataset), "tokens": sum(lengths), "response_tokens": sum(dataset["response_tokens"]),
            "max_length": max(lengths), "mean_length": round(sum(lengths) / len(lengths), 1),
            "truncated": sum(dataset["truncated"]), "straddled_boundary": sum(dataset["straddled"]),
            "dropped_no_response_tokens": sum(n == 0 for n in dataset["response_tokens"]),
            "shown_a_wrong_attempt": sum(dataset["shows_wrong_attempt"])}
