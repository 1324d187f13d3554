"""Whether a training row poses the same problem as a test item: the rule that decides contamination
when no LLM judge is configured (decontamination.py proposes the candidate pairs).

Two texts pose the same problem when training on one leaks the other's answer: the same quantities
and expressions, and the same question. Reworded, reordered, numbers spelled out, other LaTeX
spacing, a persona's sentences around it: all the same problem. The same template with one number
changed, another quantity asked, or a condition added is a sibling, and is not contaminated.

The rule compares the mathematics of the pair, in this order (the first that fails decides):
1. quantities: every quantity of the test item is in the row, by value (`1,000` = `1000` =
   `one thousand`; `\\frac12` = `1/2` = `0.5` = `half`; `thrice` = `3`; `50%` = `50` = `0.5`);
2. expressions: every LaTeX expression of the test item is in the row, up to spelling (spacing,
   braces, `\\dfrac` vs `\\frac`, `\\left(`, `$` vs `\\(`; parser.spelling);
3. no added quantity: the row states at most --max_added_quantities quantities the test item lacks,
   and none in a clause that shares most of its words with the test item (a persona's "in my 20
   years of teaching" shares none);
4. what is asked: the names in capitals of the test item (`the word THAT`) are in the row; the row's
   question names no notion (sum, area, prime, largest, ...) the test item never names; and a
   question kept nearly word for word asks about the same thing (not `offense` for `defense`, not
   `Find $a$` for `Find $b$`);
5. the answers, where the row's gold answer and the test item's are both known: a row answered
   otherwise does not leak the test item's answer, so it is not the same problem (unless it holds
   the test item word for word: then it is its question, whatever answer it was given);
6. the setting: enough of the test item's words are in the row, more when it has few quantities and
   formulas (two numbers in common are a coincidence, not a rewrite). An agreeing answer counts as
   a formula, and with it and many quantities and formulas found (6: quantities plus twice the
   formulas) no share of words is asked; step 3 then allows persona numbers freely.
The thresholds are measured on the hand-labelled cases of bench/decontamination/ (see
bench/bench_decontamination.py --sweep).
"""
import re
from difflib import SequenceMatcher
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property

from .grader import paper_math_equiv
from .parser import spelling
from .rewrites import SCALES, TENS, UNITS, number_value, numbers

# Asymptote figure code: coordinates and drawing commands, not the problem's quantities. A rewrite
# may keep or drop the figure; another question about the same figure is a sibling, decided by 5.
ASY = re.compile(r"\[asy\].*?\[/asy\]", re.DOTALL | re.IGNORECASE)
MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)
FRACTION = re.compile(r"\\[dt]?frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))"
                      r"|(?<![\d.,/])(\d+)\s*/\s*(\d+)(?![\d/])")
PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:\\?%|percent\b|per cent\b)")
MULTIPLIERS = {"twice": 2, "thrice": 3, "double": 2, "doubled": 2, "doubles": 2, "triple": 3, "tripled": 3,
               "triples": 3, "quadruple": 4, "quadrupled": 4, "half": Decimal("0.5"), "halves": Decimal("0.5"),
               "dozen": 12, "dozens": 12, "quarter": Decimal("0.25"), "quarters": Decimal("0.25")}
DENOMINATORS = {"half": 2, "halve": 2, "third": 3, "quarter": 4, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
                "eighth": 8, "ninth": 9, "tenth": 10, "twelfth": 12}
SMALL = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
         "nine": 9, "ten": 10}
# `one-sixth`, `two thirds`, `one and a quarter`, `3 and a half`: fractions in words.
WORD_FRACTION = re.compile(r"\b(?:(\d+|" + "|".join(SMALL) + r")\s+and\s+)?(" + "|".join(SMALL) + r")[-\s]+("
                           + "|".join(DENOMINATORS) + r")s?\b", re.IGNORECASE)
MULTIPLIER = re.compile(r"\b(" + "|".join(MULTIPLIERS) + r")\b", re.IGNORECASE)
# An expression's parts: a segment `p = ... \\quad \\text{and} \\quad q = ...` holds four, an equation two sides,
# which a rewrite may write in other segments ("A sends u to v" for `Au = v`).
EXPRESSION_BREAK = re.compile(r"\\q?quad|=|\\(?:text|mbox|textrm|mathrm)\s*\{[^{}]*\}")
# The question is the test item's, up to a few words, when this share of its words stay in order: only then
# is a word swapped in it taken for another quantity asked (a rewording moves and replaces many).
QUESTION_KEPT = 0.6
SHORT_QUESTION = 6  # words: a question this short ("Find $b$.") is compared whatever the rewording
FORMULA_SYMBOLS = 3  # an expression this long is a formula (`x` or `$D$` is a name)
# Quantities plus twice the formulas, from which the mathematics found in the row is
# no coincidence; below it, each one fewer raises the share of the test item's words the row must hold.
STRONG_EVIDENCE = 3
SETTING_STEP = 0.15
FEW_WORDS = 4
ANSWER_NOTE = {True: "; the answers agree", None: "",
               False: "; the answers differ, but the row copies the test item word for word"}
