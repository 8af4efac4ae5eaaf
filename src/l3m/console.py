"""A quiet console for training: one compact line per logging step, and a progress bar without raw dicts.

:class:`CompactLogCallback` prints, on the main process, one line per logging step such as::

    step 12/16 | mu 0.05 | task 1.234 | length_max: 28.1 (C -0.39, λ 0.08) ok

through ``tqdm.write``, so that a progress bar stays intact. :class:`QuietProgressCallback` is transformers'
progress bar without the dict of raw logs it prints at every logging step; its postfix can show mu and whether
each constraint holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback, TrainerCallback

PREFIX = "constraints/"
EVAL_PREFIXES = ("eval/constraints/", "eval_constraints/")
FIELDS = ("mean_raw", "value", "lambda", "holds")


def format_log_line(logs: Mapping[str, Any], step: int, max_steps: int | None = None) -> str:
    """One compact line for a dict of logs (training or evaluation metrics); fields that are absent are left out."""
    parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}"]
    if "train_runtime" in logs:  # the summary transformers logs at the end of training
        done = f"done in {_num(logs['train_runtime'], 1, fixed=True)} s"  # train_loss is the surrogate's: not shown
        parts.append(done)
    if "mu" in logs:
        parts.append(f"mu {_num(logs['mu'])}")
    if "task_nll" in logs:
        parts.append(f"task {_num(logs['task_nll'], 4)}")
    elif "loss" in logs:  # no task loss (minimax without it, plain logs): the optimised loss itself
        parts.append(f"loss {_num(logs['loss'], 4)}")
    for name, fields in _group(logs, (PREFIX,)).items():
        parts.append(_constraint_part(name, fields))
    if "eval_loss" in logs:
        parts.append(f"eval loss {_num(logs['eval_loss'], 4)}")
    for name, fields in _group(logs, EVAL_PREFIXES).items():
        parts.append("eval " + _eval_part(name, fields))
    return " | ".join(parts)


def postfix_from_logs(logs: Mapping[str, Any]) -> dict[str, str]:
    """A progress bar postfix from a dict of logs: mu, and per constraint ok/NO with its mean raw quantity."""
    post = {}
    if "mu" in logs:
        post["mu"] = _num(logs["mu"])
    for name, fields in _group(logs, (PREFIX,)).items():
        if "holds" in fields:
            raw = f" {_num(fields['mean_raw'])}" if "mean_raw" in fields else ""
            held = _holds(fields["holds"])
            post[name] = (held if held in ("ok", "NO", "?") else f"{held.split()[1]} ok") + raw
    return post


class CompactLogCallback(TrainerCallback):
    """Prints one compact line per logging step on the main process (see :func:`format_log_line`).

    ``write`` takes the line; by default ``tqdm.write``, which keeps a progress bar intact.
    """

    def __init__(self, write: Callable[[str], Any] | None = None):
        self.write = write or tqdm.write

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.write(format_log_line(logs, state.global_step, state.max_steps))


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bar, without the dict of raw logs it prints at every logging step.

    ``status`` (optional) returns the bar's postfix (e.g. ``{"mu": "0.05", "length_max": "ok 28.1"}``) and is
    called after every step. Without it, the postfix is taken from each step's logs (:func:`postfix_from_logs`).
    """

    def __init__(self, status: Callable[[], Mapping[str, Any]] | None = None, max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.status = status

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None and self.status is not None:
            post = self.status()
            if post:
                self.training_bar.set_postfix(dict(post), refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs or self.status is not None:
            return
        post = postfix_from_logs(logs)
        if post:
            self.training_bar.set_postfix(post, refresh=False)


# ----------------------------------------------------------------------------------------------
# helpers


def _group(logs: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``{name: {field: value}}`` from keys ``<prefix><name>/<field>``, names in the order they first appear."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in logs.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            continue
        name, _, field = key[len(prefix) :].rpartition("/")
        if name:
            out.setdefault(name, {})[field] = value
    return out


def _constraint_part(name: str, f: dict[str, Any]) -> str:
    text = f"{name}:"
    if "mean_raw" in f:
        text += f" {_num(f['mean_raw'])}"
    inner = [f"C {_num(f['value'])}"] if "value" in f else []
    if "lambda" in f:
        inner.append(f"λ {_num(f['lambda'])}")
    if inner:
        text += f" ({', '.join(inner)})"
    if "holds" in f:
        text += f" {_holds(f['holds'])}"
    return text


def _eval_part(name: str, f: dict[str, Any]) -> str:
    text = f"{name}:"
    if "mean_raw" in f:
        text += f" {_num(f['mean_raw'])}"
    inner = [f"C {_num(f['value'])}"] if "value" in f else []
    lo, hi = f.get("ci_low"), f.get("ci_high")
    if lo is not None and hi is not None:
        inner.append(f"95% [{_num(lo)}, {_num(hi)}]")
    if inner:
        text += f" ({', '.join(inner)})"
    if "holds" in f and "violated" in f:
        text += " holds" if f["holds"] >= 1 else " violated" if f["violated"] >= 1 else " undecided"
    return text


def _holds(h: Any) -> str:
    """ok / NO for the share of logged steps on which a constraint held (1: all of them, 0: none)."""
    try:
        h = float(h)
    except (TypeError, ValueError):
        return str(h)
    if math.isnan(h):
        return "?"
    if h >= 1:
        return "ok"
    if h <= 0:
        return "NO"
    return f"ok {h:.0%} of steps"


def _num(x: Any, digits: int = 3, fixed: bool = False) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            x = float(x)
        except (TypeError, ValueError):
            return str(x)
    return f"{x:.{digits}f}" if fixed else f"{x:.{digits}g}"
