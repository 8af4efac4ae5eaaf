"""The relaxed log-barrier, its derivative, the mu schedule and the Lagrange multipliers.

Everything here follows ``method.md`` sections 2-3 and works on Python floats and torch tensors alike.

    B_{mu,s}(z) = -mu * log(-z)               if z <= -s
                =  mu * z / s - mu * log(s) + mu   if z >  -s

    B'(z)       =  mu / max(-z, s)

The paper sets s = mu**2, so as mu -> 0 the barrier tends to the characteristic function of {z <= 0}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch

Number = TypeVar("Number", float, torch.Tensor)


def _default_s(mu: float, s: float | None) -> float:
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    s = mu * mu if s is None else s
    if s <= 0:
        raise ValueError(f"s must be > 0, got {s}")
    return s


def relaxed_log_barrier(z: Number, mu: float, s: float | None = None) -> Number:
    """Value of the relaxed log-barrier ``B_{mu,s}(z)``; ``s`` defaults to ``mu**2`` (the paper's choice)."""
    s = _default_s(mu, s)
    if isinstance(z, torch.Tensor):
        log_branch = -mu * torch.log(torch.clamp(-z, min=s))
        linear_branch = mu * z / s - mu * math.log(s) + mu
        return torch.where(z <= -s, log_branch, linear_branch)
    z = float(z)
    if z <= -s:
        return -mu * math.log(-z)
    return mu * z / s - mu * math.log(s) + mu


def relaxed_log_barrier_grad(z: Number, mu: float, s: float | None = None) -> Number:
    """Derivative ``B'_{mu,s}(z) = mu / max(-z, s)``: positive, non-decreasing in z."""
    s = _default_s(mu, s)
    if isinstance(z, torch.Tensor):
        return mu / torch.clamp(-z, min=s)
    return mu / max(-float(z), s)


def lagrange_multipliers(constraint_values: torch.Tensor, mu: float, s: float | None = None) -> torch.Tensor:
    """lambda_i = B'(C_i) / m for the m constraint estimates C_i (method.md section 3)."""
    m = constraint_values.numel()
    if m == 0:
        return constraint_values.clone()
    return relaxed_log_barrier_grad(constraint_values, mu, s) / m


@dataclass
class MuSchedule:
    """Exponential decay of mu from ``mu_init`` to ``mu_min`` over ``total_steps`` optimiser steps.

    ``mu(t) = mu_init * (mu_min / mu_init) ** (t / (total_steps - 1))``, so step 0 uses ``mu_init`` and the
    last step uses ``mu_min``; past the end mu stays at ``mu_min``.
    """

    mu_init: float = 1.0
    mu_min: float = 0.01
    total_steps: int = 1

    def __post_init__(self) -> None:
        if not (self.mu_init > 0 and self.mu_min > 0):
            raise ValueError(f"mu_init and mu_min must be > 0 (got {self.mu_init}, {self.mu_min})")
        if self.mu_min > self.mu_init:
            raise ValueError(f"mu_min ({self.mu_min}) must not exceed mu_init ({self.mu_init})")

    def __call__(self, step: int) -> float:
        if self.total_steps <= 1:
            return self.mu_min if step > 0 else self.mu_init
        frac = min(max(step, 0) / (self.total_steps - 1), 1.0)
        return self.mu_init * (self.mu_min / self.mu_init) ** frac
