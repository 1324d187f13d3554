"""The dataset folder as the Hugging Face Hub takes it: PersonaMathQA.parquet beside the JSONL, and a
dataset card (README.md) with the Hub's YAML header (licence, language, task categories, size, source
datasets, pretty name, the `configs` that name the data file), then the method in short, the
generation model and settings (from the settings each stage wrote beside its outputs), the counts
per stage and source, the decontamination and its result, the provenance, and how to load and upload
it. build_dataset.py writes both; nothing here touches the network.
"""
import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .config import read_settings_used
from .jsonl import replaced, write_text

DATA_FILE = "PersonaMathQA.parquet"
# the generation stages' settings that shape the data, as each stage's settings.STAGE.yaml records them
SETTINGS_SHOWN = ("model", "temperature", "max_tokens", "num_samples", "k", "persona_source", "format",
                  "answer_format", "sampling_seed", "persona_seed")
STAGE_SETTINGS = ("gen_cot", "persona_augment", "reflection")
SOURCES = {  # what the rows were made from: the train splits (the test splits only for decontamination)
    "gsm8k": ("GSM8K", "openai/gsm8k", "MIT (Copyright (c) 2021 OpenAI)"),
    "math": ("MATH", "hendrycks/competition_math", "MIT (Copyright (c) 2021 Dan Hendrycks)"),
}


def size_category(n: int) -> str:
    """The Hub's size_categories bucket of n rows."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "n>10M"


PARQUET_BATCH = 10_000  # rows converted (and held) at a time: a row group each


def write_parquet(path: Path, rows, fields: tuple[str, ...]) -> None:
    """The rows (any iterable, read once) as Parquet, every column text (null where a row has none), in
    the JSONL's order."""
    schema = pa.schema([(name, pa.string()) for name in fields])
    with replaced(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        rows = iter(rows)
        while batch := [{k: row.get(k) for k in fields} for row in itertools.islice(rows, PARQUET_BATCH)]:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def stage_settings(inputs: list) -> dict[str, dict]:
    """Each generation stage's settings, from the settings.STAGE.yaml beside the inputs."""
    found = {}
    for directory in dict.fromkeys(Path(p).parent for p in inputs):
        for stage in STAGE_SETTINGS:
            used = read_settings_used(directory, stage)
            if used and stage not in found:
                found[stage] = {k: v for k, v in used.items() if k in SETTINGS_SHOWN}
    return found


def header(stats: dict) -> dict:
    kept = stats["kept"]
    sources = [s for s in SOURCES if kept["by_source"].get(s)]
    return {"license": "mit", "language": ["en"], "task_categories": ["question-answering", "text-generation"],
            "tags": ["math", "synthetic", "chain-of-thought", "persona"],
            "size_categories": [size_category(kept["total"])],
            "source_datasets": [SOURCES[s][1] for s in sources], "pretty_name": "PersonaMathQA",
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}]}