# Two prose words: a `$` that opens a price ("$80,000 and then puts in $50,000"), not mathematics.
PROSE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}\s+[a-zA-Z]{2,}\b")
# A clause: where a persona's aside ("I've been a carpenter for 30 years") ends and the problem goes on.
CLAUSE_END = re.compile(r"[,;:]\s+|\s+(?:but|so|while|because)\s+")
MATH_TOKEN = re.compile(r"\\[a-zA-Z]+|\d+(?:\.\d+)?|[a-zA-Z]|[^\s\w$]")
FLAT_WORD = re.compile(r"\w+")
NAME = re.compile(r"\b[A-Z]{2,}\b")
# What a question asks for: a rewrite keeps these notions (under one of the names of a group); another
# quantity asked of the same story usually names another one.
TERM_GROUPS = ["prime primes", "divisor divisors factor factors", "multiple multiples", "sum", "product", "quotient",
               "remainder", "area", "perimeter", "circumference", "volume", "radius", "diameter", "probability",
               "mean average", "median", "largest greatest biggest maximum", "smallest least lowest minimum",
               "domain", "slope", "intercept"]
TERMS = {word: group.split()[0] for group in TERM_GROUPS for word in group.split()}
# A sentence ends at . ? ! followed by space (not inside `$3.5$`), or at a line break.
SENTENCE_END = re.compile(r"(?:(?<=[.?!])|(?<=[.?!]\$))\s+(?=[A-Z\\$(\"'])|\n+")
QUESTION_START = re.compile(r"^\W*(what|how|find|compute|determine|evaluate|calculate|express|simplify|solve|"
                            r"which|who|when|where|give|enter|if|let|suppose|is|are|can|could|does|do)\b", re.I)
WORD = re.compile(r"[a-z]+")
STOPWORDS = frozenset("""a about above after again all also am an and any are as at be because been before being
below between both but by can could did do does doing done down during each either else ever every few for from
further had has have having he her here hers herself him himself his how i if in into is it its itself just let
like me more most much my myself no nor not now of off on once only or other our ours ourselves out over own same
she should so some such than that the their theirs them themselves then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your yours
yourself yourselves one ones many get gets got make makes made use used using want wants need needs help figure
out tell know think really today day please thanks thank""".split())


# Quantities, compared by value in steps 1 and 3, not as words of the setting.
NUMBER_WORDS = frozenset({*UNITS, *TENS, *SCALES, *MULTIPLIERS, *DENOMINATORS, *(d + "s" for d in DENOMINATORS),
                          "times", "number", "numbers"})


def quantities(text: str) -> list[frozenset]:
    """The quantities a text states, each as the set of values it may be written as."""
    found = []

    def fraction(m):
        a, b = (m[1] or m[2] or m[5]), (m[3] or m[4] or m[6])
        whole, part = number_value(a), number_value(b)
        if whole is not None and part:
            found.append(frozenset({(whole / part).normalize()}))
        return " ; "  # consumed: `\frac{1}{2}` is one quantity, not 1 and 2

    def percent(m):
        value = number_value(m[1])
        found.append(frozenset({value, (value / 100).normalize()}))
        return " ; "

    def word_fraction(m):
        whole = Decimal(SMALL.get(m[1].lower(), 0) if m[1] and not m[1].isdigit() else (m[1] or 0))
        found.append(frozenset({(whole + Decimal(SMALL[m[2].lower()]) / DENOMINATORS[m[3].lower()]).normalize()}))
        return " ; "

    def multiplier(m):
        found.append(frozenset({Decimal(MULTIPLIERS[m[1].lower()]).normalize()}))
        return " ; "

    text = FRACTION.sub(fraction, text.replace("{,}", ""))  # `1{,}000`: LaTeX's thousands separator
    text = MULTIPLIER.sub(multiplier, WORD_FRACTION.sub(word_fraction, PERCENT.sub(percent, text)))
    found += [frozenset({v}) for v in numbers(text)]
    return found


def content_word_list(text: str) -> list[str]:
    """Lowercased words that carry meaning, crudely singular (`eggs` -> `egg`), in order."""
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            for w in WORD.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS and w not in NUMBER_WORDS]


def content_words(text: str) -> set[str]:
    return set(content_word_list(text))


