"""Average constraints on the model's own responses.

A constraint maps a batch of sampled (prompt, response) pairs to per-response values ``c(x, y)``; it is
feasible when their expectation ``C = E[c] <= 0`` (method.md section 1). Each constraint object keeps the
state of its last step, in the manner of Cooper's ``ConstraintState``: the measured estimate of ``C``
(``value``), the multiplier ``lambda`` that estimate produced, and the mean of the raw quantity (tokens,
reward) for reporting. The optimisation method (barrier or minimax) lives in the trainer, not here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from l3m.errors import L3MUserError, NonFiniteError, did_you_mean

RewardFn = Callable[..., Sequence[float]]


@dataclass
class SampleBatch:
    """What a constraint sees: the step's sampled responses (``k`` per prompt, grouped consecutively)."""

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    lengths: torch.Tensor  # response length in tokens, the end-of-turn token not counted
    group_ids: torch.Tensor  # which prompt each response belongs to
    extra: dict[str, Any] = field(default_factory=dict)
    truncated: torch.Tensor | None = None  # bool per response: cut off at max_new_tokens without an end token


@dataclass
class ConstraintState:
    """The last step's numbers for one constraint."""

    value: float = float("nan")  # the estimate of C_i used in the barrier (after the optional EMA)
    step_value: float = float("nan")  # the plain Monte Carlo estimate from this step's samples
    lam: float = float("nan")  # lambda_i
    mean_raw: float = float("nan")  # mean of the underlying quantity (tokens, reward)

    @property
    def holds(self) -> bool:
        return self.value <= 0


class Constraint:
    """Base class: subclasses implement :meth:`raw`; ``c = sign * (raw - threshold) / scale``.

    The score-function estimate of grad C multiplies ``c`` by the whole response's log-probability,
    ``sum_t log pi(y_t | x, y_<t)`` (method.md section 3).
    """

    kind = "constraint"

    def __init__(self, name: str, threshold: float, direction: str, scale: float = 1.0):
        if direction not in ("at_least", "at_most"):
            raise ValueError(f"direction must be 'at_least' or 'at_most', got {direction!r}")
        if not scale > 0:
            raise L3MUserError(f"constraint '{name}': scale must be > 0, got {scale}")
        self.name = name
        self.threshold = float(threshold)
        self.direction = direction
        self.scale = float(scale)
        self.state = ConstraintState()

    # The underlying per-response quantity (tokens, reward, ...). Subclasses share work through ``cache``.
    def raw(self, batch: SampleBatch, cache: dict) -> torch.Tensor:
        raise NotImplementedError

    def values(self, raw: torch.Tensor) -> torch.Tensor:
        """Per-response constraint values c(x, y); feasible on average when their mean is <= 0."""
        diff = self.threshold - raw if self.direction == "at_least" else raw - self.threshold
        return diff / self.scale

    def describe(self) -> str:
        op = ">=" if self.direction == "at_least" else "<="
        return f"{self.name}: mean {self.quantity} {op} {self.threshold:g}"

    quantity = "value"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()}, scale={self.scale:g})"


class LengthConstraint(Constraint):
    """Mean response length (tokens, the end-of-turn token not counted) at least / at most ``limit``."""

    kind = "length"
    quantity = "length (tokens)"

    def __init__(self, limit: float, bound: str = "max", name: str | None = None, scale: float = 1.0):
        if bound not in ("min", "max"):
            raise ValueError(f"bound must be 'min' or 'max', got {bound!r}")
        direction = "at_most" if bound == "max" else "at_least"
        super().__init__(name or f"length_{bound}", limit, direction, scale)

    def raw(self, batch: SampleBatch, cache: dict) -> torch.Tensor:
        return batch.lengths.float()


class TruncationConstraint(Constraint):
    """Share of responses cut off at ``max_new_tokens`` without an end token at most ``at_most`` (in [0, 1]).

    Per response ``raw = 1`` when it was cut off and ``0`` otherwise, so the mean raw quantity is the cut-off
    share and ``c = (1[cut off] - at_most) / scale``.
    """

    kind = "truncated"
    quantity = "cut-off share"

    def __init__(self, at_most: float, name: str | None = None, scale: float = 1.0):
        name = name or "truncated"
        if isinstance(at_most, bool) or not isinstance(at_most, (int, float)) or not 0 <= at_most <= 1:
            raise L3MUserError(f"constraint '{name}': 'at_most' must be a share in [0, 1], got {at_most!r}")
        super().__init__(name, at_most, "at_most", scale)

    def raw(self, batch: SampleBatch, cache: dict) -> torch.Tensor:
        if batch.truncated is None:
            raise L3MUserError(
                f"constraint '{self.name}' needs to know which responses were cut off at max_new_tokens, "
                "but the sample batch has no 'truncated' flags"
            )
        flags = torch.as_tensor(batch.truncated).flatten()
        if flags.numel() != len(batch.completions):
            raise L3MUserError(
                f"constraint '{self.name}': {flags.numel()} 'truncated' flags for {len(batch.completions)} responses"
            )
        return flags.float()