def render(stats: dict, settings: dict[str, dict]) -> str:
    kept, removed, d = stats["kept"], stats["removed"], stats["decontamination"]
    front = yaml.safe_dump(header(stats), sort_keys=False, allow_unicode=True, width=110)
    model = next((s.get("model") for s in settings.values() if s.get("model")), None)
    lines = ["---", front.rstrip(), "---", "", "# PersonaMathQA", "",
             f"{kept['total']:,} math word problems with step-by-step solutions, made from the GSM8K and MATH train "
             f"questions by the PersonaMath method (Luo et al. 2024, \"PersonaMath: Enhancing Math Reasoning through "
             f"Persona-Driven Data Augmentation\", arXiv 2410.01504) with the PersonaMath reimplementation's "
             f"stage scripts" + (f", the solutions and rewrites written by `{model}`." if model else "."), "",
             "## Method", "",
             "1. **Chain of thought** (`gen_cot.py`): the model solves every train question afresh; a solution is kept "
             "when its final answer (the last `\\boxed{}`) matches the gold answer.",
             "2. **Persona rewrites** (`persona_augment.py`): each solved question is rewritten K1 times, each time as "
             "a persona would pose it, keeping every number and the answer; each rewrite is solved afresh and kept "
             "when its answer still matches the gold.",
             "3. **Reflection** (`reflection.py`): for each question solved wrong, the model is told its attempt is "
             "wrong (never the answer), reflects and corrects it; corrected questions are rewritten K2 times, each "
             "rewrite solved (with reflection when wrong) and kept if correct.",
             "4. **Build** (`build_dataset.py`): exact and near duplicates removed, rows that pose a GSM8K or MATH "
             "test problem removed, shuffled.", "",
             "Columns: `problem` (the instruction), `response` (the solution), `wrong_attempt` (for reflection rows "
             "in the `reflection` format, the attempt the response corrects; else null), `id`, `parent_id` (the "
             "question a rewrite came from), `source` (gsm8k or math), `stage` (cot, persona, reflection, "
             "reflection_persona), `gold`, `persona`, `persona_id`, `model`, `prompt_version`.", "",
             "## Generation settings", ""]
    if settings:
        shown = [k for k in SETTINGS_SHOWN if any(k in s for s in settings.values())]
        lines += ["| stage | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        lines += [f"| {stage} | " + " | ".join(str(s.get(k, "")) for k in shown) + " |" for stage, s in settings.items()]
    else:
        lines.append("No settings.STAGE.yaml was found beside the inputs.")
    lines += ["", "## Counts", "", "| stage | gsm8k | math | total |", "|---|---:|---:|---:|"]
    lines += [f"| {stage} | {c.get('gsm8k', 0):,} | {c.get('math', 0):,} | {kept['by_stage'][stage]:,} |"
              for stage, c in kept["by_stage_source"].items()]
    lines += [f"| total | {kept['by_source'].get('gsm8k', 0):,} | {kept['by_source'].get('math', 0):,} | "
              f"{kept['total']:,} |", ""]
    if stats["yield"]:
        lines += ["| generation stage | inputs | attempted | kept | yield |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {y['stage']} | {y['inputs']:,} | {y['attempted']:,} | {y['kept']:,} | "
                  f"{100 * y['yield']:.1f}% |" for y in stats["yield"]]
        lines.append("")
    lines += [f"Of {stats['rows_read']['total']:,} rows the stages kept, {removed['exact_duplicates']:,} exact and "
              f"{removed['near_duplicates']:,} near duplicates (Jaccard >= {stats['settings']['near_dup_threshold']} "
              f"of word {stats['settings']['near_dup_shingle_words']}-grams) and {removed['contaminated']:,} "
              f"contaminated rows were removed.", "",
              "## Decontamination", "",
              f"Every row was compared with {d['test_items']['distinct']:,} distinct test problems "
              f"({', '.join(Path(f).name for f in stats['settings']['decontaminate'])}): retrieval proposed "
              f"{d['retrieval']['pairs']:,} candidate pairs (lexical top {d['retrieval']['top_k']} and word "
              f"{d['retrieval']['ngram']}-gram overlaps), and "
              f"{'an LLM judge' if d['decided_by'] == 'judge' else 'a rule measured on hand-labelled pairs'} "
              f"decided each ({', '.join(f'{n:,} {label}' for label, n in sorted(d['pair_labels'].items())) or 'none'}). "
              f"Removed: {d['removed']:,} rows (policy: {d['policy']}); kept as siblings (the same template with other "
              f"numbers or another question): {d['siblings_kept']:,} (`siblings_kept.jsonl`). Each removed row is in "
              f"`removed_contaminated.jsonl` with its test item, scores and verdict.", "",
              "## Sources and licences", ""]
    for key, (name, hub_id, licence) in SOURCES.items():
        lines.append(f"- {name} (`{hub_id}`), train split: {licence}. Its test split was used only to decontaminate.")
    lines += ["", "The card says MIT, as its sources; the solutions and rewrites are the model's outputs, so its "
              "provider's terms of use apply to them too. Check both before you publish.", "",
              "## Provenance", ""]
    code, versions = stats["provenance"]["code"], stats["provenance"]["versions"]
    lines.append(f"Built by build_dataset.py at commit `{code.get('git_commit')}`"
                 f"{' (with uncommitted changes)' if code.get('git_dirty') else ''}; "
                 + ", ".join(f"Python {v}" if k == "python" else v for k, v in versions.items() if v) + ". "
                 "The GSM8K and MATH files it was made from are described, with their sources and checksums, in "
                 "the repository's data/SOURCES.md.")
    lines += ["", "Every row and every item dropped on the way, with the reason: open `viewer.html` in a browser "
              "(offline; its data in `viewer_data/` beside it).", "",
              "## Use", "", "```python", "from datasets import load_dataset", "",
              f'rows = load_dataset("parquet", data_files="{DATA_FILE}", split="train")  # this folder',
              'rows = load_dataset("json", data_files="PersonaMathQA.jsonl", split="train")  # the same rows',
              "```", "",
              "To publish this folder as a dataset repository on the Hub (the card and the data as they are):", "",
              "```bash", "hf upload --repo-type dataset YOUR_NAME/PersonaMathQA . . --exclude '*.sqlite*'", "```", "",
              "(`--exclude`: the judge's response cache, where build_dataset ran with `--judge llm`.)", ""]
    return "\n".join(lines)


def write_card(out_dir: Path, inputs: list, stats: dict) -> Path:
    path = Path(out_dir) / "README.md"
    write_text(path, render(stats, stage_settings(inputs)))
    return path
