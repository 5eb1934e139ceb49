"""Small-sample statistics for the lab: 95% t-intervals over seeds, paired differences, and a verdict per claim.

No scipy at runtime (it is not a peftlab dependency): the two-sided 95% Student-t quantile comes from a table for
1..30 degrees of freedom and the Cornish-Fisher expansion above (error < 1e-4 there); tests check both against scipy.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# t_{0.975, df} for df = 1..30
_T975 = (12.7062047, 4.30265273, 3.18244631, 2.77644511, 2.57058184, 2.44691185, 2.36462425, 2.30600414,
         2.26215716, 2.22813885, 2.20098516, 2.17881283, 2.16036866, 2.14478669, 2.13144955, 2.11990530,
         2.10981558, 2.10092204, 2.09302405, 2.08596345, 2.07961384, 2.07387307, 2.06865761, 2.06389856,
         2.05953855, 2.05552944, 2.05183052, 2.04840714, 2.04522964, 2.04227246)
_Z975 = 1.959963985


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)  # Cornish-Fisher expansion of t in 1/df around the normal quantile
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


@dataclass
class Interval:
    mean: float
    lo: float  # nan when n < 2 (no spread to estimate)
    hi: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        if self.n < 2 or math.isnan(self.lo):
            return f"{self.mean:.{digits}g} (n={self.n})"
        return f"{self.mean:.{digits}g} [{self.lo:.{digits}g}, {self.hi:.{digits}g}]"


def clean(xs) -> list[float]:
    return [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def t_interval(xs) -> Interval:
    """Mean and its 95% t-interval: mean +- t_{0.975, n-1} s / sqrt(n) (s: the sample std)."""
    xs = clean(xs)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(xs)
    if n < 2:
        return Interval(m, math.nan, math.nan, 1)
    half = t975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


def paired(a: dict, b: dict) -> Interval:
    """95% t-interval of a[seed] - b[seed] over the seeds both have (pairing removes the seed's shared noise:
    same data order, same adapter draw)."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None])


HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive at this power"


def verdict(iv: Interval) -> str:
    """For an interval of (advantage claimed, positive = the claim's direction): holds when the whole 95% interval is
    above 0, does not hold when it is wholly below 0 (the opposite is significant), inconclusive otherwise."""
    if iv.n < 2 or math.isnan(iv.lo):
        return INCONCLUSIVE
    if iv.lo > 0:
        return HOLDS
    if iv.hi < 0:
        return FAILS
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """A chain of claims (A beats B beats C) holds when every link holds and fails when any link fails."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else INCONCLUSIVE
