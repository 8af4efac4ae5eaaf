"""The minimax (MM) baseline (method.md section 6): ``MinimaxConfig`` and ``MinimaxTrainer``.

The saddle-point approach of constrained RLHF (Safe-RLHF's PPO-Lagrangian, Moskovitz et al.): start from
an SFT model pi_ref and solve

    min_theta max_{lambda >= 0}   beta * KL(pi_theta || pi_ref) + sum_i lambda_i * C_i(theta)

* The KL is estimated on the policy's own samples with the score-function estimator:
  ``grad KL = E_y~pi [(log pi(y|x) - log pi_ref(y|x) - b(x)) grad log pi(y|x)]``, with sequence sums of
  log-probabilities and ``b`` the leave-one-out mean over the prompt's other samples (as for the constraints).
* Each optimiser step first updates the multipliers by projected gradient ascent on this step's estimates
  ``lambda_i <- max(0, lambda_i + eta * C_i)`` (or, with ``multiplier_update: log``, ascent on log lambda:
  ``lambda_i <- lambda_i * exp(eta * C_i)``), then takes the primal step with them.
* There is no task (SFT) term unless ``task_loss: true``: MM keeps its SFT model only as the KL anchor.

``MinimaxTrainer`` is an :class:`~l3m.trainer.L3MTrainer` with three of its pieces replaced: the multipliers, the
reference log-probabilities of each micro-batch's samples, and the extra per-sample weights ``beta * (KL_j - b_j)``.
The multipliers live in ``trainer.l3m_state`` and so travel in ``l3m_state.json`` with every checkpoint; they are
logged as ``constraints/<name>/lambda``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from l3m.config import L3MConfig
from l3m.constraints import leave_one_out_baseline
from l3m.errors import L3MUserError
from l3m.logprobs import response_logprobs
from l3m.trainer import L3MTrainer

logger = logging.getLogger(__name__)


def dual_ascent_step(lam: torch.Tensor, c_est: torch.Tensor, lr: float, update: str = "projected") -> torch.Tensor:
    """One multiplier step: ``max(0, lambda + lr * C)`` (projected) or ``lambda * exp(lr * C)`` (on log lambda)."""
    lam, c_est = lam.double(), c_est.double()
    if update == "projected":
        return torch.clamp(lam + lr * c_est, min=0.0)
    if update == "log":
        return lam * torch.exp(lr * c_est)
    raise ValueError(f"update must be 'projected' or 'log', got {update!r}")


@dataclass
class MinimaxConfig(L3MConfig):
    """:class:`~l3m.config.L3MConfig` plus the minimax baseline's heuristic knobs (beta, the multiplier step)."""

    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "The reference (SFT) model, a name or path; None uses a frozen copy of the initial model (with "
            "LoRA: the model with its adapters disabled)."
        },
    )
    beta: float = field(default=0.05, metadata={"help": "Weight beta of KL(pi || pi_ref) (a heuristic knob; 0.05)."})
    multiplier_lr: float = field(
        default=0.1, metadata={"help": "Step size eta of the ascent lambda_i <- max(0, lambda_i + eta * C_i) (0.1)."}
    )
    multiplier_init: float = field(default=1.0, metadata={"help": "lambda_i at the first step (1)."})
    multiplier_update: str = field(
        default="projected",
        metadata={
            "help": "'projected' (lambda <- max(0, lambda + eta C)) or 'log' (ascent on log lambda: "
            "lambda <- lambda * exp(eta C), always > 0)."
        },
    )
    task_loss: bool = field(
        default=False,
        metadata={"help": "Add the task (SFT) loss to the objective; MM starts from an SFT model and leaves it out."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0 or self.multiplier_lr < 0 or self.multiplier_init < 0:
            raise ValueError("beta, multiplier_lr and multiplier_init must be >= 0")
        if self.multiplier_update not in ("projected", "log"):
            raise ValueError(f"multiplier_update must be 'projected' or 'log', got {self.multiplier_update!r}")
        if self.multiplier_update == "log" and self.multiplier_init <= 0:
            raise ValueError("multiplier_update 'log' needs multiplier_init > 0")


class MinimaxTrainer(L3MTrainer):
    """The minimax baseline: a KL penalty to a reference model and multipliers by dual ascent."""

    def __init__(self, model, args: MinimaxConfig | None = None, *posargs, ref_model: Any = None, **kwargs):
        super().__init__(model, args or MinimaxConfig(output_dir="l3m-output"), *posargs, **kwargs)
        if not self.constraints:
            raise L3MUserError(
                "the minimax baseline needs at least one constraint (it has nothing to trade the KL against)"
            )
        self.l3m_state["multipliers"] = [float(self.args.multiplier_init)] * len(self.constraints)
        self.ref_model = self._reference(ref_model if ref_model is not None else self.args.ref_model)

    @property
    def uses_task_loss(self) -> bool:
        return bool(self.args.task_loss)

    # ------------------------------------------------------------------------------------------
    # the reference model

    def _policy(self):
        return self.accelerator.unwrap_model(self.model)

    def _reference(self, ref: Any):
        """A frozen reference model on the policy's device; None means "the policy with its adapters disabled"."""
        policy = self._policy()
        param = next(policy.parameters())
        if ref is None:
            if hasattr(policy, "disable_adapter"):  # LoRA: the base model is the reference, no copy needed
                return None
            ref = copy.deepcopy(policy)
        elif isinstance(ref, str):
            from l3m.models import check_model_exists, load_causal_lm

            check_model_exists(ref, "ref_model")
            ref = load_causal_lm(ref)
        ref = ref.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
        n_ref, n_pol = ref.get_input_embeddings().num_embeddings, policy.get_input_embeddings().num_embeddings
        if n_ref != n_pol:
            raise L3MUserError(
                f"ref_model: its vocabulary ({n_ref} tokens) differs from the policy's ({n_pol}); the reference must "
                "share the policy's tokenizer (use the SFT model the policy starts from)"
            )
        return ref

    @contextlib.contextmanager
    def _reference_model(self):
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy = self._policy()
        was_training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                yield policy
        finally:
            policy.train(was_training)

    # ------------------------------------------------------------------------------------------
    # the pieces of L3MTrainer it replaces

    def multipliers(self, c_est: torch.Tensor, mu: float) -> torch.Tensor:
        """The dual step on this optimiser step's estimates ``C_i`` (reduced over all processes, so every process
        computes the same multipliers); returns the multipliers the primal step uses."""
        args = self.args
        lam = dual_ascent_step(
            torch.tensor(self.l3m_state["multipliers"], dtype=torch.float64),
            c_est,
            args.multiplier_lr,
            args.multiplier_update,
        )
        if not torch.isfinite(lam).all():
            raise L3MUserError(
                f"the minimax multipliers overflowed ({lam.tolist()}); lower training.multiplier_lr "
                f"(now {args.multiplier_lr}) or use multiplier_update: projected"
            )
        self.l3m_state["multipliers"] = lam.tolist()
        self._metrics["minimax/penalty"].append(float((lam * c_est.double()).sum()))
        return lam

    @torch.no_grad()
    def prepare_samples(self, batch: dict, samples) -> None:
        """The reference model's sequence log-probabilities of the samples (at the sampling temperature)."""
        groups = [(batch["sample_input_ids"], batch["sample_mask"], batch["sample_attention_mask"])]
        with self._reference_model() as ref:
            rows = response_logprobs(ref, groups, self.processing_class.pad_token_id, [float(self.args.temperature)])
        batch["sample_ref_logp"] = torch.stack([r.sum() for r in rows]).float().cpu()

    def sample_weights(self, inputs: dict, seq_logp: torch.Tensor) -> torch.Tensor:
        """``sum_i lambda_i (c_i - b_i) + beta (k_j - b_j)`` with ``k_j = log pi(y_j|x) - log pi_ref(y_j|x)``
        (sequence sums, no gradient) and ``b_j`` the leave-one-out mean of ``k`` over the prompt's other samples."""
        kl = seq_logp.detach().double().cpu() - inputs["sample_ref_logp"].double().cpu()
        if self.args.baseline == "leave_one_out":
            base = leave_one_out_baseline(kl.unsqueeze(1), inputs["sample_group_ids"].cpu()).squeeze(1)
        else:
            base = torch.zeros_like(kl)
        self._metrics["kl"].append(float(kl.mean()))
        return super().sample_weights(inputs, seq_logp) + (self.args.beta * (kl - base)).to(seq_logp)

    def edit_logs(self, logs: dict[str, float]) -> None:
        """The barrier's numbers mean nothing here: replace them with the Lagrangian's."""
        for key in ("barrier", "mu"):
            logs.pop(key, None)
        if "kl" in logs:
            logs["objective"] = (
                logs.get("task_nll", 0.0) + self.args.beta * logs["kl"] + logs.get("minimax/penalty", 0.0)
            )
        elif "task_nll" in logs:
            logs["objective"] = logs["task_nll"]

    def card_info(self) -> dict:
        info = super().card_info()
        info["method"] = "minimax"
        info["training"].update(beta=self.args.beta, multiplier_lr=self.args.multiplier_lr)
        return info
