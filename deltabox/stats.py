"""The one percentile definition every DeltaBox number uses.

`Stats` (the daemon's recent p50/p95), `deltabox bench`, `deltabox demo` and the
rl_examples all summarise latencies here, so a p95 from one is comparable with a p95
from another.

Definition: **linear interpolation between closest ranks**, numpy's default
(`numpy.percentile(x, q, method="linear")`, Hyndman & Fan type 7): for n sorted
samples x[0..n-1], the q-th percentile is at rank h = (n - 1) * q / 100 and equals
x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]). p50 is the median.
It never reports a value outside [min, max]; with few samples the p95 lies between
the two largest (say so where n is small).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentile", "summary", "p50_p95"]


def percentile(samples: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `samples`; NaN when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    s = sorted(samples)
    if not s:
        return float("nan")
    h = (len(s) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (h - lo) * (s[hi] - s[lo])


def p50_p95(samples: Iterable[float]) -> tuple[float, float]:
    s = sorted(samples)
    return percentile(s, 50), percentile(s, 95)


def summary(samples: Iterable[float], digits: int = 3) -> dict:
    """{"p50", "p95", "min", "max", "n"} of `samples`, rounded to `digits`."""
    s = sorted(samples)
    if not s:
        return {"p50": None, "p95": None, "min": None, "max": None, "n": 0}
    return {"p50": round(percentile(s, 50), digits), "p95": round(percentile(s, 95), digits),
            "min": round(s[0], digits), "max": round(s[-1], digits), "n": len(s)}
