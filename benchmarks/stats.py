"""Summary statistics for benchmark samples.

Only order statistics are used (median, min, max, nearest-rank percentiles):
samples from a 2-core host are skewed by scheduling noise, so means and standard
deviations would describe the noise more than the monitors.

Paired ratios: run i of "ours" and run i of the reference were taken back to back
(A B A B ...), so `ours[i] / reference[i]` cancels slow drifts of the host (other
load, frequency, page cache).  The median of those per-pair ratios is the headline
comparison.  A pair where either side failed gives no ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary | None:
    """Median/min/max of the values, None when there are none."""
    if not values:
        return None
    return Summary(n=len(values), median=statistics.median(values), min=min(values),
                   max=max(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least p % of samples <= it.

    Nearest-rank always returns an observed sample (no interpolation), so a p99
    of 2000 latencies is the 1980th smallest one.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is not in (0, 100]")
    ordered = sorted(values)
    rank = math.ceil(p / 100 * len(ordered))
    return ordered[rank - 1]


def paired_ratios(ours: Sequence[float | None], reference: Sequence[float | None]
                  ) -> list[float]:
    """ours[i] / reference[i] for every pair where both sides have a positive value.

    None marks a failed run; a zero reference has no meaningful ratio.  Both lists
    are indexed by pair, so they must have the same length.
    """
    if len(ours) != len(reference):
        raise ValueError(f"{len(ours)} samples of ours against {len(reference)} of the "
                         "reference: pairs must line up")
    return [a / b for a, b in zip(ours, reference, strict=True)
            if a is not None and b is not None and b > 0]


def ratio_summary(ours: Sequence[float | None], reference: Sequence[float | None]
                  ) -> Summary | None:
    """Median/min/max of the per-pair ratios ours/reference."""
    return summarize(paired_ratios(ours, reference))
