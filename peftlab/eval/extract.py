"""GSM8K answer extraction and numeric comparison.

Strict: only explicit answer formats ("#### N", "The answer is: N", "The final answer is N", \\boxed{N}).
Flexible: strict, else the last number in the text. Numbers may be negative, have thousands separators, decimals,
fractions (3/4, \\frac{3}{4}), currency signs, percent signs and trailing periods; they compare numerically.
"""
from __future__ import annotations

import math
import re

NUM = r"-?\s*\$?\s*-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\s*\$?\s*-?\.\d+"
FRAC = re.compile(r"\\d?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")
STRICT = [
    re.compile(r"####\s*(" + NUM + ")"),
    re.compile(r"[Tt]he final answer is[:\s]*\$?\\?\(?\s*(" + NUM + ")"),
    re.compile(r"[Tt]he answer is[:\s]*\$?\\?\(?\s*(" + NUM + ")"),
]
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
ANY_NUM = re.compile(NUM)


def parse_number(text: str | None) -> float | None:
    """'1,000' -> 1000, '$5.' -> 5, '-3.50' -> -3.5, '3/4' and '\\frac{3}{4}' -> 0.75, '45%' -> 45; None if none."""
    if text is None:
        return None
    t = FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", str(text))
    t = t.replace("$", "").replace("%", "").replace(" ", "").replace("\u2212", "-").rstrip(".")
    t = t.replace(",", "")
    m = re.fullmatch(r"(-?)-?(\d*\.?\d+)(?:/(\d*\.?\d+))?", t)
    if not m:
        m2 = re.search(r"-?\d*\.?\d+(?:/\d*\.?\d+)?", t)
        if not m2:
            return None
        return parse_number(m2.group(0))
    sign = -1.0 if m.group(1) else 1.0
    num = float(m.group(2))
    if m.group(3) is not None:
        den = float(m.group(3))
        if den == 0:
            return None
        num /= den
    return sign * num


def gold_answer(answer: str) -> float | None:
    """GSM8K's reference answer: the number after '####'."""
    return parse_number(answer.split("####")[-1]) if "####" in answer else parse_number(answer)


def extract_strict(text: str) -> float | None:
    for pattern in STRICT:
        hits = pattern.findall(text)
        if hits:
            return parse_number(hits[-1])
    boxed = BOXED.findall(text)
    if boxed:
        return parse_number(boxed[-1])
    return None


def extract_flexible(text: str) -> float | None:
    v = extract_strict(text)
    if v is not None:
        return v
    hits = ANY_NUM.findall(FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text))
    for h in reversed(hits):
        v = parse_number(h)
        if v is not None:
            return v
    return None


def same_number(pred: float | None, gold: float | None, rel: float = 1e-6) -> bool:
    if pred is None or gold is None:
        return False
    return math.isclose(pred, gold, rel_tol=rel, abs_tol=1e-9)