def expressions(text: str) -> list[str]:
    """The text's LaTeX math segments up to spelling, those that are more than a lone number."""
    found = []
    for m in MATH.finditer(text):
        segment = next(g for g in m.groups() if g is not None)
        if PROSE.search(EXPRESSION_BREAK.sub(" ", segment)):
            continue
        for part in EXPRESSION_BREAK.split(segment):
            part = spelling(part).strip(",.;:?!")
            if part and number_value(part) is None:
                found.append(part)
    return found


def symbols(expression: str) -> int:
    """An expression's symbols, numbers, variables and commands: `x` has 1, `\\fracx2+\\fracx3` 7."""
    return len(MATH_TOKEN.findall(expression))


def math_terms(text: str) -> set[str]:
    """The mathematical notions a text names (`prime`, `area`, `largest` = `greatest` = `maximum`)."""
    return {TERMS[w] for w in WORD.findall(text.lower()) if w in TERMS}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def clauses(sentence: str) -> list[str]:
    return [c for c in CLAUSE_END.split(sentence) if c.strip()]


def is_question(sentence: str) -> bool:
    return sentence.rstrip().endswith("?") or QUESTION_START.match(sentence) is not None


@dataclass
class Problem:
    """A problem's text, read once for every comparison it takes part in, and its answer where known."""
    text: str
    answer: str | None = None

    @cached_property
    def body(self) -> str:
        return ASY.sub(" ", self.text)

    @cached_property
    def sentences(self) -> list[str]:
        return sentences(self.body)

    @cached_property
    def clauses(self) -> list[str]:
        return [c for s in self.sentences for c in clauses(s)]

    @cached_property
    def clause_quantities(self) -> list[list[frozenset]]:
        return [quantities(c) for c in self.clauses]

    @cached_property
    def values(self) -> frozenset:
        return frozenset(v for qs in self.clause_quantities for q in qs for v in q)

    @cached_property
    def quantities(self) -> list[frozenset]:
        return sorted({q for qs in self.clause_quantities for q in qs}, key=lambda q: min(q))

    @cached_property
    def expressions(self) -> list[str]:
        return expressions(self.body)

    @cached_property
    def spelled(self) -> str:
        """The whole text up to spelling, math delimiters dropped: where expressions are looked for."""
        return spelling(self.body.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", ""))

    @cached_property
    def flat(self) -> str:
        """Its words and numbers, lowercased, one space apart: a test item's is inside a row that copies it."""
        return " " + " ".join(FLAT_WORD.findall(self.text.lower())) + " "  # figure included: another figure, another problem

    @cached_property
    def names(self) -> set[str]:
        """Words in capitals outside mathematics (`the word THAT`, `MATHCOUNTS`): what the problem is about."""
        return set(NAME.findall(MATH.sub(" ", self.body)))

    @cached_property
    def terms(self) -> set[str]:
        return math_terms(self.body)

    @cached_property
    def question_terms(self) -> set[str]:
        return {t for q in self.questions for t in math_terms(q)}

    @cached_property
    def word_list(self) -> list[str]:
        return content_word_list(MATH.sub(" ", self.body))  # prose: `\\frac` is no word of the problem

    @cached_property
    def words(self) -> set[str]:
        return set(self.word_list)

    @cached_property
    def question(self) -> str:
        """The sentence that asks: the last question-like sentence, else the last sentence."""
        asking = [s for s in self.sentences if is_question(s)]
        return (asking or self.sentences or [self.body])[-1]

    @cached_property
    def questions(self) -> list[str]:
        """Every question-like sentence (a rewrite may ask first, or end with a persona's thanks)."""
        return [s for s in self.sentences if is_question(s)] or self.sentences[-1:] or [self.body]


def show(values) -> str:
    return "/".join(sorted(format(v, "f") for v in values))


@dataclass
class Thresholds:
    """The rule's measured settings (decontamination.py's flags of the same names)."""
    added_quantity_overlap: float  # 3: a row clause sharing this share of its words with the test item is in it
    setting_overlap: float  # 4: the least share of the test item's words in the row (more for few quantities)
    max_added_quantities: int  # 3: quantities the row may state that the test item lacks (a persona's "20 years")
    use_answers: bool = True  # 6: the gold answers, where both are known, decide too


@dataclass
class Verdict:
    same: bool
    reason: str


def same_answer(a: str | None, b: str | None) -> bool | None:
    """Whether two gold answers agree (by value, else by the authors' MATH normalisation); None when one
    is unknown."""
    if not (a and a.strip() and b and b.strip()):
        return None
    x, y = number_value(a.strip().strip("$")), number_value(b.strip().strip("$"))
    if x is not None and y is not None:
        return x == y
    try:
        return paper_math_equiv(a.strip(), b.strip()) or spelling(a) == spelling(b)
    except (ArithmeticError, ValueError):
        return spelling(a) == spelling(b)


def word_overlap(row: Problem, test: Problem) -> float:
    return len(test.words & row.words) / len(test.words) if test.words else 1.0


def compare(row: Problem, test: Problem, thresholds: Thresholds) -> Verdict:
    """The rule, step by step (see the module's docstring): the first step that fails says why not."""
    answers = same_answer(row.answer, test.answer) if thresholds.use_answers else None
    missing = [q for q in test.quantities if not q & row.values]
    if missing:
        return Verdict(False, f"the test item's {', '.join(show(q) for q in missing[:4])} not in the row")
    absent = [e for e in test.expressions if e not in row.spelled]
    if absent:
        return Verdict(False, f"the test item's expression ${absent[0]}$ is not in the row")
    added = [(clause, q) for clause, found in zip(row.clauses, row.clause_quantities)
             for q in found if not q & test.values]
    if len(added) > thresholds.max_added_quantities and not answers:
        return Verdict(False, f"the row states {len(added)} quantities the test item lacks "
                              f"({', '.join(show(q) for _, q in added[:4])})")
    for clause, q in added:
        words = content_words(clause)
        if words and len(words & test.words) / len(words) >= thresholds.added_quantity_overlap:
            return Verdict(False, f"the row adds {show(q)} in \"{_short(clause)}\"")
    missing_names = test.names - row.names
    if missing_names:
        return Verdict(False, f"the test item's {', '.join(sorted(missing_names)[:3])} not in the row")
    terms = row.question_terms - test.terms
    if terms:
        return Verdict(False, f"the row asks for {', '.join(sorted(terms)[:3])}, which the test item never names")
    asked = _asks_another(row, test)
    if asked:
        return Verdict(False, asked)
    # The test item word for word in the row is its question, whatever answer the row was given.
    if answers is False and test.flat not in row.flat:
        return Verdict(False, f"the answers differ (row {row.answer}, test item {test.answer})")
    # Many quantities or expressions found again are no coincidence; one or two numbers may be, so the
    # fewer the test item has, the more of its words the row must hold.
    formulas = sum(symbols(e) >= FORMULA_SYMBOLS for e in test.expressions)
    evidence = len(test.quantities) + 2 * formulas
    overlap = word_overlap(row, test)
    needed = thresholds.setting_overlap + SETTING_STEP * max(0, STRONG_EVIDENCE - evidence - 2 * bool(answers))
    if answers and evidence >= 2 * STRONG_EVIDENCE:  # much mathematics and the answer: the words may all be new
        needed = 0.0
    # A problem of a few prose words and a formula ("Solve for $x$: ...") is its mathematics: rewording it
    # may keep none of the words.
    few_words = len(test.words) < FEW_WORDS and formulas and evidence >= STRONG_EVIDENCE
    if overlap < needed and not few_words:
        return Verdict(False, f"only {overlap:.0%} of the test item's words are in the row (needs {needed:.0%} "
                              f"with {evidence} quantities and expressions)")
    return Verdict(True, f"every quantity of the test item ({', '.join(show(q) for q in test.quantities) or 'none'})"
                         f" and expression ({len(test.expressions)}) is in the row, which adds none; "
                         f"{overlap:.0%} of its words" + ANSWER_NOTE[answers])


def _asks_another(row: Problem, test: Problem) -> str | None:
    """The same story with another quantity asked, in a question kept nearly word for word: the row
    asks about something the test item only mentions (`offense` for `defense`, Zack's locker for
    Timothy's), or no longer asks about what the test item asks, which the row only mentions."""
    verbatim = max(SequenceMatcher(None, WORD.findall(q.lower()), WORD.findall(test.question.lower())).ratio()
                   for q in row.questions)
    if verbatim < QUESTION_KEPT and len(WORD.findall(test.question)) > SHORT_QUESTION:
        return None
    test_asks, row_asks = content_words(test.question), {w for q in row.questions for w in content_words(q)}
    now_asked = (row_asks - test_asks) & (test.words - test_asks)
    no_longer = (test_asks - row_asks) & (row.words - row_asks)
    targets = [e for e in expressions(test.question) if not any(e in spelling(q) for q in row.questions)]
    if targets:
        return f"asks about another expression than the test item's ${targets[0]}$ (\"{_short(row.questions[-1])}\")"
    if now_asked and no_longer:
        return (f"asks about {', '.join(sorted(now_asked)[:3])} instead of {', '.join(sorted(no_longer)[:3])} "
                f"(\"{_short(row.questions[-1])}\")")
    return None


def _short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
