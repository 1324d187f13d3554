"""Answer extraction, kept apart from equivalence (grader.py).

Two families:
- `paper_*`: what the authors' eval scripts extract, reproduced from their observable behaviour
  (the last `\\boxed`/`\\fbox` group; for GSM8K the first number after the last `\\boxed{`, rounded).
- `gsm8k_verify_text`: the GSM8K preprocessing of the `verify` grader.

And the rules of what a solution answers: `final_answer` (the stages and `verify`) and
`restates_problem` (the stages: an answer that only copies the question is not a solution).
"""
import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_group(text: str) -> str | None:
    """The last `\\boxed{...}` (or, when there is none, `\\fbox{...}`) including the command, braces balanced.

    None when the command is absent or its group never closes. Like the authors' helper, the scan
    starts at the command itself, so `\\boxed 5` with no brace after it yields None.
    """
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        if start >= 0:
            break
    else:
        return None
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def strip_boxed(group: str | None) -> str | None:
    """`\\boxed{x}` -> `x`; anything else (including `\\fbox{x}`) -> None, as in the authors' scripts."""
    prefix = "\\boxed{"
    if group is None or not group.startswith(prefix) or not group.endswith("}"):
        return None
    return group[len(prefix) : -1]


def last_boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}`: the MATH gold answer and the `paper` MATH prediction."""
    return strip_boxed(last_boxed_group(text))


_BOXED_UNBRACED = re.compile(r"\\boxed ([^\s$]+)")


def gold_boxed_answer(solution: str) -> str | None:
    """The gold answer of a MATH reference solution: its last `\\boxed{...}`, or for the few train
    solutions written `\\boxed 2`, the token after it."""
    answer = last_boxed_answer(solution)
    if answer is None and (unbraced := _BOXED_UNBRACED.findall(solution)):
        answer = unbraced[-1]
    return answer


# A sign, optional leading digits, at most one of `.`, `,` or `/`, then digits: the authors' number pattern.
# It reads `1,234,567` as `1,234` and `17.6` as one number that is then rounded.
_PAPER_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _is_plain_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:  # a single numeric character such as '½'
        import unicodedata

        unicodedata.numeric(text)
        return True
    except (TypeError, ValueError):
        return False


def paper_gsm8k_number(completion: str) -> int | None:
    """The authors' GSM8K prediction: the first number after the last `\\boxed{`, rounded to an integer.

    Rounding is Python's (half to even). None when there is no `\\boxed{`, no number after it,
    or the number overflows a float.
    """
    parts = completion.split("\\boxed{")
    if len(parts) < 2:
        return None
    match = _PAPER_NUMBER.search(parts[-1].strip())
    if match is None:
        return None
    token = match.group()
    if "/" in token:
        numerator, denominator = token.split("/")
        if not (_is_plain_number(numerator) and _is_plain_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        fraction = Fraction(token.replace(",", ""))
        return round(float(fraction.numerator / fraction.denominator))
    value = float(token.replace(",", ""))
    if value == float("inf"):
        return None
    return round(value)


def paper_gsm8k_gold(gold) -> int:
    """A GSM8K gold as the authors' eval_gsm8k.py reads it: `int(response.split('#### ')[1].replace(',', ''))`.

    So `2,125` and ` 2125\n` read as 2125 (int() allows surrounding whitespace), and a full reference
    answer is read after its first `#### `; a decimal or any other text raises ValueError, as it stops
    their script."""
    text = str(gold)
    if "#### " in text:
        text = text.split("#### ")[1]
    return int(text.replace(",", ""))


def gsm8k_gold(answer_text: str) -> str | None:
    """The gold number of a GSM8K answer (`... #### 1,234`), without thousands separators."""
    _, sep, tail = answer_text.partition("#### ")
    if not sep:
        return None
    gold = tail.strip().replace(",", "")
    return gold or None


# `1,234,567` or `1{,}234`: digit groups of three joined by a comma (LaTeX often braces it).
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:(?:,|\{,\})\d{3})+(?!\d)")


# GSM8K's calculator annotations, `<<48/2=24>>`: they repeat the arithmetic and confuse extraction.
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_verify_text(text: str) -> str:
    """A GSM8K completion as the `verify` grader reads it: calculator annotations dropped and
    `1,234,567` joined into one number instead of three."""
    text = _CALCULATOR.sub("", text)
    return _THOUSANDS.sub(lambda m: m.group().replace("{,}", "").replace(",", ""), text)


# "The (final) answer is X" / "Final answer: X" closing a solution: a stated final answer without a box.
_STATED_ANSWER = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*\$*\s*(.+?)\s*\$*\s*\.?\s*$",
                            re.IGNORECASE)


def final_answer(text: str, answer_format: str = "boxed") -> str | None:
    """The final answer of a solution: the one rule of the generation stages and of the `verify` grader
    (the `paper` grader's MATH extraction is the same last box). It is the content of the last `\\boxed{}`,
    so a solution that corrects itself is read by its last word, and `\\boxed{1, 2}` stays one set answer.
    With answer_format "stated", a solution without a box may instead close with "The final answer is X"
    (as Qwen2.5-Math's parser reads "the answer is"). None when the text gives no final answer."""
    boxed = last_boxed_answer(text)
    if boxed is not None or answer_format == "boxed":
        return boxed
    for line in reversed([line for line in text.strip().splitlines() if line.strip()][-3:]):
        match = _STATED_ANSWER.search(line)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return None


# What only spells an answer differently: `\dfrac`/`\tfrac` for `\frac` (`\dbinom` for `\binom`), `\left(`
# for `(`, spacing commands and spaces, `$`, `\$`, `\%`, a degree sign, and braces, so that `\frac{\pi}{2}`
# and `\frac\pi2` read alike. Dropping braces also merges `\frac{12}{5}` with `\frac{1}{25}`; such a
# collision only leaves an answer to math-verify's judgement, which tells those two apart.
_SPELLING = re.compile(r"(?<=\\)[dt](?=frac|binom)|\\[,;:! $%]|\\(?:left|right|displaystyle)(?![a-zA-Z])|[\s${}~]")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|emph)(?![a-zA-Z])")
_NOT_IN_WORDS = re.compile(r"[^A-Za-z\s(),.'\"{}$]")


def spelling(latex: str) -> str:
    """The text without what only changes how an answer is written (see _SPELLING)."""
    return _SPELLING.sub("", latex).replace("^\\circ", "").rstrip(".")  # `^{ \circ }` is `^\circ` by then


def _is_words(answer: str) -> bool:
    """`odd`, `\\text{(C)}`: words (or a choice's letter), which name an answer and compute nothing."""
    text = _TEXT_COMMAND.sub("", answer)
    return any(c.isalpha() for c in text) and not _NOT_IN_WORDS.search(text)


def restates_problem(answer: str, problem: str, gold: str) -> bool:
    """Whether a final answer only copies an expression of the problem, as `81^{3/4}` for "Evaluate
    $81^{3/4}$": equal to the gold in value, but the question restated, not solved. A final form never
    counts, even where the problem holds it: the gold as written, in any spelling (see _SPELLING); a
    number, or a list of numbers; words, such as a choice the problem offers (Enter "odd", "even", or
    "neither"). Spelling is ignored on the problem's side too, so `16 ^ {7/4}` restates `16^{7/4}`."""
    spelled = spelling(answer)
    if not spelled or spelled == spelling(gold) or _is_words(answer):
        return False
    if all(_is_plain_number(part) for part in spelled.split(",")):
        return False
    return spelled in spelling(problem)
