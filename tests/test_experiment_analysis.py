"""The analysis scripts beside the experiments: checked against answers worked out by hand."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "length"))

from length_bound import task_loss_excess  # noqa: E402


def test_length_bound_matches_the_closed_form_on_two_lengths():
    """p puts half its mass on length 0 and half on 2; raising the mean to 1.5 with unit weights is a KL
    projection whose optimum is q = (1/4, 0, 3/4): excess = KL(p || q) = 0.5 log 2 + 0.5 log(2/3)."""
    lengths = torch.arange(3, dtype=torch.float64)
    p = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    excess, mean_best = task_loss_excess(p, ones, lengths, 1.5, 2.0)
    assert mean_best == pytest.approx(1.0)
    assert excess == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=2e-3)
    assert task_loss_excess(p, ones, lengths, 0.5, 1.5)[0] == 0.0  # the optimum already lies in the range


def test_length_bound_uses_the_per_token_optimum_as_its_zero():
    """With weights 1/(L+1) the unconstrained optimum is q ∝ p/(L+1), shorter than p: a range around p's own
    mean costs something, a range around the optimum's mean costs nothing."""
    lengths = torch.arange(11, dtype=torch.float64)
    p = torch.zeros(11, dtype=torch.float64)
    p[[1, 9]] = 0.5
    w = 1 / (lengths + 1)
    excess, mean_best = task_loss_excess(p, w, lengths, 4.9, 5.1)  # p's own mean is 5
    assert mean_best == pytest.approx((0.25 * 1 + 0.05 * 9) / (0.25 + 0.05))
    assert excess > 1e-3
    assert task_loss_excess(p, w, lengths, mean_best - 0.1, mean_best + 0.1)[0] == 0.0


def test_paired_difference_of_two_models_on_the_same_references():
    from l3m.evaluation import paired_difference

    d = paired_difference([1.0, 2.0, 4.0], [0.5, 1.0, 2.0])  # differences 0.5, 1, 2: mean 7/6
    assert d["mean"] == pytest.approx(7 / 6)
    assert d["se"] == pytest.approx(math.sqrt(((0.5 - 7 / 6) ** 2 + (1 - 7 / 6) ** 2 + (2 - 7 / 6) ** 2) / 2 / 3))
    assert paired_difference([1.0], [2.0]) is None and paired_difference(None, [1.0]) is None
