"""Errors that are the user's to fix: the CLI prints them as one paragraph, without a traceback."""

from __future__ import annotations

import difflib


class L3MUserError(Exception):
    """A problem with the user's input (config, data, model name): printed without a traceback, exit 1."""


class NonFiniteError(RuntimeError):
    """A reward/constraint value or the loss was NaN or infinite; training stops before the optimiser step."""

    def __init__(self, message: str, prompt: str | None = None, completion: str | None = None):
        super().__init__(message)
        self.prompt = prompt
        self.completion = completion


def did_you_mean(key: str, known: list[str] | set[str]) -> str:
    """' (did you mean 'x'?)' when ``key`` is close to one of ``known``, else ''."""
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class ConstraintFunctionError(RuntimeError):
    """A constraint's function (a reward function, a reward model) raised while scoring the step's samples.

    Like :class:`NonFiniteError`, it stops training before the optimiser step; ``samples`` holds the (prompt,
    completion) pairs it was scoring and ``details`` the function's traceback.
    """

    def __init__(self, message: str, samples: list[dict] | None = None, details: str = ""):
        super().__init__(message)
        self.samples = samples or []
        self.details = details
        self.prompt = self.samples[0]["prompt"] if self.samples else None
        self.completion = self.samples[0]["completion"] if self.samples else None
