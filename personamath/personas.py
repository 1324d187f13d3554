"""Personas: the built-in set (resources/personas/isco08.jsonl), a Persona Hub JSONL file, or proposed by the LLM."""
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import RESOURCES
from .jsonl import iter_jsonl

BUILTIN = RESOURCES / "personas" / "isco08.jsonl"


@dataclass(frozen=True)
class Persona:
    id: str
    text: str


def load_personas(path=BUILTIN) -> list[Persona]:
    """Personas of a JSONL file with a `persona` field per line (Persona Hub's format); `id` is optional."""
    path = Path(path)
    personas = []
    for lineno, record in iter_jsonl(path):
        text = record.get("persona")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{lineno}: no `persona` text")
        personas.append(Persona(id=str(record.get("id", f"{path.stem}:{lineno}")), text=text.strip()))
    if not personas:
        raise UserError(f"{path}: no personas")
    return personas


def choose(personas: list[Persona], key: str, k: int, seed: int) -> list[Persona]:
    """k distinct personas for one question, the same on every run (seeded by the question's id)."""
    return random.Random(f"{seed}:{key}").sample(personas, min(k, len(personas)))


def proposed(text: str) -> Persona:
    """A persona the LLM proposed; its id is a hash of the text, so equal proposals share it."""
    return Persona(id="llm:" + hashlib.sha256(text.encode()).hexdigest()[:12], text=text)


def add_persona_args(parser, k_help: str) -> None:
    g = parser.add_argument_group("personas")
    g.add_argument("--k", type=int, default=3, help=k_help)
    g.add_argument("--persona_source", choices=["builtin", "file", "llm"], default=None,
                   help="builtin: the package's 100 ISCO-08 personas (default); file: --persona_file; "
                        "llm: the LLM proposes who would pose each question (text-to-persona)")
    g.add_argument("--persona_file", default=None, help="JSONL with a `persona` field per line (Persona Hub's format)")
    g.add_argument("--persona_seed", type=int, default=0, help="seeds which personas each question gets")


def persona_pool(args) -> list[Persona] | None:
    """The fixed pool the personas are drawn from; None when the LLM proposes them."""
    source = args.persona_source or ("file" if args.persona_file else "builtin")
    if source == "llm":
        return None
    if source == "file" and not args.persona_file:
        raise UserError("--persona_source file needs --persona_file")
    return load_personas(args.persona_file if source == "file" else BUILTIN)
