"""``L3MTrainer``: SFT and alignment as one constrained problem, on top of ``transformers.Trainer``.

Each optimiser step (method.md sections 2-3):

1. sample ``k`` responses per prompt from the current policy (``generate`` with the KV cache);
2. evaluate every constraint on them: per-response ``c_i(x, y)``;
3. estimate ``C_i`` as the mean over the step's samples (summed across accumulation micro-batches and
   processes, then an optional EMA) and set ``lambda_i = mu / (m * max(-C_i, s))``;
4. minimise the surrogate ``L_task + sum_i lambda_i * mean[(c_i - b_i) * log pi(y|x)]``, with
   ``log pi(y|x)`` summed over the response tokens and ``b_i`` the leave-one-out baseline; the task
   batch and the samples share one forward/backward pass;
5. decay ``mu``.

With no constraints the trainer is plain SFT (no sampling at all).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from l3m.barrier import MuSchedule, lagrange_multipliers, relaxed_log_barrier
from l3m.config import L3MConfig
from l3m.constraints import Constraint, SampleBatch, evaluate_constraints, leave_one_out_baseline
from l3m.data import Example, L3MCollator, ListDataset, load_examples, pad, tokenize_examples
from l3m.errors import NonFiniteError
from l3m.logprobs import eos_token_ids, token_logprobs

logger = logging.getLogger(__name__)

STATE_FILE = "l3m_state.json"
METRICS_FILE = "metrics.jsonl"


class L3MTrainer(Trainer):
    """Fine-tune a causal LM on task data subject to average constraints on its own responses.

    Args:
        model: a ``PreTrainedModel`` or a model name/path (hub name, local directory, or ``"default"``).
        args: an :class:`L3MConfig`.
        train_dataset: task data: a path, ``"builtin"``, a ``datasets.Dataset`` or a list of records in any
            format :mod:`l3m.data` reads, or a list of :class:`~l3m.data.Example`.
        constraints: the :class:`~l3m.constraints.Constraint` objects (empty: plain SFT).
        prompt_dataset: optional separate prompts to sample from (default: the task data's prompts).
        peft_config: optional ``peft`` config (e.g. ``LoraConfig``); the model is wrapped with it.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: L3MConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class=None,
        constraints: Sequence[Constraint] | None = None,
        prompt_dataset: Any = None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs,
    ):
        from l3m.models import load_causal_lm, load_tokenizer

        args = args or L3MConfig(output_dir="l3m-output")
        if isinstance(model, str):
            name = model
            model = load_causal_lm(name)
            processing_class = processing_class or load_tokenizer(name)
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path)
        tok = processing_class
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.constraints: list[Constraint] = list(constraints or [])
        self.eos_token_ids = eos_token_ids(model, tok)

        train_examples = self._as_examples(train_dataset, need_response=True)
        train_ds = ListDataset(
            tokenize_examples(tok, train_examples, args.max_length, args.max_prompt_length, "train data"),
            train_examples,
        )
        eval_ds = None
        if eval_dataset is not None:
            ev = self._as_examples(eval_dataset, need_response=True)
            eval_ds = ListDataset(tokenize_examples(tok, ev, args.max_length, args.max_prompt_length, "eval data"), ev)
        self.prompt_examples = train_examples
        self.prompt_feats = train_ds.items
        if prompt_dataset is not None:
            self.prompt_examples = self._as_examples(prompt_dataset, need_response=False)
            self.prompt_feats = tokenize_examples(
                tok, self.prompt_examples, args.max_length, args.max_prompt_length, "prompt data"
            )
        self._separate_prompts = prompt_dataset is not None

        super().__init__(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            data_collator=L3MCollator(tok.pad_token_id),
            callbacks=callbacks,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.l3m_state: dict[str, Any] = {"ema": None, "violated_steps": [0] * len(self.constraints), "warned": []}
        self._micro_index = 0
        if not args.disable_tqdm:
            self.remove_callback(ProgressCallback)
            self.add_callback(L3MProgressCallback(self))

    # ------------------------------------------------------------------------------------------
    # helpers

    @staticmethod
    def _as_examples(data: Any, need_response: bool) -> list[Example]:
        if isinstance(data, list) and data and isinstance(data[0], Example):
            return data
        return load_examples(data, need_response=need_response)

    @property
    def mu_schedule(self) -> MuSchedule:
        return MuSchedule(self.args.mu_init, self.args.mu_min, max(self.state.max_steps, 1))

    @property
    def mu(self) -> float:
        return self.mu_schedule(self.state.global_step)

    def _prompt_batch(self, batch: dict, micro: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Left-padded prompt ids for sampling: the batch's own prompts, or a slice of the prompt set."""
        if not self._separate_prompts:
            return batch["prompt_ids"], batch["prompt_attention_mask"], batch["index"].tolist()
        n = len(self.prompt_feats)
        bs = self.args.prompt_batch_size or self.args.per_device_train_batch_size
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = ((self.state.global_step * self.args.gradient_accumulation_steps + micro) * world + rank) * bs
        g = torch.Generator().manual_seed(self.args.seed + start // n)
        perm = torch.randperm(n, generator=g).tolist()
        idx = [perm[(start + j) % n] for j in range(bs)]
        ids = [self.prompt_feats[i]["prompt_ids"] for i in idx]
        return pad(ids, self.processing_class.pad_token_id, "left"), pad([[1] * len(x) for x in ids], 0, "left"), idx

    # ------------------------------------------------------------------------------------------
    # sampling and the constraint estimates: done once per optimiser step, for all micro-batches

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.constraints and batches:
            self._sample_and_weight(batches)
        return batches, None

    @torch.no_grad()
    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        args = self.args
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=prompt_ids.to(self.args.device),
                attention_mask=prompt_mask.to(self.args.device),
                do_sample=True,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                num_return_sequences=args.num_generations,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.processing_class.pad_token_id,
                use_cache=True,
            )
        finally:
            model.train(was_training)
        return out[:, prompt_ids.shape[1] :].cpu()

    def _split_completions(self, new_tokens: torch.Tensor) -> tuple[list[list[int]], list[int], list[bool]]:
        """Each completion up to and including its first end-of-turn token; its length without it."""
        eos = set(self.eos_token_ids)
        comps, lengths, clipped = [], [], []
        for row in new_tokens.tolist():
            end = next((j for j, t in enumerate(row) if t in eos), None)
            if end is None:
                comps.append(row)
                lengths.append(len(row))
                clipped.append(True)
            else:
                comps.append(row[: end + 1])
                lengths.append(end)
                clipped.append(False)
        return comps, lengths, clipped

    def _sample_and_weight(self, batches: list[dict]) -> None:
        args, k, tok = self.args, self.args.num_generations, self.processing_class
        t0 = time.perf_counter()
        per_batch = []
        for micro, batch in enumerate(batches):
            p_ids, p_mask, idx = self._prompt_batch(batch, micro)
            new = self._generate(p_ids, p_mask)
            comps, lengths, clipped = self._split_completions(new)
            prompts_plain = [p[m.bool()].tolist() for p, m in zip(p_ids, p_mask)]
            prompt_rep = [prompts_plain[i // k] for i in range(len(comps))]
            texts = tok.batch_decode([c[: lengths[i]] for i, c in enumerate(comps)], skip_special_tokens=True)
            sb = SampleBatch(
                prompts=[self.prompt_examples[idx[i // k]].prompt_text for i in range(len(comps))],
                completions=texts,
                completion_ids=comps,
                lengths=torch.as_tensor(lengths),
                group_ids=torch.arange(len(idx)).repeat_interleave(k),
                extra={"trainer_state": self.state},
            )
            raw, c = evaluate_constraints(self.constraints, sb)
            per_batch.append((sb, raw, c, prompt_rep, clipped))
        t_gen = time.perf_counter() - t0

        # C_i: the mean of c_i over all of this step's samples, on all processes
        dev = self.args.device
        sums = torch.stack([c.sum(0) for _, _, c, _, _ in per_batch]).sum(0).to(dev)
        raw_sums = torch.stack([r.sum(0) for _, r, _, _, _ in per_batch]).sum(0).to(dev)
        len_sum = sum(float(sb.lengths.sum()) for sb, *_ in per_batch)
        n_clip = sum(sum(cl) for *_, cl in per_batch)
        count = sum(len(sb.completions) for sb, *_ in per_batch)
        stats = torch.cat([sums, raw_sums, torch.tensor([len_sum, n_clip, count], device=dev, dtype=sums.dtype)])
        stats = self.accelerator.reduce(stats, reduction="sum")
        m = len(self.constraints)
        total = stats[-1]
        c_step = (stats[:m] / total).double().cpu()
        raw_mean = (stats[m : 2 * m] / total).cpu()
        ema = args.constraint_ema
        if ema > 0 and self.l3m_state["ema"] is not None:
            c_est = ema * torch.tensor(self.l3m_state["ema"], dtype=torch.float64) + (1 - ema) * c_step
        else:
            c_est = c_step
        self.l3m_state["ema"] = c_est.tolist()
        mu = self.mu
        lam = lagrange_multipliers(c_est, mu, args.barrier_s)

        for batch, (sb, _raw, c, prompt_rep, _) in zip(batches, per_batch):
            if args.baseline == "leave_one_out":
                base = leave_one_out_baseline(c.double(), sb.group_ids)
            else:
                base = torch.zeros_like(c, dtype=torch.float64)
            weights = ((c.double() - base) * lam.unsqueeze(0)).sum(1)  # sum_i lambda_i (c_i - b_i), per sample
            seqs = [p + comp for p, comp in zip(prompt_rep, sb.completion_ids)]
            masks = [[0] * len(p) + [1] * len(comp) for p, comp in zip(prompt_rep, sb.completion_ids)]
            batch["sample_input_ids"] = pad(seqs, tok.pad_token_id)
            batch["sample_attention_mask"] = pad([[1] * len(s) for s in seqs], 0)
            batch["sample_mask"] = pad(masks, 0)
            batch["sample_weights"] = weights.float()

        # metrics and state for this step
        met = self._metrics
        met["mu"].append(mu)
        met["sample/mean_length"].append(float(stats[2 * m] / total))
        met["sample/clipped_ratio"].append(float(stats[2 * m + 1] / total))
        met["time/generation_s"].append(t_gen)
        barrier = relaxed_log_barrier(c_est, mu, args.barrier_s)
        met["barrier"].append(float(barrier.mean()) if m else 0.0)
        patience = args.infeasible_patience or max(self.state.max_steps // 4, 10)
        for i, con in enumerate(self.constraints):
            st = con.state
            st.value, st.step_value, st.lam, st.mean_raw = (
                float(c_est[i]),
                float(c_step[i]),
                float(lam[i]),
                float(raw_mean[i]),
            )
            met[f"constraints/{con.name}/value"].append(st.value)
            met[f"constraints/{con.name}/lambda"].append(st.lam)
            met[f"constraints/{con.name}/mean_raw"].append(st.mean_raw)
            met[f"constraints/{con.name}/holds"].append(float(st.holds))
            viol = self.l3m_state["violated_steps"]
            viol[i] = 0 if st.holds else viol[i] + 1
            if viol[i] >= patience and con.name not in self.l3m_state["warned"]:
                self.l3m_state["warned"].append(con.name)
                logger.warning(
                    "constraint '%s' has been violated for %d consecutive steps (C = %.4g, mean %s = %.4g, "
                    "mu = %.3g): it may be infeasible for this model and data, or need more steps",
                    con.name,
                    viol[i],
                    st.value,
                    con.quantity,
                    st.mean_raw,
                    mu,
                )

    # ------------------------------------------------------------------------------------------
    # the loss: one forward/backward for the task batch and the samples

    def _response_logprobs(self, model, seqs: list[tuple]) -> list[torch.Tensor]:
        """Per-token log-probabilities of the masked (response) tokens of each group of sequences.

        Sequences are left-aligned to a common end so that only the last positions, where responses lie,
        go through the LM head (``logits_to_keep``). Groups share one forward pass unless padding them to a
        common width would cost more than 15% extra tokens (long task sequences beside short samples).
        """
        pad_id = self.processing_class.pad_token_id
        unpadded = []  # (ids, response mask) per row, padding stripped
        for ids, mask, attn in seqs:
            for r in range(ids.shape[0]):
                keep = attn[r].bool()
                unpadded.append((ids[r][keep], mask[r][keep]))
        sizes = [s[0].shape[0] for s in seqs]
        lens = [u[0].numel() for u in unpadded]
        together = sum(lens) and len(seqs) > 1
        if together:
            widths, start = [], 0
            for n in sizes:
                widths.append(max(lens[start : start + n]) * n)
                start += n
            together = max(lens) * len(lens) <= 1.15 * sum(widths)
        groups = [list(range(len(unpadded)))] if together or len(seqs) == 1 else []
        if not groups:
            start = 0
            for n in sizes:
                groups.append(list(range(start, start + n)))
                start += n
        out: list[torch.Tensor | None] = [None] * len(unpadded)
        for rows in groups:
            width = max(lens[r] for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=self.args.device)
            attn = torch.zeros_like(ids)
            resp = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                t, m = unpadded[r]
                ids[j, width - t.numel() :] = t
                attn[j, width - t.numel() :] = 1
                resp[j, width - t.numel() :] = m
            has = resp.any(1)
            first = int(resp[has].float().argmax(1).min()) if has.any() else width - 1  # earliest response token
            keep = width - max(first, 1) + 1  # positions whose logits predict a response token
            pos = (attn.cumsum(1) - 1).clamp(min=0)
            kwargs = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
            try:
                logits = model(**kwargs, logits_to_keep=keep).logits
            except TypeError:  # an architecture without logits_to_keep: compute them all
                logits = model(**kwargs).logits
            logits = logits[:, -keep:-1]
            logp = token_logprobs(logits, ids[:, width - keep + 1 :]) * resp[:, width - keep + 1 :]
            for j, r in enumerate(rows):
                out[r] = logp[j]
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        has_task = "input_ids" in inputs
        has_samples = "sample_input_ids" in inputs
        groups = []
        if has_task:
            groups.append((inputs["input_ids"], inputs["response_mask"], inputs["attention_mask"]))
        if has_samples:
            groups.append((inputs["sample_input_ids"], inputs["sample_mask"], inputs["sample_attention_mask"]))
        rows = self._response_logprobs(model, groups)
        n_task = inputs["input_ids"].shape[0] if has_task else 0
        loss = rows[0].new_zeros(())
        if has_task:
            n_tok = inputs["response_mask"].sum(1).clamp(min=1).to(loss.dtype)
            per_example = -torch.stack([r.sum() for r in rows[:n_task]]) / n_tok
            task_nll = per_example.mean()
            loss = loss + task_nll
            self._metrics["task_nll"].append(float(task_nll.detach()))
        if has_samples:
            seq_logp = torch.stack([r.sum() for r in rows[n_task:]])  # a sequence log-probability: a sum
            surrogate = (inputs["sample_weights"].to(loss.dtype) * seq_logp).mean()
            loss = loss + surrogate
            self._metrics["sample/mean_logprob"].append(float(seq_logp.detach().mean()))
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss is {loss.item()} at step {self.state.global_step}; no optimiser step taken")
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            keep = {k: inputs[k] for k in ("input_ids", "attention_mask", "response_mask")}
            loss = self.compute_loss(model, keep)
        self._metrics.pop("task_nll", None)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------
    # logging: per-step metrics averaged on log, also written to metrics.jsonl

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            for key, vals in self._metrics.items():
                if vals:
                    logs[key] = sum(vals) / len(vals)
            self._metrics.clear()
            if "task_nll" in logs:
                logs["objective"] = logs["task_nll"] + logs.get("barrier", 0.0)
        super().log(logs, start_time)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, METRICS_FILE), "a") as f:
                f.write(json.dumps({"step": self.state.global_step, **logs}, default=float) + "\n")

    # ------------------------------------------------------------------------------------------
    # checkpoints: the barrier state travels with the model, optimiser and RNG states

    def _l3m_state_dict(self) -> dict:
        return {
            **self.l3m_state,
            "global_step": self.state.global_step,
            "mu": self.mu,
            "constraints": {c.name: vars(c.state) for c in self.constraints},
        }

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self._l3m_state_dict(), f, indent=2, default=float)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            for key in self.l3m_state:
                if key in saved:
                    self.l3m_state[key] = saved[key]
            for con in self.constraints:
                for k, v in saved.get("constraints", {}).get(con.name, {}).items():
                    setattr(con.state, k, v)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():
            out = output_dir or self.args.output_dir
            with open(os.path.join(out, STATE_FILE), "w") as f:
                json.dump(self._l3m_state_dict(), f, indent=2, default=float)

    def constraint_summary(self) -> list[dict]:
        """The final state of each constraint (estimate, multiplier, verdict on the last step's samples)."""
        return [
            {
                "name": c.name,
                "constraint": c.describe(),
                "value": c.state.value,
                "lambda": c.state.lam,
                "mean_raw": c.state.mean_raw,
                "holds": bool(c.state.holds) if math.isfinite(c.state.value) else None,
                "warned_infeasible": c.name in self.l3m_state["warned"],
            }
            for c in self.constraints
        ]


class L3MProgressCallback(ProgressCallback):
    """The usual progress bar, with mu and whether each constraint holds on the latest step."""

    def __init__(self, trainer: L3MTrainer):
        super().__init__()
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            post = {"mu": f"{self.trainer.mu_schedule(max(state.global_step - 1, 0)):.3g}"}
            for c in self.trainer.constraints:
                if math.isfinite(c.state.value):
                    post[c.name] = ("ok " if c.state.holds else "NO ") + f"{c.state.mean_raw:.3g}"
            self.training_bar.set_postfix(post, refresh=False)
