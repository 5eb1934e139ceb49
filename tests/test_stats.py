"""peftlab.stats against scipy (t quantiles, t-intervals) and the verdict rules on constructed intervals."""
import math

import pytest

from peftlab import stats

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", list(range(1, 41)) + [50, 80, 120, 1000])
def test_t_quantile_matches_scipy(df):
    assert stats.t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-4)


def test_t_interval_matches_scipy_and_handles_small_samples():
    xs = [0.31, 0.29, 0.35, 0.27, 0.33]
    iv = stats.t_interval(xs)
    lo, hi = scipy_stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / len(xs), scale=scipy_stats.sem(xs))
    assert (iv.lo, iv.hi, iv.n) == (pytest.approx(lo), pytest.approx(hi), 5)
    one = stats.t_interval([1.0, None, float("nan")])  # missing values are dropped; one value has no interval
    assert one.n == 1 and one.mean == 1.0 and math.isnan(one.lo)
    assert stats.t_interval([]).n == 0
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t975(0)


def test_paired_interval_uses_shared_seeds_only():
    a = {0: 1.0, 1: 2.0, 2: 3.5, 7: 100.0}
    b = {0: 0.5, 1: 1.0, 2: 2.0, 3: -100.0}
    iv = stats.paired(a, b)  # seeds 0, 1, 2: differences 0.5, 1.0, 1.5
    assert iv.n == 3 and iv.mean == pytest.approx(1.0)
    half = scipy_stats.t.ppf(0.975, 2) * 0.5 / math.sqrt(3)
    assert (iv.lo, iv.hi) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))


def test_verdicts():
    I = stats.Interval
    assert stats.verdict(I(1.0, 0.2, 1.8, 3)) == stats.HOLDS
    assert stats.verdict(I(-1.0, -1.8, -0.2, 3)) == stats.FAILS
    assert stats.verdict(I(0.5, -0.2, 1.2, 3)) == stats.INCONCLUSIVE
    assert stats.verdict(I(5.0, math.nan, math.nan, 1)) == stats.INCONCLUSIVE  # one seed proves nothing
    assert stats.combine([stats.HOLDS, stats.HOLDS]) == stats.HOLDS
    assert stats.combine([stats.HOLDS, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
    assert stats.combine([stats.INCONCLUSIVE, stats.FAILS]) == stats.FAILS
