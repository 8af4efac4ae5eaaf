"""Experimental variants of the L3M, off the core path (``method: experimental`` in a run config).

Neither option is the paper's method; each is general enough to be worth trying and is kept here, tested, until
evidence on held-out data earns it a place in the core:

* ``barrier_s_power`` p: the barrier's relaxation point ``s = mu**p``. The paper's p = 2 gives a violated
  constraint ``lambda_i = 1 / (m mu)``, an ever higher wall as mu falls; p = 1 caps every ``lambda_i`` at
  ``1 / m``, a bounded push (an exact penalty of weight 1/m on the violation).
* ``average_tail`` f: the saved weights are the mean of the iterates over the last fraction f of the optimiser
  steps (tail averaging, as Polyak-Ruppert or SWA): near an active constraint the sampled estimates make the
  iterates oscillate around its boundary, and their mean sits near the middle (:mod:`.tail_average`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from l3m.config import L3MConfig
from l3m.errors import L3MUserError
from l3m.experimental.tail_average import TailAverage
from l3m.trainer import L3MTrainer

__all__ = ["ExperimentalL3MConfig", "ExperimentalL3MTrainer", "TailAverage"]


@dataclass
class ExperimentalL3MConfig(L3MConfig):
    """:class:`~l3m.config.L3MConfig` plus the experimental options (both off by default: the paper's method)."""

    barrier_s_power: float = field(
        default=2.0,
        metadata={
            "help": "Experimental. p in the barrier's relaxation point s = mu**p: 2 is the paper's; 1 caps every "
            "lambda_i at 1/m (a bounded push instead of a wall that grows as mu falls)."
        },
    )
    average_tail: float = field(
        default=0.0,
        metadata={
            "help": "Experimental. Save the mean of the weights over this last fraction of the optimiser steps "
            "(tail averaging) instead of the last iterate; 0 = off. Checkpoints carry the running mean."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.barrier_s_power > 0:
            raise ValueError(f"barrier_s_power must be > 0, got {self.barrier_s_power}")
        if not 0 <= self.average_tail <= 1:
            raise ValueError(f"average_tail must be in [0, 1] (a fraction of the steps), got {self.average_tail}")


class ExperimentalL3MTrainer(L3MTrainer):
    """:class:`~l3m.trainer.L3MTrainer` with the options of :class:`ExperimentalL3MConfig`."""

    def __init__(self, model, args: ExperimentalL3MConfig | None = None, *posargs, **kwargs):
        super().__init__(model, args or ExperimentalL3MConfig(output_dir="l3m-output"), *posargs, **kwargs)
        self.tail_average: TailAverage | None = None
        if self.args.average_tail:
            from transformers.integrations import is_deepspeed_zero3_enabled

            if self.args.load_best_model_at_end or self.args.select_checkpoint != "last":
                raise L3MUserError("training.average_tail saves an average, not a selected checkpoint: pick one")
            if getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
                raise L3MUserError("training.average_tail needs whole weights on each process: not with FSDP or ZeRO-3")
            self.tail_average = TailAverage(self.model, self.args.average_tail)
            self.add_callback(self.tail_average)

    def barrier_s(self, mu: float) -> float | None:
        p = self.args.barrier_s_power
        return None if p == 2 else mu**p  # None: mu * mu, the paper's

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        if self.tail_average is not None:
            state["weights_averaged"] = self.tail_average.count
        return state

    def save_extra(self, folder: str) -> None:
        super().save_extra(folder)
        if self.tail_average is not None:
            self.tail_average.save(folder)

    def restore_state(self, saved: dict | None, checkpoint: str) -> None:
        super().restore_state(saved, checkpoint)
        if self.tail_average is not None:
            self.tail_average.load(checkpoint)

    def card_info(self) -> dict:
        info = super().card_info()
        info["method"] = "experimental"
        info["training"].update(barrier_s_power=self.args.barrier_s_power, average_tail=self.args.average_tail)
        return info
