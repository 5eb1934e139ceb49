"""GSM8K answer extraction and numeric comparison.

Strict: only explicit answer markers, in this priority: "#### N", "final answer is N" / "Final Answer: N",
"the answer is N" / "The answer is: N", \\boxed{N}; the first occurrence of the highest-priority marker wins (text after
an answer is usually a runaway continuation). Flexible: strict, else the last number in the text.

A number may carry a sign (not a hyphen inside a word or a range such as "10-20"), a currency sign ($5, -$4, $-4),
thousands separators (1,000 and LaTeX's 1{,}000 / 1\\,000), decimals (3.50 == 3.5), a fraction (3/4, \\frac{3}{4}),
a percent sign or a trailing period. After a marker an equation is read to its result ("The answer is 5 + 3 = 8." -> 8)
and the first number counts ("The answer is 18 dollars and 4 cents" -> 18). Values compare numerically.
"""
from __future__ import annotations

import math
import re

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_SIGN = r"(?:(?<![\w.)\]}])-)?"  # a minus right after a word, digit or bracket is a hyphen / range, not a sign
_CURRENCY = r"(?:[$€£]\s?)?"
NUMBER = re.compile(rf"{_SIGN}{_CURRENCY}{_SIGN}(?<![\w.]){_UNSIGNED}(?:\s?/\s?{_UNSIGNED})?")
MARKERS = [re.compile(p, re.IGNORECASE) for p in (r"####", r"final answer(?:\s+is)?\s*:?", r"answer\s+is\s*:?")]
BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
# what may stand between a marker and its number: spaces, colons, markdown bold, LaTeX math openers, \boxed{
_FILLER = re.compile(r"(?:[\s:*=]|\$(?!\s?[-\d.])|\\\(|\\\[|\\boxed\s*\{|\\text\s*\{|\{)*")
_LATEX = [(re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"), r"\1/\2"),
          (re.compile(r"\{,\}"), ","), (re.compile(r"\\[,!]"), ""), (re.compile(r"\\\$"), "$"),
          (re.compile(r"\\(?:text|mathrm|textbf)\s*\{([^{}]*)\}"), r"\1"), (re.compile("\u2212"), "-")]


def normalize(text: str) -> str:
    """LaTeX fractions to a/b, LaTeX thousands separators and escaped dollars to plain text, unicode minus to '-'."""
    for pattern, repl in _LATEX:
        text = pattern.sub(repl, text)
    return text


def to_float(match: str) -> float | None:
    """One NUMBER match ('-$1,000.50', '3 / 4') as a float; None for a zero denominator."""
    s = re.sub(r"[\s$€£,]", "", match)
    num, _, den = s.partition("/")
    value = float(num)
    if den:
        if float(den) == 0:
            return None
        value /= float(den)
    return value


def parse_number(text: str | None) -> float | None:
    """The first number in a piece of text: '1,000' -> 1000, '$5.' -> 5, '\\frac{3}{4}' -> 0.75; None if none."""
    if text is None:
        return None
    for m in NUMBER.finditer(normalize(str(text))):
        v = to_float(m.group(0))
        if v is not None:
            return v
    return None


def _answer_after(segment: str) -> float | None:
    """The number a marker announces: its sentence must start with a number; an equation is read to its result."""
    segment = re.split(r"\n|\.(?=\s|$)|[;!?](?=\s|$)", segment, maxsplit=1)[0]
    segment = segment[_FILLER.match(segment).end():]
    if not NUMBER.match(segment):
        return None
    return parse_number(segment.rsplit("=", 1)[-1])


def extract_strict(text: str) -> float | None:
    text = normalize(text)
    for marker in MARKERS:
        for m in marker.finditer(text):
            v = _answer_after(text[m.end():])
            if v is not None:
                return v
    for content in BOXED.findall(text):
        v = parse_number(content.rsplit("=", 1)[-1])
        if v is not None:
            return v
    return None


def extract_flexible(text: str) -> float | None:
    v = extract_strict(text)
    if v is not None:
        return v
    for m in reversed(list(NUMBER.finditer(normalize(text)))):
        v = to_float(m.group(0))
        if v is not None:
            return v
    return None


def gold_answer(answer: str) -> float | None:
    """A reference answer: GSM8K's '#### N' (or any strict marker, e.g. MetaMath's 'The answer is: N'), else a bare
    number such as '18' or '1,080'."""
    v = extract_strict(answer)
    return v if v is not None else parse_number(answer)


def same_number(pred: float | None, gold: float | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    if pred is None or gold is None:
        return False
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)
