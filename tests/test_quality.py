import math

import pytest

from l3m.quality import (
    bootstrap_share_ci,
    distinct_n,
    ngrams,
    quality_stats,
    repeats_ngram,
    repetition_rate,
    t_interval,
)

# 4-gram (1, 2, 3, 4) three times, apart: repeats
THRICE = [1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2, 3, 4]
# the same 4-gram only twice: does not
TWICE = [1, 2, 3, 4, 9, 1, 2, 3, 4, 8]


def test_ngrams():
    assert ngrams([1, 2, 3], 2) == [(1, 2), (2, 3)]
    assert ngrams([1], 2) == []


def test_repeats_ngram_three_times_vs_twice():
    assert repeats_ngram(THRICE)
    assert not repeats_ngram(TWICE)
    assert repeats_ngram(TWICE, times=2)
    assert not repeats_ngram(THRICE, n=5)  # (1,2,3,4,x) never repeats with the same x three times
    # overlapping occurrences count: [7]*6 holds the 4-gram (7,7,7,7) three times
    assert repeats_ngram([7] * 6) and not repeats_ngram([7] * 5)
    assert not repeats_ngram([1, 2, 3])  # shorter than a 4-gram
    with pytest.raises(ValueError):
        repeats_ngram([1, 2], n=0)


def test_repetition_rate():
    assert repetition_rate([THRICE, TWICE, [5, 6], []]) == 0.25
    assert math.isnan(repetition_rate([]))


def test_distinct_2_on_a_known_set():
    # bigrams: (1,2) (2,1) (1,2) | (1,2) (2,3) | none -> 5 bigrams, 3 distinct
    assert distinct_n([[1, 2, 1, 2], [1, 2, 3], [4]]) == pytest.approx(3 / 5)
    assert distinct_n([[1, 2, 3, 4]]) == 1.0
    assert distinct_n([[5] * 5]) == pytest.approx(1 / 4)
    assert math.isnan(distinct_n([[1], []]))


def test_quality_stats_hand_computed():
    ids = [THRICE, TWICE, [1, 2], [3, 4, 5, 6, 7, 8]]  # lengths 14, 10, 2, 6
    truncated = [True, False, False, False]
    s = quality_stats(ids, truncated, n_boot=500)
    assert s["n"] == 4
    assert s["median_length"] == 8.0
    assert s["mean_length"] == 8.0
    assert s["truncated_share"] == 0.25
    lo, hi = s["truncated_ci"]
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0 and lo < hi
    assert s["repetition_rate"] == 0.25
    # bigrams: THRICE 13, 7 distinct ((1,2)(2,3)(3,4)(4,9)(9,1)(4,8)(8,1)); TWICE 9, none new; [1,2] 1, not new;
    # [3..8] 5, of which (3,4) already seen -> 28 bigrams, 7 + 4 distinct
    assert s["distinct_2"] == pytest.approx(11 / 28)


def test_median_of_odd_count():
    assert quality_stats([[0], [0, 0, 0], [0] * 10], [False] * 3)["median_length"] == 3.0


def test_truncated_interval_contains_the_share_and_narrows_with_more_responses():
    flags = [i % 5 == 0 for i in range(200)]  # 40 of 200
    s = quality_stats([[0]] * 200, flags)
    lo, hi = s["truncated_ci"]
    assert s["truncated_share"] == 0.2
    assert lo < 0.2 < hi
    assert 0.1 < lo and hi < 0.3  # binomial s.e. about 0.028
    lo_small, hi_small = bootstrap_share_ci(flags[:20])
    assert hi_small - lo_small > hi - lo
    assert quality_stats([[0]] * 200, flags, seed=1)["truncated_ci"] != s["truncated_ci"]
    assert quality_stats([[0]] * 200, flags)["truncated_ci"] == s["truncated_ci"]


def test_bootstrap_over_prompts_is_wider_when_prompts_cluster():
    # 10 prompts, k=4: whole prompts are cut off (all 4 responses) or not -> fewer independent units than 40
    flags = [p < 3 for p in range(10) for _ in range(4)]
    lo_p, hi_p = quality_stats([[0]] * 40, flags, k=4)["truncated_ci"]
    lo_r, hi_r = quality_stats([[0]] * 40, flags)["truncated_ci"]
    assert lo_p <= 0.3 <= hi_p
    assert hi_p - lo_p > hi_r - lo_r
    with pytest.raises(ValueError, match="divide"):
        quality_stats([[0]] * 40, flags, k=3)


def test_degenerate_cases():
    s = quality_stats([[1, 2]] * 5, [False] * 5)
    assert s["truncated_share"] == 0.0 and s["truncated_ci"] == [0.0, 0.0]
    e = quality_stats([], [])
    assert e["n"] == 0 and math.isnan(e["median_length"]) and math.isnan(e["truncated_share"])
    with pytest.raises(ValueError, match="2 truncated flags for 1 responses"):
        quality_stats([[1]], [True, False])


def test_t_interval_over_three_seeds_by_hand():
    """values 1, 2, 3: mean 2, s.e. 1/sqrt(3), t(0.975, 2 df) = 4.303; one value has no interval."""
    t = t_interval([1.0, 2.0, 3.0])
    assert t["mean"] == 2.0 and t["se"] == pytest.approx(1 / math.sqrt(3))
    assert t["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])
    assert t_interval([0.5])["ci95"] is None and t_interval([]) is None
    wide = t_interval([0.0, 1.0] * 6 + [0.5])  # 12 degrees of freedom: the quantile of 10 (wider) is used
    assert wide["ci95"][1] - wide["mean"] == pytest.approx(2.228 * wide["se"])