class RewardConstraint(Constraint):
    """Mean reward at least / at most ``threshold``.

    ``reward`` is a callable with TRL's reward-function signature ``f(prompts, completions, **kwargs)``
    returning one float per completion (a :class:`l3m.rewards.RewardModel` is one such callable).
    """

    kind = "reward"
    quantity = "reward"

    def __init__(
        self,
        reward: RewardFn,
        at_least: float | None = None,
        at_most: float | None = None,
        name: str | None = None,
        scale: float = 1.0,
    ):
        if (at_least is None) == (at_most is None):
            raise L3MUserError("a reward constraint needs exactly one of 'at_least' or 'at_most'")
        direction = "at_least" if at_least is not None else "at_most"
        threshold = at_least if at_least is not None else at_most
        super().__init__(name or _callable_name(reward), threshold, direction, scale)
        self.reward = reward

    def raw(self, batch: SampleBatch, cache: dict) -> torch.Tensor:
        key = ("reward", id(self.reward))
        if key not in cache:
            out = self.reward(
                prompts=batch.prompts,
                completions=batch.completions,
                completion_ids=batch.completion_ids,
                **batch.extra,
            )
            cache[key] = _as_float_tensor(out, len(batch.completions), self.name, batch)
        return cache[key]


class FunctionConstraint(RewardConstraint):
    """Any user function of (prompt, response): ``f(prompts, completions, **kwargs) -> list[float]``.

    By default ``c = f(x, y)`` directly (``at_most: 0``); ``at_least`` / ``at_most`` set another bound.
    """

    kind = "function"
    quantity = "value"

    def __init__(
        self,
        fn: RewardFn,
        at_least: float | None = None,
        at_most: float | None = None,
        name: str | None = None,
        scale: float = 1.0,
    ):
        if at_least is None and at_most is None:
            at_most = 0.0
        super().__init__(fn, at_least=at_least, at_most=at_most, name=name, scale=scale)


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def _as_float_tensor(out: Any, n: int, name: str, batch: SampleBatch) -> torch.Tensor:
    vals = torch.as_tensor([float("nan") if v is None else float(v) for v in out], dtype=torch.float32)
    if vals.numel() != n:
        raise L3MUserError(f"constraint '{name}': the function returned {vals.numel()} values for {n} completions")
    bad = (~torch.isfinite(vals)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise NonFiniteError(
            f"constraint '{name}' returned a non-finite value ({vals[i].item()}) for {len(bad)} of {n} responses",
            prompt=batch.prompts[i],
            completion=batch.completions[i],
        )
    return vals


def evaluate_constraints(constraints: Sequence[Constraint], batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response raw quantities and constraint values, each of shape ``[n_responses, m]``."""
    cache: dict = {}
    raws, cs = [], []
    for con in constraints:
        raw = con.raw(batch, cache)
        raws.append(raw)
        cs.append(con.values(raw))
    n = len(batch.completions)
    if not constraints:
        empty = torch.zeros(n, 0)
        return empty, empty
    return torch.stack(raws, dim=1), torch.stack(cs, dim=1)


def leave_one_out_baseline(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """For each response, the mean of the other responses to the same prompt (method.md section 3).

    ``values`` is ``[n, m]``; groups need at least two members.
    """
    n_groups = int(group_ids.max().item()) + 1 if group_ids.numel() else 0
    sums = torch.zeros(n_groups, values.shape[1], dtype=values.dtype).index_add_(0, group_ids, values)
    counts = torch.bincount(group_ids, minlength=n_groups).to(values.dtype)
    if (counts < 2).any():
        raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
    return (sums[group_ids] - values) / (counts[group_ids] - 1).unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Building constraints from a config (a list of dicts, as in the YAML file)

_KIND_FIELDS = {
    "length": {"kind", "name", "scale", "min", "max"},
    "reward": {"kind", "name", "scale", "at_least", "at_most", "model", "function", "batch_size", "max_length"},
    "function": {"kind", "name", "scale", "at_least", "at_most", "function"},
    "truncated": {"kind", "name", "scale", "at_most"},
}


def load_callable(spec: str, where: str = "function") -> Callable:
    """Import ``module:function`` or ``path/to/file.py:function``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise L3MUserError(f"{where}: expected 'module:function' or 'file.py:function', got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise L3MUserError(f"{where}: file '{path}' does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"l3m_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise L3MUserError(f"{where}: cannot import module '{mod_name}' ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise L3MUserError(f"{where}: module '{mod_name}' has no function '{attr}'")
    return fn


def validate_constraint_specs(specs: Any) -> None:
    """Check a list of constraint dicts without loading anything (so errors come before any model)."""
    if specs is None:
        return
    if not isinstance(specs, list):
        raise L3MUserError(f"'constraints' must be a list of constraint entries, got {type(specs).__name__}")
    for i, spec in enumerate(specs):
        where = f"constraints[{i}]"
        if not isinstance(spec, dict):
            raise L3MUserError(f"{where}: expected a mapping with a 'kind', got {spec!r}")
        kind = spec.get("kind")
        if kind not in _KIND_FIELDS:
            raise L3MUserError(
                f"{where}: unknown constraint kind {kind!r}{did_you_mean(str(kind), _KIND_FIELDS)}; "
                f"expected one of {sorted(_KIND_FIELDS)}"
            )
        if kind == "truncated" and "at_least" in spec:
            raise L3MUserError(
                f"{where}: a truncated constraint takes 'at_most' (the largest allowed share of responses cut off "
                "at max_new_tokens, in [0, 1]), not 'at_least'"
            )
        for key in spec:
            if key not in _KIND_FIELDS[kind]:
                raise L3MUserError(
                    f"{where} (kind {kind}): unknown field '{key}'{did_you_mean(key, _KIND_FIELDS[kind])}; "
                    f"allowed: {sorted(_KIND_FIELDS[kind])}"
                )
        for key in ("min", "max", "at_least", "at_most", "scale"):
            if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], (int, float))):
                raise L3MUserError(f"{where}: '{key}' must be a number, got {spec[key]!r}")
        for key in ("batch_size", "max_length"):
            if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1):
                raise L3MUserError(f"{where}: '{key}' must be a positive integer, got {spec[key]!r}")
        if "scale" in spec and not spec["scale"] > 0:
            raise L3MUserError(f"{where}: 'scale' must be > 0, got {spec['scale']}")
        if kind == "length":
            lo, hi = spec.get("min"), spec.get("max")
            if lo is None and hi is None:
                raise L3MUserError(f"{where}: a length constraint needs 'min', 'max' or both (in tokens)")
            if lo is not None and hi is not None and lo > hi:
                raise L3MUserError(f"{where}: min ({lo}) is greater than max ({hi}); no length satisfies both")
            if (lo is not None and lo < 0) or (hi is not None and hi < 0):
                raise L3MUserError(f"{where}: length bounds are token counts and must be >= 0")
        elif kind == "truncated":
            if "at_most" not in spec:
                raise L3MUserError(
                    f"{where}: a truncated constraint needs 'at_most' (the largest allowed share of responses cut off "
                    "at max_new_tokens, in [0, 1])"
                )
            if not 0 <= spec["at_most"] <= 1:
                raise L3MUserError(
                    f"{where}: 'at_most' of a truncated constraint is a share in [0, 1], got {spec['at_most']}"
                )
        else:
            if kind == "reward" and ("model" in spec) == ("function" in spec):
                raise L3MUserError(f"{where}: a reward constraint needs exactly one of 'model' or 'function'")
            if kind == "function" and "function" not in spec:
                raise L3MUserError(f"{where}: a function constraint needs 'function: module:function'")
            if "at_least" in spec and "at_most" in spec:
                raise L3MUserError(f"{where}: give 'at_least' or 'at_most', not both")
            if kind == "reward" and "at_least" not in spec and "at_most" not in spec:
                raise L3MUserError(f"{where}: a reward constraint needs 'at_least' or 'at_most'")


