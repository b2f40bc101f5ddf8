"""experiments/paired.py, the CPU study's verdict rule, against published t tables and scipy's
own tests (scipy.stats.ttest_1samp and permutation_test, not the t quantile the code uses)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from experiments import paired

# Two-sided 95% critical values of Student's t (any statistics textbook's table), by df.
T_TABLE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 7: 2.365, 10: 2.228,
              30: 2.042}


@pytest.mark.parametrize("df,value", sorted(T_TABLE_95.items()))
def test_t_critical_matches_the_published_table(df, value):
  assert paired.t_critical(df + 1) == pytest.approx(value, abs=6e-4)


def test_t_interval_is_scipys_one_sample_interval():
  rng = np.random.default_rng(0)
  for n in (2, 3, 6, 8):
    d = rng.normal(1.5, 2.0, n)
    iv = paired.t_interval(d)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert (iv.low, iv.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert iv.mean == pytest.approx(np.mean(d))
    assert iv.sd == pytest.approx(np.std(d, ddof=1))
    assert iv.n == n


def test_verdict_reads_the_interval_against_the_margin():
  clear = [2.0, 2.5, 3.0, 2.2, 2.8]  # mean 2.5, tight
  assert paired.verdict(paired.t_interval(clear)) == "reproduced"
  assert paired.verdict(paired.t_interval([-x for x in clear])) == "contradicted"
  # The same numbers against a margin above them: contradicted; inside them: inconclusive.
  assert paired.verdict(paired.t_interval(clear), margin=5.0) == "contradicted"
  assert paired.verdict(paired.t_interval(clear), margin=2.5) == "inconclusive"
  # Claim 1's shape: a loss of 1 point is within a margin of -5.
  assert paired.verdict(paired.t_interval([-1.0, -0.5, -1.5, -1.2]), margin=-5.0) == "reproduced"
  noisy = [5.0, -4.0, 6.0, -3.0]
  assert paired.verdict(paired.t_interval(noisy)) == "inconclusive"
  assert paired.verdict(paired.t_interval([3.0])) == "inconclusive"  # one seed: no interval


def test_verdict_agrees_with_scipys_one_sided_tests():
  """At 95%, 'reproduced' is a one-sided t test of mean > margin at 2.5%, 'contradicted' of
  mean < margin at 2.5%."""
  rng = np.random.default_rng(1)
  for _ in range(200):
    n = int(rng.integers(2, 9))
    d = rng.normal(rng.normal(0, 2), rng.uniform(0.2, 3), n)
    margin = float(rng.normal(0, 1))
    v = paired.verdict(paired.t_interval(d), margin)
    above = stats.ttest_1samp(d, margin, alternative="greater").pvalue < 0.025
    below = stats.ttest_1samp(d, margin, alternative="less").pvalue < 0.025
    assert v == ("reproduced" if above else "contradicted" if below else "inconclusive")


def test_sign_flip_p_is_scipys_exact_permutation_test():
  rng = np.random.default_rng(2)
  for n in (2, 3, 6):
    d = rng.normal(0.8, 1.0, n)
    res = stats.permutation_test((d - 0.3,), np.mean, permutation_type="samples",
                                 alternative="greater", n_resamples=np.inf)
    assert paired.sign_flip_p(d, 0.3) == pytest.approx(res.pvalue)


def test_sign_flip_p_by_hand():
  # All positive: only the observed signs reach the observed mean, p = 1 / 2^n.
  assert paired.sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx(1 / 64)
  # Count the 2^3 patterns by hand for [3, -1, 1]: observed mean 1 (sum 3).
  x = [3.0, -1.0, 1.0]
  sums = [sum(s * v for s, v in zip(signs, x)) for signs in itertools.product((1, -1), repeat=3)]
  assert paired.sign_flip_p(x) == pytest.approx(sum(s >= 3 for s in sums) / 8)
  assert math.isnan(paired.sign_flip_p([]))
