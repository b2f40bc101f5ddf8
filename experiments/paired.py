"""Paired statistics over seeds: the rule the CPU study's verdicts follow.

Runs that share a seed share the validation split, the client partition and (without DP) the
client sampling, so a comparison is judged on its per-seed differences d_s, not on group means
treated as independent samples. For a claim "L > margin" (L a linear combination of methods'
accuracies, in percentage points):

* `t_interval`: the two-sided Student-t confidence interval of the mean of d (df = n - 1,
  critical value from scipy's t distribution);
* `verdict`: "reproduced" when the interval lies above the margin, "contradicted" when it lies
  below, "inconclusive" otherwise (or with fewer than two seeds). At 95% this is a one-sided
  test at 2.5% in each direction;
* `sign_flip_p`: the exact one-sided permutation p-value of mean(d - margin) > 0 under the
  null that each difference is symmetric about the margin: the share of the 2^n sign
  assignments whose mean is at least the observed one. It assumes no normality; reported
  beside the interval (with n = 6 seeds its smallest value is 1/64).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
VERDICTS = ("reproduced", "contradicted", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Interval:
  """The mean of n paired differences and its two-sided confidence interval."""
  n: int
  mean: float
  sd: float  # sample standard deviation (ddof 1); nan with n < 2
  half_width: float  # t critical value x sd / sqrt(n); nan with n < 2

  @property
  def low(self) -> float:
    return self.mean - self.half_width

  @property
  def high(self) -> float:
    return self.mean + self.half_width


def t_critical(n: int, confidence: float = CONFIDENCE) -> float:
  """The two-sided Student-t critical value for n paired values (df = n - 1)."""
  if n < 2:
    return math.nan
  return float(stats.t.ppf(0.5 + confidence / 2.0, n - 1))


def t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
  """`Interval` of the differences' mean (module docstring)."""
  d = np.asarray(differences, np.float64)
  n = int(d.size)
  if n == 0:
    return Interval(0, math.nan, math.nan, math.nan)
  mean = float(d.mean())
  if n < 2:
    return Interval(n, mean, math.nan, math.nan)
  sd = float(d.std(ddof=1))
  return Interval(n, mean, sd, t_critical(n, confidence) * sd / math.sqrt(n))


def verdict(interval: Interval, margin: float = 0.0) -> str:
  """'reproduced' (interval above the margin), 'contradicted' (below) or 'inconclusive'."""
  if interval.n < 2 or math.isnan(interval.half_width):
    return "inconclusive"
  if interval.low > margin:
    return "reproduced"
  if interval.high < margin:
    return "contradicted"
  return "inconclusive"


def sign_flip_p(differences: Sequence[float], margin: float = 0.0) -> float:
  """Exact one-sided sign-flip p-value of mean(d - margin) > 0 (module docstring); nan for no
  values. Enumerates all 2^n sign patterns, so n is kept small (the study's seeds)."""
  x = np.asarray(differences, np.float64) - margin
  n = int(x.size)
  if n == 0:
    return math.nan
  if n > 20:
    raise ValueError(f"sign_flip_p enumerates 2^n patterns; n = {n} is too many")
  signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
  means = signs @ x / n
  observed = x.mean()
  # Ties count as at least as extreme (a tolerance for the float sums of equal magnitudes).
  return float(np.mean(means >= observed - 1e-12 * max(1.0, abs(observed))))
