"""l3m: Lagrange Large Language Models (ICLR 2025).

Fine-tune a causal LM on its task loss subject to average constraints on its own responses, enforced
with a relaxed log-barrier whose gradients give the Lagrange multipliers.
"""

from l3m.barrier import MuSchedule, lagrange_multipliers, relaxed_log_barrier, relaxed_log_barrier_grad
from l3m.constraints import (
    Constraint,
    ConstraintState,
    FunctionConstraint,
    LengthConstraint,
    RewardConstraint,
    SampleBatch,
    TruncationConstraint,
    build_constraints,
)
from l3m.errors import L3MUserError, NonFiniteError

__version__ = "0.1.0"

__all__ = [
    "Constraint",
    "ConstraintState",
    "FunctionConstraint",
    "L3MConfig",
    "L3MTrainer",
    "L3MUserError",
    "LengthConstraint",
    "MuSchedule",
    "NonFiniteError",
    "RewardConstraint",
    "SampleBatch",
    "TruncationConstraint",
    "build_constraints",
    "lagrange_multipliers",
    "relaxed_log_barrier",
    "relaxed_log_barrier_grad",
]


def __getattr__(name):  # the trainer pulls in transformers: import it only when asked for
    if name == "L3MConfig":
        from l3m.config import L3MConfig

        return L3MConfig
    if name == "L3MTrainer":
        from l3m.trainer import L3MTrainer

        return L3MTrainer
    if name == "RewardModel":
        from l3m.rewards import RewardModel

        return RewardModel
    raise AttributeError(f"module 'l3m' has no attribute {name!r}")
