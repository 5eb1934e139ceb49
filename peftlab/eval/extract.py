"""GSM8K answer extraction and numeric comparison.

Strict: only explicit answer markers, in this priority: "#### N", "final answer is N" / "Final Answer: N",
"the answer is N" / "The answer is: N", \\boxed{N}; the LAST occurrence of the highest-priority marker that announces a
number wins, so a self-correction ("#### 7 ... wait ... #### 8") counts its final answer. Flexible: strict, else the
last number in the text.

A number may carry a sign (not a hyphen inside a word or a range such as "10-20"), a currency sign ($5, -$4, $-4),
thousands separators (1,000 and LaTeX's 1{,}000 / 1\\,000), decimals (3.50 == 3.5), a fraction (3/4, \\frac{3}{4}),
a percent sign or a trailing period. Values compare numerically.

The answer span after a marker is the rest of its sentence (to a newline, "; ! ?", or a period that ends a sentence,
not the one of "i.e."/"e.g."), cut before a justification ("because", "since", "as", "(" ...). The span must start with
a number. That first number is the answer unless a later number in the span is announced as a restatement or result
of what came before: right after "=", "i.e.", "that is", "which is", "equals", "makes", "gives", "a total of", "so"
("6 rows of 9 plus 4, i.e. 58" -> 58; "5 + 3 = 8" -> 8). Numbers that only continue the story keep the first one
("18 dollars and he saves 4 more" -> 18; "42 (6 times 7)" -> 42).
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


_ABBREV = re.compile(r"(?:\b(?:i\.e|e\.g|ie|eg|etc|approx|vs|resp|ca|cf|incl))$", re.IGNORECASE)
_JUSTIFY = re.compile(r"\b(?:because|since|as|given|if|when|where|but|from)\b|\(", re.IGNORECASE)
# a cue at the end of the text between two numbers: the later number restates or results from the earlier ones
_RESULT_CUE = re.compile(r"(?:=|\u2248|->|=>|\u2192|\bi\.?e\.?|\bthat is|\bwhich is|\bthis is|\bit is|\bequals?|"
                         r"\bequal to|\bmakes?|\bmaking|\bgives?|\bgiving|\btotal of|\btotals?|\btotaling|"
                         r"\bso|\bcomes to|\bresults? in|\bto get|\bwe get)[\s:,*$]*$", re.IGNORECASE)


def answer_span(segment: str) -> str:
    """The marker's sentence: up to a newline, '; ! ?' or a sentence-ending period, before any justification."""
    end = len(segment)
    m = re.search(r"\n|[;!?](?=\s|$)", segment)
    if m:
        end = m.start()
    for p in re.finditer(r"\.(?=\s|$)", segment[:end]):
        if not _ABBREV.search(segment[:p.start()]):
            end = p.start()
            break
    span = segment[:end]
    j = _JUSTIFY.search(span)
    return span[:j.start()] if j else span


def _answer_after(segment: str) -> float | None:
    """The number a marker announces (see the module doc): None if its sentence does not start with a number."""
    span = answer_span(segment)
    span = span[_FILLER.match(span).end():]
    if not NUMBER.match(span):
        return None
    answer, prev_end = None, 0
    for m in NUMBER.finditer(span):
        v = to_float(m.group(0))
        if v is not None and (answer is None or _RESULT_CUE.search(span[prev_end:m.start()])):
            answer = v
        prev_end = m.end()
    return answer


def extract_strict(text: str) -> float | None:
    text = normalize(text)
    for marker in MARKERS:
        found = [v for m in marker.finditer(text) if (v := _answer_after(text[m.end():])) is not None]
        if found:
            return found[-1]  # the last answer given: a self-correction wins
    for content in reversed(BOXED.findall(text)):
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


GOLD_TAIL = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)


def gold_answer(answer: str) -> float | None:
    """A reference answer, or None when it has no unambiguous one (the caller refuses the row): GSM8K's '#### N' (the
    last marker), a bare number such as '18' or '1,080', or MetaMath's closing line 'The answer is: N'. Never the
    first number of free text."""
    text = normalize(str(answer)).strip()
    marked = [v for m in MARKERS[0].finditer(text) if (v := _answer_after(text[m.end():])) is not None]
    if marked:
        return marked[-1]
    bare = NUMBER.fullmatch(text.rstrip("."))
    if bare:
        return to_float(bare.group(0))
    last_line = text.splitlines()[-1] if text else ""
    m = GOLD_TAIL.match(last_line.split(". ")[-1]) if last_line else None
    if m:
        rest = last_line.split(". ")[-1][m.end():].rstrip(".")
        tail = NUMBER.fullmatch(rest.strip())
        if tail:
            return to_float(tail.group(0))
    return None


def same_number(pred: float | None, gold: float | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    if pred is None or gold is None:
        return False
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)
