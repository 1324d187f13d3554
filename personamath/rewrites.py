"""Whether a persona rewrite still poses the original problem, checked before any money is spent
solving it: every number of the original is still there (as digits or in words), and the rewrite
does not give the answer away (it states the gold answer only if the original already did).

A rewrite that fails is rejected with the reason; one that passes may still be wrong in other ways,
which is what solving it afresh and comparing with the gold answer is for.
"""
import re
from decimal import Decimal, InvalidOperation

from .parser import spelling

UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
NUMBER_WORDS = {**{word: i for i, word in enumerate(UNITS)}, **TENS}
# `1,234.5`, `0.75`, `12`: digits with thousands separators and a decimal part
DIGITS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?")
WORD = re.compile(r"[a-z]+|[^\sa-z-]")  # words, and each other mark, which ends a number in words
# \frac12 is \frac{1}{2}: two numbers, not twelve
BRACELESS_FRACTION = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")


def number_value(token: str) -> Decimal | None:
    """`1,234.50` -> 1234.5; None for what is no number."""
    try:
        return Decimal(token.replace(",", "")).normalize()
    except InvalidOperation:
        return None


def _word_numbers(text: str) -> set[Decimal]:
    """Numbers written in words: `three`, `twenty-five`, `two hundred`, `four thousand five hundred`."""
    found, current, total, in_number = set(), 0, 0, False
    for word in WORD.findall(text.lower()) + [""]:  # "" ends a number at the end of the text
        if word == "one" and not in_number:
            word = ""  # alone, "one" is mostly a pronoun ("one of them"); "twenty-one" still counts
        if word == "and" and in_number:
            continue  # "two hundred and forty"
        if word in NUMBER_WORDS:
            current += NUMBER_WORDS[word]
            in_number = True
        elif word in SCALES and in_number:
            if SCALES[word] == 100:
                current *= 100
            else:
                total += current * SCALES[word]
                current = 0
        elif word in SCALES:  # "a hundred", "a thousand"
            current, in_number = SCALES[word], True
        else:
            if in_number:
                found.add(Decimal(total + current))
            current, total, in_number = 0, 0, False
    return found


def numbers(text: str) -> set[Decimal]:
    """Every number a text states, in digits or in words, as values (so `1,000` and `1000` are one)."""
    text = BRACELESS_FRACTION.sub(r"\\frac{\1}{\2}", text)
    values = {number_value(token) for token in DIGITS.findall(text)}
    return {v for v in values if v is not None} | _word_numbers(text)


def states_answer(text: str, gold: str) -> bool:
    """Whether the text states the gold answer: its value among the text's numbers, or for a gold that
    is no plain number (an expression, a word), its normalised spelling inside the text."""
    value = number_value(gold.strip())
    if value is not None:
        return value in numbers(text)
    spelled = spelling(gold).lower()
    if re.fullmatch(r"[a-z]+", spelled):  # a word must stand alone: "odd" is not in "oddly"
        return re.search(rf"\b{spelled}\b", text.lower()) is not None
    return bool(spelled) and spelled in spelling(text).lower()


def rewrite_problem(original: str, rewrite: str, gold: str) -> str | None:
    """Why the rewrite does not pose the original problem, or None when it passes both checks."""
    missing = numbers(original) - numbers(rewrite)
    if missing:
        shown = ", ".join(sorted(format(v, "f") for v in missing)[:5])
        return f"invalid rewrite: drops numbers of the original ({shown})"
    if states_answer(rewrite, gold) and not states_answer(original, gold):
        return "invalid rewrite: states the answer"
    return None
