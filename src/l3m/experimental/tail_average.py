"""Tail averaging: the saved model is the mean of the weights over the last part of training.

Why: a constraint's gradient comes from a handful of samples per step, so near an active constraint the
estimate of C_i falls on either side of 0 from step to step, lambda_i jumps between ~0 and 1/(m mu), and the
iterates oscillate around the boundary. The last iterate then lies wherever the last few steps left it, inside or
out; the mean of the last iterates sits near the middle of the oscillation, as in Polyak-Ruppert averaging and
stochastic weight averaging (SWA). Off by default (``average_tail: 0``): the paper keeps the last iterate.

With ``average_tail = f`` and ``T`` optimiser steps, the weights after each of the last ``ceil(f * T)`` steps
are averaged (a running mean in float32, one copy of the trainable parameters); at the end of training the
average replaces the weights, so ``save_model`` and any evaluation that follows use it. Checkpoints carry the
running mean (``weight_average.safetensors``), so a resumed run averages exactly the same iterates.
"""

from __future__ import annotations

import math
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

AVERAGE_FILE = "weight_average.safetensors"


class TailAverage(TrainerCallback):
    """A running mean of the trainable weights over the last ``fraction`` of the optimiser steps."""

    def __init__(self, model: torch.nn.Module, fraction: float):
        if not 0 < fraction <= 1:
            raise ValueError(f"average_tail must be in (0, 1], got {fraction}")
        self.model = model
        self.fraction = fraction
        self.count = 0  # iterates in the mean so far
        self.mean: dict[str, torch.Tensor] = {}

    def _params(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def first_step(self, max_steps: int) -> int:
        """The first optimiser step whose weights enter the mean."""
        return max_steps - math.ceil(self.fraction * max_steps) + 1

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < self.first_step(state.max_steps):
            return
        self.count += 1
        with torch.no_grad():
            for name, p in self._params():
                w = p.detach().float()
                if name not in self.mean:
                    self.mean[name] = w.clone()
                else:  # mean_n = mean_{n-1} + (w - mean_{n-1}) / n
                    self.mean[name].lerp_(w, 1.0 / self.count)

    def on_train_end(self, args, state, control, **kwargs):
        self.apply()

    def apply(self) -> int:
        """Copy the mean into the model's weights; returns how many iterates it averages (0: nothing done)."""
        if self.count == 0:
            return 0
        with torch.no_grad():
            for name, p in self._params():
                p.copy_(self.mean[name].to(p.dtype))
        return self.count

    def save(self, directory: str) -> None:
        if self.count:
            tensors = {n: t.contiguous() for n, t in self.mean.items()}
            save_file(tensors, os.path.join(directory, AVERAGE_FILE), metadata={"count": str(self.count)})

    def load(self, directory: str) -> None:
        path = os.path.join(directory, AVERAGE_FILE)
        self.count, self.mean = 0, {}
        if os.path.isfile(path):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                self.count = int(f.metadata()["count"])
            saved = load_file(path)
            self.mean = {n: saved[n].to(p.device) for n, p in self._params()}
