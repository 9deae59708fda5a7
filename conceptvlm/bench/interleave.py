"""Interleaved timing: models measured turn about in one process, and the spread of their ratio.

Why interleave. A shared machine changes speed on a scale of seconds (another job
starts, the memory bus fills, the clock steps down). Timing a few dozen steps of one
model and then of the other puts the two halves of a ratio in two different moments;
the headline decode ratio moved between 1.8x and 3.0x that way. Here every model makes
one step, then every model the next one (:func:`round_robin`), so a slow moment hits all
of them within a few milliseconds. The order inside a round rotates from round to round,
so no model always runs right after another one's weights went through the caches.

Which ratio (decode). A ConceptMoE decode step is one of two kinds: the concept model
runs on a ``1/R`` share of the steps only. Pairing step ``i`` of the baseline with step
``i`` of ConceptMoE therefore gives a two-valued ratio whose spread is the model's, not
the measurement's. Over one boundary period (``p`` steps, the smallest count holding a
whole number of concepts: 2 at R = 2, 3 at R = 1.5) every window holds the same work, so
the **per-period ratio** ``r_j = sum(a_i) / sum(b_i)`` over the ``p`` steps of window
``j`` (:func:`period_ratios`) is a complete sample of the decode ratio, with both sums
taken in the same moment. Reported: the median of the ``r_j`` (a window hit by another
job moves it little) and their interquartile range (the spread, kept in the JSON with
every per-step time). A bootstrap of the ratio of medians was the alternative; it
resamples the two models' steps independently, which throws away exactly the pairing
in time that interleaving buys, and needs a resampling seed and count to report.

Prefill: one call per model per repeat, interleaved the same way; the per-repeat ratio
of the two adjacent calls, median and interquartile range over the repeats.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)


def round_robin(steps: Mapping[K, Callable[[int], object]], n: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[K, list[float]]:
    """Call ``steps[key](i)`` for ``i`` in ``0..n-1``, every key once per ``i`` (the order
    rotating by one each round); return each key's ``n`` call times, each timed alone."""
    keys = list(steps)
    times: dict[K, list[float]] = {k: [] for k in keys}
    for i in range(n):
        shift = i % len(keys) if keys else 0
        for k in keys[shift:] + keys[:shift]:
            t0 = clock()
            steps[k](i)
            times[k].append(clock() - t0)
    return times


def period_ratios(base_s: Sequence[float], other_s: Sequence[float], period: int) -> list[float]:
    """``sum(base) / sum(other)`` over each window of ``period`` consecutive steps (the
    two sequences interleaved in time, of the same length, a multiple of ``period``)."""
    if len(base_s) != len(other_s) or len(base_s) % period or not base_s:
        raise ValueError(f"period_ratios: {len(base_s)} and {len(other_s)} steps are not whole periods of {period}")
    return [sum(base_s[j:j + period]) / sum(other_s[j:j + period]) for j in range(0, len(base_s), period)]


def period_sums(step_s: Sequence[float], period: int) -> list[float]:
    """Seconds of each window of ``period`` consecutive steps."""
    return [sum(step_s[j:j + period]) for j in range(0, len(step_s) - period + 1, period)]


def spread(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method: within the samples' range), interquartile
    range and that range relative to the median."""
    xs = list(samples)
    if not xs:
        raise ValueError("spread of no samples")
    med = statistics.median(xs)
    q25, _, q75 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "iqr_rel": (q75 - q25) / med if med else 0.0}
