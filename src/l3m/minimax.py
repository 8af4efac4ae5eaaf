"""The minimax (MM) baseline, ``method: minimax`` (method.md section 6).

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

It runs inside :class:`l3m.trainer.L3MTrainer` (``args.method == "minimax"``) through three hooks: the
multipliers, the reference log-probabilities of each micro-batch's samples, and the extra per-sample
weights ``beta * (KL_j - b_j)`` of the surrogate. The multipliers live in ``trainer.l3m_state`` and so
travel in ``l3m_state.json`` with every checkpoint; they are logged as ``constraints/<name>/lambda``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch

from l3m.constraints import leave_one_out_baseline
from l3m.errors import L3MUserError

logger = logging.getLogger(__name__)


def dual_ascent_step(lam: torch.Tensor, c_est: torch.Tensor, lr: float, update: str = "projected") -> torch.Tensor:
    """One multiplier step: ``max(0, lambda + lr * C)`` (projected) or ``lambda * exp(lr * C)`` (on log lambda)."""
    lam, c_est = lam.double(), c_est.double()
    if update == "projected":
        return torch.clamp(lam + lr * c_est, min=0.0)
    if update == "log":
        return lam * torch.exp(lr * c_est)
    raise ValueError(f"update must be 'projected' or 'log', got {update!r}")


class Minimax:
    """The minimax baseline's state (multipliers, reference model) and its hooks into an ``L3MTrainer``."""

    def __init__(self, trainer, ref_model: Any = None):
        args = trainer.args
        if not trainer.constraints:
            raise L3MUserError(
                "method 'minimax' needs at least one constraint (it has nothing to trade the KL against)"
            )
        self.trainer = trainer
        trainer.l3m_state["multipliers"] = [float(args.multiplier_init)] * len(trainer.constraints)
        self.ref_model = self._reference(ref_model if ref_model is not None else args.ref_model)

    # ------------------------------------------------------------------------------------------
    # the reference model

    def _policy(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

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
    # hooks called by L3MTrainer

    @property
    def multipliers(self) -> torch.Tensor:
        return torch.tensor(self.trainer.l3m_state["multipliers"], dtype=torch.float64)

    def update_multipliers(self, c_est: torch.Tensor) -> torch.Tensor:
        """The dual step on this optimiser step's estimates ``C_i``; returns the multipliers the primal step uses.

        ``c_est`` is already reduced over all processes, so every process computes the same multipliers.
        """
        args = self.trainer.args
        lam = dual_ascent_step(self.multipliers, c_est, args.multiplier_lr, args.multiplier_update)
        if not torch.isfinite(lam).all():
            raise L3MUserError(
                f"the minimax multipliers overflowed ({lam.tolist()}); lower training.multiplier_lr "
                f"(now {args.multiplier_lr}) or use multiplier_update: projected"
            )
        self.trainer.l3m_state["multipliers"] = lam.tolist()
        self.trainer._metrics["minimax/penalty"].append(float((lam * c_est.double()).sum()))
        return lam

    @torch.no_grad()
    def prepare_batch(self, batch: dict, sample_batch) -> None:
        """Add the reference model's sequence log-probabilities of the samples, and their prompt groups."""
        trainer = self.trainer
        groups = [(batch["sample_input_ids"], batch["sample_mask"], batch["sample_attention_mask"])]
        with self._reference_model() as ref:
            rows = trainer._response_logprobs(ref, groups, temps=[trainer.sample_temperature])
        batch["sample_ref_logp"] = torch.stack([r.sum() for r in rows]).float().cpu()
        batch["sample_group_ids"] = sample_batch.group_ids.clone()

    def kl_weights(self, inputs: dict, seq_logp: torch.Tensor) -> torch.Tensor:
        """Per-sample ``beta * (k_j - b_j)`` with ``k_j = log pi(y_j|x) - log pi_ref(y_j|x)`` (sequence sums, no
        gradient) and ``b_j`` the leave-one-out mean of ``k`` over the prompt's other samples."""
        args = self.trainer.args
        kl = seq_logp.detach().double().cpu() - inputs["sample_ref_logp"].double().cpu()
        if args.baseline == "leave_one_out":
            base = leave_one_out_baseline(kl.unsqueeze(1), inputs["sample_group_ids"].cpu()).squeeze(1)
        else:
            base = torch.zeros_like(kl)
        self.trainer.record_metric("kl", float(kl.mean()), "samples")
        return (args.beta * (kl - base)).to(seq_logp.device)

    def edit_logs(self, logs: dict[str, float]) -> None:
        """The barrier's numbers mean nothing here: replace them with the Lagrangian's."""
        for key in ("barrier", "mu"):
            logs.pop(key, None)
        beta = self.trainer.args.beta
        if "kl" in logs:
            logs["objective"] = logs.get("task_nll", 0.0) + beta * logs["kl"] + logs.get("minimax/penalty", 0.0)
        elif "task_nll" not in logs:
            logs.pop("objective", None)
