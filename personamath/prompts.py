"""Prompt templates: versioned text files in personamath/prompts/, named `<name>.v<N>.txt`.

A template's `{field}` placeholders are filled in one pass, so other braces (`\\boxed{answer}`) and
braces inside the filled-in values are left alone.
"""
import functools
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
PLACEHOLDER = re.compile(r"\{(\w+)\}")
LOADED: dict[str, str] = {}  # name -> version of every template this process loaded, for provenance


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str  # e.g. "alpaca.v1": recorded with every output so results name the exact prompt
    text: str

    def render(self, **fields: str) -> str:
        # Checked this way round because templates also hold literal braces such as `\\boxed{answer}`.
        unused = set(fields) - set(PLACEHOLDER.findall(self.text))
        if unused:
            raise KeyError(f"prompt {self.version} has no placeholder for {sorted(unused)}")
        return PLACEHOLDER.sub(lambda m: fields.get(m.group(1), m.group(0)), self.text)


@functools.cache  # read once: training renders a prompt per example
def load_prompt(name: str, version: int | None = None) -> Prompt:
    """The given version of a template, or its newest."""
    versions = sorted(int(p.name.split(".v")[-1][:-4]) for p in PROMPT_DIR.glob(f"{name}.v*.txt"))
    if not versions:
        raise FileNotFoundError(f"no prompt named {name!r} in {PROMPT_DIR}")
    version = versions[-1] if version is None else version
    path = PROMPT_DIR / f"{name}.v{version}.txt"
    LOADED[name] = f"{name}.v{version}"
    return Prompt(name=name, version=f"{name}.v{version}", text=path.read_text(encoding="utf-8"))


def model_input(prompt: Prompt, question: str, tokenizer, chat: bool, **fields: str) -> tuple[str, bool]:
    """The text a model sees for `question`, and whether the tokenizer should add its special tokens.

    With `chat`, the rendered prompt becomes the user turn of the tokenizer's chat template, whose text
    already holds the BOS token (so none is added); otherwise the tokenizer adds its own (LLaMA's BOS)."""
    text = prompt.render(instruction=question, **fields)
    if not chat:
        return text, True
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True), False
