"""The gap verdict, as a stated test: does the paper's number lie in a t confidence interval of ours?

Seeds are a small sample of runs, so the interval of the seed mean uses Student's t with n-1 degrees of
freedom (mean ± t·s/√n). Where the paper reports its own seeds (MAE's four fine-tunes), the interval is
Welch's, for the difference of the two means. A tolerance set in the spec (``report: {tolerance: 0.5}``)
widens the interval on both sides: a gap smaller than it is not worth a flag.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONSISTENT, GAP, NO_TEST = "consistent", "gap", "n<2: no test"


@dataclass(frozen=True)
class Verdict:
    label: str
    low: float | None = None  # the interval for ours − paper, tolerance included
    high: float | None = None


def t_quantile(q: float, dof: float) -> float:
    from scipy.special import stdtrit  # the inverse t CDF, without importing all of scipy.stats

    return float(stdtrit(dof, q))


def verdict(ours: list[float], paper: float, paper_seeds: list[float] | None = None, tolerance: float = 0.0,
            confidence: float = 0.95) -> Verdict:
    n = len(ours)
    if n < 2:
        return Verdict(NO_TEST)
    q = 1 - (1 - confidence) / 2
    mean, var = statistics.fmean(ours), statistics.variance(ours)
    if paper_seeds and len(paper_seeds) >= 2:
        m = len(paper_seeds)
        pvar = statistics.variance(paper_seeds)
        se2 = var / n + pvar / m
        diff = mean - statistics.fmean(paper_seeds)
        # Welch–Satterthwaite degrees of freedom; two constant samples leave a zero-width interval.
        denom = (var / n) ** 2 / (n - 1) + (pvar / m) ** 2 / (m - 1)
        dof = se2 ** 2 / denom if denom > 0 else float(n + m - 2)
    else:
        se2, diff, dof = var / n, mean - paper, float(n - 1)
    half = t_quantile(q, dof) * math.sqrt(se2) + tolerance
    low, high = diff - half, diff + half
    return Verdict(CONSISTENT if low <= 0 <= high else GAP, low, high)


def legend(tolerance: float, confidence: float) -> str:
    pct = f"{confidence * 100:g}%"
    tol = f" widened by the tolerance ±{tolerance:g} (spec report.tolerance)" if tolerance else \
        " (no tolerance set; spec report.tolerance adds one)"
    return (f"verdict: \"{CONSISTENT}\" when the paper's number lies in the {pct} confidence interval of our "
            f"seed mean, mean ± t(n−1)·s/√n{tol}; where the paper gives its own seeds, Welch's {pct} interval "
            f"for the difference of the two means is used instead; \"{GAP}\" otherwise; \"{NO_TEST}\" with one "
            "seed; \"other data\" when the run's data is not the paper's (no Δ, see its deviations); "
            "\"data unknown\" when the records carry no data fingerprint.")
