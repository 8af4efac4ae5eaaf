"""Response-quality numbers for ``l3m evaluate``: length, cut-off share, repetition, diversity.

Pure functions over sampled responses given as token-id lists (the end-of-turn token not included) and one
flag per response saying whether it was cut off at ``max_new_tokens`` without an end token. Responses are
grouped consecutively, ``k`` per prompt, when ``k`` is given.

The cut-off share's 95% interval is a percentile bootstrap of the mean, resampling prompts (each with its
``k`` responses, as ``l3m evaluate`` does for the constraints) when ``k`` is given and single responses
otherwise. When no response (or every response) is cut off, every resample gives the same share and the
interval is that single point.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence

import torch


def ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The token ``n``-grams of one response, in order, overlapping (none when it is shorter than ``n``)."""
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def repeats_ngram(ids: Sequence[int], n: int = 4, times: int = 3) -> bool:
    """Whether some token ``n``-gram occurs ``times`` or more times in ``ids`` (occurrences may overlap)."""
    if n < 1 or times < 1:
        raise ValueError(f"n and times must be >= 1, got n={n}, times={times}")
    counts = Counter(ngrams(ids, n))
    return bool(counts) and max(counts.values()) >= times


def repetition_rate(completion_ids: Sequence[Sequence[int]], n: int = 4, times: int = 3) -> float:
    """Share of responses in which some token ``n``-gram occurs ``times`` or more times (NaN for no responses)."""
    if not completion_ids:
        return math.nan
    return sum(repeats_ngram(ids, n, times) for ids in completion_ids) / len(completion_ids)


def distinct_n(completion_ids: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct token ``n``-grams over all ``n``-grams, pooled over all responses (NaN when there are none)."""
    grams = [g for ids in completion_ids for g in ngrams(ids, n)]
    if not grams:
        return math.nan
    return len(set(grams)) / len(grams)


def bootstrap_share_ci(
    flags: Sequence[bool], k: int | None = None, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the share of true ``flags``.

    With ``k`` the flags are grouped consecutively, ``k`` per prompt, and prompts are resampled (each prompt's
    share is the unit); without it single flags are resampled. Fewer than two units give the point estimate twice.
    """
    unit = 1 if k is None else k
    if unit < 1 or len(flags) % unit:
        raise ValueError(f"k must be >= 1 and divide the number of responses ({len(flags)}), got k={k}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    shares = torch.as_tensor([bool(f) for f in flags], dtype=torch.float64).reshape(-1, unit).mean(1)
    return bootstrap_ci(shares, n_boot, level, seed)


def bootstrap_ci(per_unit: torch.Tensor, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over units (``per_unit`` holds one value per unit, e.g. per
    prompt); the resamples are drawn 256 at a time, which bounds memory and draws the same numbers as one draw.
    Fewer than two units give the point estimate twice."""
    n = per_unit.numel()
    if n < 2:
        v = float(per_unit.double().mean()) if n else math.nan
        return v, v
    g = torch.Generator().manual_seed(seed)
    values = per_unit.double()
    means = torch.cat(
        [values[torch.randint(0, n, (min(256, n_boot - i), n), generator=g)].mean(1) for i in range(0, n_boot, 256)]
    )
    tails = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, tails).tolist()
    return lo, hi


def quality_stats(
    completion_ids: list[list[int]], truncated: list[bool], n_boot: int = 2000, seed: int = 0, k: int | None = None
) -> dict:
    """Quality numbers of a set of sampled responses.

    Keys: ``n`` (responses), ``median_length`` and ``mean_length`` (tokens), ``truncated_share`` (share cut off
    at ``max_new_tokens``) with ``truncated_ci`` (``[lo, hi]``, its 95% percentile bootstrap interval, over
    prompts when ``k`` is given, else over responses), ``repetition_rate`` (share of responses in which some
    token 4-gram occurs 3 or more times) and ``distinct_2`` (distinct token bigrams over all bigrams, pooled
    over all responses). Undefined numbers (no responses, no bigrams) are NaN.
    """
    if len(truncated) != len(completion_ids):
        raise ValueError(f"{len(truncated)} truncated flags for {len(completion_ids)} responses")
    lengths = [len(ids) for ids in completion_ids]
    n = len(lengths)
    return {
        "n": n,
        "median_length": float(statistics.median(lengths)) if n else math.nan,
        "mean_length": statistics.fmean(lengths) if n else math.nan,
        "truncated_share": sum(bool(t) for t in truncated) / n if n else math.nan,
        "truncated_ci": list(bootstrap_share_ci(truncated, k=k, n_boot=n_boot, seed=seed)),
        "repetition_rate": repetition_rate(completion_ids, n=4, times=3),
        "distinct_2": distinct_n(completion_ids, n=2),
    }


# two-sided 95% quantiles of Student's t by degrees of freedom (from any t table); beyond 30 the normal's 1.96
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T95 |= {15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(values: Sequence[float]) -> dict | None:
    """Mean of a few values (e.g. one per training seed) with its standard error and 95% Student-t interval.

    ``{"mean", "se", "ci95": [lo, hi], "n"}``; one value has no interval (``se`` NaN, ``ci95`` None), none gives
    None. Between tabulated degrees of freedom the quantile of the next smaller one is used (wider: conservative).
    """
    xs = [float(v) for v in values]
    if not xs:
        return None
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": m, "se": math.nan, "ci95": None, "n": 1}
    se = statistics.stdev(xs) / math.sqrt(len(xs))
    df = len(xs) - 1
    t = _T95[max(d for d in _T95 if d <= df)] if df <= 30 else 1.96
    return {"mean": m, "se": se, "ci95": [m - t * se, m + t * se], "n": len(xs)}
