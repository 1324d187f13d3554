"""Training throughput of train.py's data path against the authors' method, in one run.

    python bench/bench_train.py [--rows 512 --steps 40 --batch_size 8]

Same data (real GSM8K and MATH train solutions as PersonaMathQA rows), same tiny Llama (random
weights, SmolLM2 tokenizer), same HF Trainer on the CPU; only the data path differs:
- authors: raw text per example, tokenized by the collator at every step (the prompt tokenized again
  apart to find the mask), padded to the longest of a randomly ordered batch;
- train.py: tokenized once, padded to the longest (random order, then --group_by_length), and --packing.
Prints real (non-pad) tokens per second and the fraction of non-pad tokens in the batches, with each
variant's tokens/s as a ratio to the authors'. Targets: packing >= 95% non-pad and >= 1.5x tokens/s.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the test doubles

import torch  # noqa: E402
from transformers import AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import train  # noqa: E402
from personamath import sft  # noqa: E402
from personamath.jsonl import read_jsonl  # noqa: E402
from personamath.prompts import load_prompt  # noqa: E402
from tiny_model import make_tiny_llama  # noqa: E402


def real_rows(n: int) -> list[dict]:
    gsm8k = read_jsonl(ROOT / "data/gsm8k/train.jsonl")[:n // 2]
    math = read_jsonl(ROOT / "data/math/MATH_train.jsonl")[:n - n // 2]
    return ([{"problem": r["question"], "response": r["answer"]} for r in gsm8k]
            + [{"problem": r["problem"], "response": r["solution"]} for r in math])


class AuthorsCollator:
    """The authors' data path: tokenize (prompt + response + EOS text) and the prompt alone for every
    batch, mask by the prompt's token count, pad to the longest with the pad token."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.prompt = load_prompt("alpaca_sft")

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt").input_ids[0]

    def __call__(self, rows):
        input_ids, labels = [], []
        for row in rows:
            source = self.prompt.render(instruction=row["problem"])
            ids = self._ids(source + row["response"] + self.tokenizer.eos_token)
            label = ids.clone()
            label[:len(self._ids(source))] = sft.IGNORE_INDEX
            input_ids.append(ids)
            labels.append(label)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.nn.utils.rnn.pad_sequence(input_ids, batch_first=True, padding_value=pad)
        labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=sft.IGNORE_INDEX)
        # As the authors did: the mask is "not the pad token" (which also hides EOS where pad == EOS).
        return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad)}


class Counting:
    """Wraps a collator and counts real and padded token positions in what it returns."""

    def __init__(self, collate, real_tokens):
        self.collate, self.real_tokens = collate, real_tokens
        self.real = self.total = 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.total += batch["input_ids"].numel()
        self.real += sum(self.real_tokens(e) for e in examples)
        return batch


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run(name, model_dir, dataset, collate, args, out_dir, group_by_length=False, packing=False) -> dict:
    torch.manual_seed(0)
    model = train.load_model(train.ModelArguments(str(model_dir)), train.TrainingArguments(str(out_dir)), packing)
    training_args = TrainingArguments(output_dir=str(out_dir / name), per_device_train_batch_size=args.batch_size,
                                      max_steps=args.steps, learning_rate=2e-5, use_cpu=True, report_to="none",
                                      save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                                      disable_tqdm=True, seed=0, dataloader_pin_memory=False,
                                      train_sampling_strategy="group_by_length" if group_by_length else "random")
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"variant": name, "seconds": seconds, "real": collate.real, "total": collate.total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_llama(tmp / "model")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        sft.choose_pad_token(tokenizer)
        rows = real_rows(args.rows)
        tokenized = sft.tokenized_dataset(rows, tokenizer, "alpaca", args.max_length, tmp / "cache") \
            .remove_columns(["truncated", "straddled", "response_tokens"])
        lengths = tokenized["length"]
        authors_rows = [dict(row, length=n) for row, n in zip(rows, lengths)]

        def real(example):
            return example["length"]

        padded = train._without_length(train.collator(tokenizer, packing=False, pad_to_multiple_of=None))
        packed = train._without_length(train.collator(tokenizer, packing=True, pad_to_multiple_of=None))
        variants = [
            lambda: run("authors", model_dir, ListDataset(authors_rows),
                        Counting(AuthorsCollator(tokenizer, args.max_length), real), args, tmp),
            lambda: run("train.py", model_dir, tokenized, Counting(padded, real), args, tmp),
            lambda: run("train.py --group_by_length", model_dir, tokenized, Counting(padded, real), args, tmp,
                        group_by_length=True),
            lambda: run("train.py --packing", model_dir, tokenized, Counting(packed, real), args, tmp, packing=True),
        ]
        # Rounds in turn, the fastest round of each variant kept: a shared 2-core box is noisy.
        rounds = [[variant() for variant in variants] for _ in range(args.rounds)]
    results = [min(runs, key=lambda r: r["seconds"]) for runs in zip(*rounds)]
    for r in results:
        r["tokens_per_s"], r["non_pad"] = r["real"] / r["seconds"], r["real"] / r["total"]
    base = results[0]["tokens_per_s"]
    print(f"\n{args.rows} rows (GSM8K + MATH train solutions), {args.steps} steps of {args.batch_size}, "
          f"best of {args.rounds} rounds, tiny Llama, CPU ({os.cpu_count()} threads)\n")
    print(f"| variant | non-pad tokens | real tokens/s | vs authors |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['non_pad']:.1%} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x |")
    packing = results[-1]
    met = packing["non_pad"] >= 0.95 and packing["tokens_per_s"] / base >= 1.5
    print(f"\ntargets (packing >= 95% non-pad, >= 1.5x the authors' tokens/s): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
