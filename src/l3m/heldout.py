"""Constraints checked on held-out prompts during training, and the best feasible checkpoint.

At each evaluation (``eval_strategy``) the trainer samples ``eval_num_generations`` responses to each of the first
``eval_prompts`` held-out prompts (the same prompts every time, spread over the processes), and logs each
constraint's estimate with its 95% bootstrap interval over prompts and its verdict, as ``l3m evaluate`` does:
``eval/constraints/<name>/{value,ci_low,ci_high,mean_raw,holds,violated}``.

With ``select_checkpoint: best_feasible`` the run ends with the weights of the evaluated checkpoint whose verdicts
all hold and whose held-out task loss is lowest; where none holds, of the one with the least violation (the sum
of the positive estimates C_i), and the log and the model card say so. The trade-off: the kept weights may be
older than the last step's, and a verdict from a few dozen prompts is itself an estimate (an evaluation on more
prompts, with ``l3m evaluate``, confirms it).
"""

from __future__ import annotations

import logging
import math

import torch

from l3m.constraints import evaluate_constraints
from l3m.evaluation import constraint_rows
from l3m.sampling import sample_examples, seeded_rng

logger = logging.getLogger(__name__)


class HeldoutChecks:
    """The held-out constraint checks of one :class:`~l3m.trainer.L3MTrainer` run, and the checkpoint they select."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.history: list[dict] = []  # one entry per evaluation: step, eval_loss, constraints, violation, checkpoint
        self.selected: dict | None = None  # the checkpoint best_feasible kept, and why

    def state_dict(self) -> dict:
        return {"history": self.history, "selected": self.selected}

    def load_state_dict(self, saved: dict) -> None:
        self.history = list(saved.get("history") or [])
        self.selected = saved.get("selected")

    @property
    def _prompts(self) -> list:
        n = self.trainer.args.eval_prompts
        examples = self.trainer.eval_examples or []
        return examples if n is None else examples[:n]

    def run(self, eval_loss: float | None = None) -> dict[str, float]:
        """Sample the held-out prompts, check every constraint, record and return the metrics."""
        tr, args = self.trainer, self.trainer.args
        acc = tr.accelerator
        prompts, k = self._prompts, args.eval_num_generations
        world, rank = acc.num_processes, acc.process_index
        per_rank = math.ceil(len(prompts) / world)
        # each process samples as many prompts as the others (repeats fill the last), so that sharded weights see
        # the same forward calls everywhere; the repeats are dropped after the gather
        mine = [(rank + world * j) for j in range(per_rank)]
        valid = torch.tensor([float(i < len(prompts)) for i in mine])
        examples = [prompts[i % len(prompts)] for i in mine]
        model = acc.unwrap_model(tr.model)
        with seeded_rng(args.device, args.seed + 7919 * rank):
            samples = sample_examples(
                model,
                tr.processing_class,
                examples,
                k=k,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                batch_size=args.per_device_eval_batch_size,
                max_prompt_length=args.max_prompt_length,
                seed=None,
                progress=False,
                sampler=args.sampler,
            )
        raw, c = evaluate_constraints(tr.constraints, samples)
        m = len(tr.constraints)
        local = torch.cat([c.reshape(per_rank, k, m).mean(1), raw.reshape(per_rank, k, m).mean(1), valid[:, None]], 1)
        every = acc.gather(local.to(args.device, torch.float64)).cpu()
        every = every[every[:, -1] > 0]
        if every.shape[0] != len(prompts):  # each prompt once, whatever the number of processes
            raise RuntimeError(f"held-out check gathered {every.shape[0]} prompts for {len(prompts)}")
        rows = constraint_rows(tr.constraints, every[:, :m], every[:, m : 2 * m])
        entry = {
            "step": tr.state.global_step,
            "eval_loss": eval_loss,
            "n_prompts": len(prompts),
            "k": k,
            "constraints": rows,
            "all_hold": all(r["verdict"] == "holds" for r in rows),
            "violation": sum(max(r["value"], 0.0) for r in rows),
            "checkpoint": None,
        }
        self.history = [h for h in self.history if h["step"] != entry["step"]] + [entry]
        metrics = {}
        for r in rows:
            key = f"eval/constraints/{r['name']}"
            metrics[f"{key}/value"], metrics[f"{key}/mean_raw"] = r["value"], r["mean_raw"]
            metrics[f"{key}/ci_low"], metrics[f"{key}/ci_high"] = r["ci95"]
            metrics[f"{key}/holds"] = float(r["verdict"] == "holds")
            metrics[f"{key}/violated"] = float(r["verdict"] == "violated")
        return metrics

    # ------------------------------------------------------------------------------------------
    # best_feasible

    def best(self) -> dict | None:
        """The evaluated, saved checkpoint to keep: all verdicts hold and the lowest eval loss; else least violation."""
        saved = [h for h in self.history if h.get("checkpoint")]
        feasible = [h for h in saved if h["all_hold"]]
        if feasible:
            return min(feasible, key=lambda h: (math.inf if h["eval_loss"] is None else h["eval_loss"], -h["step"]))
        return min(saved, key=lambda h: (h["violation"], -h["step"])) if saved else None

    def mark_selected(self, checkpoint: str) -> None:
        """Called as ``checkpoint`` is saved: it holds the weights of this step's evaluation, if there was one."""
        step = self.trainer.state.global_step
        for h in self.history:
            if h["step"] == step:
                h["checkpoint"] = checkpoint
        best = self.best() if self.trainer.args.select_checkpoint == "best_feasible" else None
        if best is not None:  # kept by checkpoint rotation (save_total_limit), as transformers keeps its best
            self.trainer.state.best_model_checkpoint = best["checkpoint"]

    def load_selected(self) -> None:
        """At the end of training, with ``best_feasible``: load the selected checkpoint's weights and say why."""
        tr = self.trainer
        if tr.args.select_checkpoint != "best_feasible":
            return
        best = self.best()
        if best is None:
            logger.warning(
                "select_checkpoint 'best_feasible': no checkpoint was evaluated on held-out prompts (set eval_strategy "
                "and eval_steps to the save settings, with held-out data); the last step's weights are kept"
            )
            return
        if best["all_hold"]:
            reason = f"every constraint holds on {best['n_prompts']} held-out prompts; the lowest eval_loss among those"
        else:
            reason = (
                f"no evaluated checkpoint met every constraint on {best['n_prompts']} held-out prompts; this one has "
                f"the least violation (sum of positive C_i = {best['violation']:.4g})"
            )
        self.selected = {"path": best["checkpoint"], "step": best["step"], "reason": reason}
        if best["step"] != tr.state.global_step:
            tr.state.best_model_checkpoint = best["checkpoint"]
            quiet = logging.getLogger("transformers.trainer")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # it notes tied weights (lm_head = embeddings) as missing keys: not news
            try:
                tr._load_best_model()
            finally:
                quiet.setLevel(level)
        log = logger.info if best["all_hold"] else logger.warning
        log("select_checkpoint 'best_feasible': keeping %s (step %d): %s", best["checkpoint"], best["step"], reason)

    def card_info(self) -> dict:
        """The held-out verdicts that describe the final weights, if any evaluation saw exactly them."""
        step = self.selected["step"] if self.selected else self.trainer.state.global_step
        entry = next((h for h in self.history if h["step"] == step), None)
        out: dict = {"checkpoint": self.selected} if self.selected else {}
        if entry is not None:
            out["heldout"] = [{**r, "n_prompts": entry["n_prompts"], "k": entry["k"]} for r in entry["constraints"]]
        return out