def build_constraints(specs: list[dict] | None, device: str | torch.device | None = None) -> list[Constraint]:
    """Constraint objects from config entries (see the README's config reference)."""
    validate_constraint_specs(specs)
    out: list[Constraint] = []
    for i, spec in enumerate(specs or []):
        kind, name, scale = spec["kind"], spec.get("name"), float(spec.get("scale", 1.0))
        where = f"constraints[{i}]"
        if kind == "length":
            bounds = [b for b in ("min", "max") if spec.get(b) is not None]
            for b in bounds:
                cname = (f"{name}_{b}" if len(bounds) == 2 else name) if name else None
                out.append(LengthConstraint(spec[b], bound=b, name=cname, scale=scale))
        elif kind == "reward":
            if "model" in spec:
                from l3m.rewards import RewardModel

                fn = RewardModel(
                    spec["model"],
                    device=device,
                    batch_size=int(spec.get("batch_size", 16)),
                    max_length=int(spec.get("max_length", 1024)),
                )
            else:
                fn = load_callable(spec["function"], f"{where}.function")
            out.append(RewardConstraint(fn, spec.get("at_least"), spec.get("at_most"), name=name, scale=scale))
        elif kind == "truncated":
            out.append(TruncationConstraint(spec["at_most"], name=name, scale=scale))
        else:
            fn = load_callable(spec["function"], f"{where}.function")
            out.append(FunctionConstraint(fn, spec.get("at_least"), spec.get("at_most"), name=name, scale=scale))
    names = [c.name for c in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise L3MUserError(f"constraint names must be unique; repeated: {sorted(dupes)} (set 'name' on each)")
    return out
