"""``L3MTrainer``: SFT and alignment as one constrained problem, on top of ``transformers.Trainer``.

    minimise L(theta) subject to C_i(theta) = E_x E_y~pi(.|x) [c_i(x, y)] <= 0,  i = 1..m

Each optimiser step (method.md sections 2-3):

1. sample ``k`` responses per prompt from the current policy (:mod:`l3m.sampling`);
2. evaluate every constraint on them: per-response ``c_i(x, y)``;
3. estimate ``C_i`` as the mean over the step's samples (summed over accumulation micro-batches and processes,
   then an optional EMA) and set ``lambda_i = B'(C_i) / m = mu / (m * max(-C_i, mu**2))``;
4. minimise the surrogate ``L_task + sum_i lambda_i * mean_j[(c_ij - b_ij) * log pi(y_j|x_j)]``, with
   ``log pi(y|x)`` summed over the response's tokens, ``b_ij`` the leave-one-out baseline and lambda, c, b detached:
   its gradient is ``grad L + sum_i lambda_i grad C_i``;
5. decay ``mu`` (``MuSchedule``, from the step counter).

Steps 1-3 run once per optimiser step, for all its micro-batches (:meth:`L3MTrainer.sample_and_weight`); step 4 is
:meth:`L3MTrainer.compute_loss`. With no constraints the trainer is plain SFT (no sampling at all).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from l3m.barrier import MuSchedule, lagrange_multipliers, relaxed_log_barrier
from l3m.checkpointing import METRICS_FILE, STATE_FILE, AtomicCheckpointMixin, write_json
from l3m.config import L3MConfig
from l3m.console import CompactLogCallback, QuietProgressCallback
from l3m.constraints import Constraint, SampleBatch, evaluate_constraints, leave_one_out_baseline
from l3m.data import Example, L3MCollator, ListDataset, load_examples, pad, tokenize_examples
from l3m.errors import ConstraintFunctionError, L3MUserError, NonFiniteError
from l3m.heldout import HeldoutChecks
from l3m.logprobs import eos_token_ids, response_logprobs, shared_prefix_logprobs
from l3m.sampling import Completions, generate, generation_config, sample_batch, seeded_rng, split_completions

logger = logging.getLogger(__name__)


class _Drawn(NamedTuple):
    """One micro-batch's samples: the prompts, the completions, what the constraints saw and their values."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completions: Completions
    samples: SampleBatch
    raw: torch.Tensor  # [n, m]: the raw quantities (tokens, rewards)
    c: torch.Tensor  # [n, m]: c_i(x, y)


class L3MTrainer(AtomicCheckpointMixin, Trainer):
    """Fine-tune a causal LM on task data subject to average constraints on its own responses.

    Args:
        model: a ``PreTrainedModel`` or a model name/path (hub name, local directory, or ``"default"``).
        args: an :class:`L3MConfig`.
        train_dataset: task data: a path, ``"builtin"``, a ``datasets.Dataset`` or a list of records in any
            format :mod:`l3m.data` reads, or a list of :class:`~l3m.data.Example`.
        eval_dataset: held-out task data: the eval loss (task NLL) and, with constraints, the prompts on which each
            evaluation checks them (``eval/constraints/...``).
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
            processing_class = processing_class or load_tokenizer(model)
            model = load_causal_lm(model)
        tok = processing_class or load_tokenizer(model.config._name_or_path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            if args.gradient_checkpointing:  # the frozen embeddings' output must carry a gradient into the blocks
                model.enable_input_require_grads()
            model = get_peft_model(model, peft_config)
        if args.ddp_broadcast_buffers is None:
            # DDP broadcasts buffers at every forward call, a collective; the loss makes a data-dependent number of
            # forward calls per micro-batch, which would deadlock. LM buffers (rotary frequencies) are constants.
            args.ddp_broadcast_buffers = False
        self.constraints: list[Constraint] = list(constraints or [])
        self.eos_token_ids = eos_token_ids(model, tok)

        train_examples = self._as_examples(train_dataset, need_response=True)
        train_ds = ListDataset(
            tokenize_examples(tok, train_examples, args.max_length, args.max_prompt_length, "train data"),
            train_examples,
        )
        self.eval_examples = None
        eval_ds = None
        if eval_dataset is not None:
            self.eval_examples = self._as_examples(eval_dataset, need_response=True)
            feats = tokenize_examples(tok, self.eval_examples, args.max_length, args.max_prompt_length, "eval data")
            eval_ds = ListDataset(feats, self.eval_examples)
        self.prompt_examples, self.prompt_feats = train_examples, train_ds.items
        if prompt_dataset is not None:
            self.prompt_examples = self._as_examples(prompt_dataset, need_response=False)
            self.prompt_feats = tokenize_examples(
                tok, self.prompt_examples, args.max_length, args.max_prompt_length, "prompt data"
            )
        # Prompts are sampled apart from the task rows when there is a prompt set, or when a different number of them
        # is asked for (prompt_batch_size): more prompts per step than task rows lower the variance of C_i and grad C_i.
        pbs = args.prompt_batch_size
        self._separate_prompts = prompt_dataset is not None or (
            pbs is not None and pbs != args.per_device_train_batch_size
        )
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
        self.l3m_state: dict[str, Any] = {
            "ema": None,
            "violated_steps": [0] * len(self.constraints),
            "warned": [],
            "infeasible": {},  # name -> the numbers when the infeasibility warning was given
        }
        self.heldout = HeldoutChecks(self)
        self.model_card_info: dict[str, Any] = {}  # what the CLI knows of the run (the user's config), for the card
        if not args.disable_tqdm:  # the progress bar without transformers' raw dicts; one compact line per log
            self.remove_callback(ProgressCallback)
            self.add_callback(QuietProgressCallback(status=self._progress_status))
        self.add_callback(CompactLogCallback())

    # ------------------------------------------------------------------------------------------
    # the method's pieces a variant may replace (l3m.minimax, l3m.experimental)

    @property
    def mu_schedule(self) -> MuSchedule:
        return MuSchedule(self.args.mu_init, self.args.mu_min, max(self.state.max_steps, 1))

    @property
    def mu(self) -> float:
        return self.mu_schedule(self.state.global_step)

    def barrier_s(self, mu: float) -> float | None:
        """The barrier's relaxation point s; ``None`` is the paper's ``s = mu**2``."""
        return None

    def multipliers(self, c_est: torch.Tensor, mu: float) -> torch.Tensor:
        """Step 3: ``lambda_i = B'(C_i) / m``."""
        return lagrange_multipliers(c_est, mu, self.barrier_s(mu))

    @property
    def uses_task_loss(self) -> bool:
        return True

    def prepare_samples(self, batch: dict, samples: SampleBatch) -> None:
        """Add whatever else the loss needs of a micro-batch's samples (nothing, for the L3M)."""

    def sample_weights(self, inputs: dict, seq_logp: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the surrogate, ``sum_i lambda_i (c_i - b_i)``."""
        return inputs["sample_weights"].to(seq_logp.dtype)

    # ------------------------------------------------------------------------------------------
    # steps 1-3: sample, evaluate the constraints, estimate C_i and lambda_i (once per optimiser step)

    @staticmethod
    def _as_examples(data: Any, need_response: bool) -> list[Example]:
        if isinstance(data, list) and data and isinstance(data[0], Example):
            return data
        return load_examples(data, need_response=need_response)

    def _micro_index(self, micro: int) -> int:
        """The global index of a micro-batch: across steps, accumulation and processes, in the order the data loader
        deals them out, so that a run's samples depend neither on how its batch is split nor on a resume."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return (self.state.global_step * self.args.gradient_accumulation_steps + micro) * world + rank

    def _prompt_batch(self, batch: dict, micro: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Left-padded prompt ids to sample from: the batch's own prompts, or a slice of the prompt set."""
        if not self._separate_prompts:
            return batch["prompt_ids"], batch["prompt_attention_mask"], batch["index"].tolist()
        n, bs = len(self.prompt_feats), self.args.prompt_batch_size or self.args.per_device_train_batch_size
        start = self._micro_index(micro) * bs
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + start // n)).tolist()
        idx = [perm[(start + j) % n] for j in range(bs)]
        ids = [self.prompt_feats[i]["prompt_ids"] for i in idx]
        return pad(ids, self.processing_class.pad_token_id, "left"), pad([[1] * len(x) for x in ids], 0, "left"), idx

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Completions:
        """Step 1: ``num_generations`` samples per prompt from the current policy."""
        args, tok = self.args, self.processing_class
        config = generation_config(args.max_new_tokens, args.temperature, self.eos_token_ids, tok.pad_token_id)
        model = self.accelerator.unwrap_model(self.model)
        return split_completions(
            generate(model, prompt_ids, prompt_mask, args.num_generations, config, args.sampler), self.eos_token_ids
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.constraints and batches:
            self.sample_and_weight(batches)
        return batches, None

    def sample_and_weight(self, batches: list[dict]) -> None:
        """Steps 1-3 for one optimiser step's micro-batches; each batch gets its samples and their weights."""
        args, k, tok = self.args, self.args.num_generations, self.processing_class
        t0 = time.perf_counter()
        drawn, error = [], None  # per micro-batch: what was sampled and what the constraints made of it
        for micro, batch in enumerate(batches):
            p_ids, p_mask, idx = self._prompt_batch(batch, micro)
            with seeded_rng(self.args.device, self.args.seed * 1_000_003 + self._micro_index(micro)):
                comps = self.sample(p_ids, p_mask)
            texts = [self.prompt_examples[i].prompt_text for i in idx]
            sb = sample_batch(tok, texts, comps, k, extra={"trainer_state": self.state})
            try:
                raw, c = evaluate_constraints(self.constraints, sb)  # step 2
            except Exception as exc:  # noqa: BLE001 - raised below, on every process at once
                error = self._constraint_error(exc, sb)
                raw = c = torch.zeros(len(comps.ids), len(self.constraints))
            drawn.append(_Drawn(p_ids, p_mask, comps, sb, raw, c))
            if error is not None:
                break
        t_gen = time.perf_counter() - t0

        # Step 3. C_i: the mean of c_i over all of this step's samples, on all processes. The sums travel in float64
        # with a failure flag, so that every process stops together when one sample is bad.
        dev = self.args.device
        dtype = torch.float32 if dev.type == "mps" else torch.float64
        m = len(self.constraints)
        sums = torch.stack([d.c.sum(0) for d in drawn]).sum(0)
        raw_sums = torch.stack([d.raw.sum(0) for d in drawn]).sum(0)
        lengths = [n for d in drawn for n in d.completions.lengths]
        cut = [t for d in drawn for t in d.completions.truncated]
        extra = torch.tensor([sum(lengths), sum(cut), float(error is not None), len(lengths)])
        stats = self.accelerator.reduce(torch.cat([sums, raw_sums, extra]).to(dev, dtype), reduction="sum")
        if stats[-2] > 0:
            raise error or NonFiniteError(f"a constraint failed on another process at step {self.state.global_step}")
        total = stats[-1]
        c_step, raw_mean = (stats[:m] / total).double().cpu(), (stats[m : 2 * m] / total).double().cpu()
        ema = args.constraint_ema
        if ema > 0 and self.l3m_state["ema"] is not None:
            c_est = ema * torch.tensor(self.l3m_state["ema"], dtype=torch.float64) + (1 - ema) * c_step
        else:
            c_est = c_step
        self.l3m_state["ema"] = c_est.tolist()
        mu = self.mu
        lam = self.multipliers(c_est, mu)

        # The per-sample weights of step 4's surrogate, lambda_i (c_i - b_i) summed over i, and the samples as
        # sequences (prompt + response + its end token) and as (prompt, continuation) for prefix sharing.
        for batch, (p_ids, p_mask, comps, sb, _raw, c) in zip(batches, drawn):
            c = c.double()
            base = leave_one_out_baseline(c, sb.group_ids) if args.baseline == "leave_one_out" else torch.zeros_like(c)
            batch["sample_weights"] = ((c - base) * lam.unsqueeze(0)).sum(1).float()
            prompts = [p[msk.bool()].tolist() for p, msk in zip(p_ids, p_mask)]
            scored = comps.scored_ids()
            seqs = [prompts[j // k] + s for j, s in enumerate(scored)]
            batch["sample_input_ids"] = pad(seqs, tok.pad_token_id)
            batch["sample_attention_mask"] = pad([[1] * len(s) for s in seqs], 0)
            batch["sample_mask"] = pad([[0] * len(prompts[j // k]) + [1] * len(s) for j, s in enumerate(scored)], 0)
            batch["sample_prompt_ids"], batch["sample_prompt_mask"] = p_ids, p_mask
            batch["sample_completion_ids"] = pad(scored, tok.pad_token_id)
            batch["sample_completion_mask"] = pad([[1] * len(s) for s in scored], 0)
            batch["sample_group_ids"] = sb.group_ids.clone()
            self.prepare_samples(batch, sb)

        met = self._metrics
        met["mu"].append(mu)
        met["sample/mean_length"].append(float(stats[2 * m] / total))
        met["sample/clipped_ratio"].append(float(stats[2 * m + 1] / total))
        met["time/generation_s"].append(t_gen)
        met["barrier"].append(float(relaxed_log_barrier(c_est, mu, self.barrier_s(mu)).mean()) if m else 0.0)
        for i, con in enumerate(self.constraints):
            st = con.state
            st.value, st.step_value, st.lam, st.mean_raw = (
                float(c_est[i]),
                float(c_step[i]),
                float(lam[i]),
                float(raw_mean[i]),
            )
            for key in ("value", "lambda", "mean_raw"):
                met[f"constraints/{con.name}/{key}"].append(st.lam if key == "lambda" else getattr(st, key))
            met[f"constraints/{con.name}/holds"].append(float(st.holds))
            self._watch_feasibility(i, con, mu)

    def _watch_feasibility(self, i: int, con: Constraint, mu: float) -> None:
        """Warn once when a constraint has been violated for ``infeasible_patience`` consecutive steps."""
        st, viol = con.state, self.l3m_state["violated_steps"]
        viol[i] = 0 if st.holds else viol[i] + 1
        patience = self.args.infeasible_patience or max(self.state.max_steps // 4, 10)
        if viol[i] < patience or con.name in self.l3m_state["warned"]:
            return
        self.l3m_state["warned"].append(con.name)
        self.l3m_state["infeasible"][con.name] = {
            "step": self.state.global_step + 1,
            "violated_steps": viol[i],
            "value": st.value,
            "mean_raw": st.mean_raw,
            "lambda": st.lam,
            "mu": mu,
        }
        logger.warning(
            "constraint '%s' has been violated for %d consecutive steps (C = %.4g, mean %s = %.4g, mu = %.3g): it may "
            "be infeasible for this model and data, or need more steps",
            con.name,
            viol[i],
            st.value,
            con.quantity,
            st.mean_raw,
            mu,
        )

    def _constraint_error(self, exc: Exception, sb: SampleBatch) -> Exception:
        """User and non-finite errors as they are; any other exception (a reward function that raised) as a
        :class:`ConstraintFunctionError` holding the samples it was scoring."""
        if isinstance(exc, (NonFiniteError, L3MUserError)):
            return exc
        samples = [{"prompt": p, "completion": c} for p, c in zip(sb.prompts, sb.completions)]
        return ConstraintFunctionError(
            f"a constraint function raised {type(exc).__name__}: {exc} (while scoring {len(samples)} samples)",
            samples=samples,
            details="".join(traceback.format_exception(exc)),
        )

    # ------------------------------------------------------------------------------------------
    # step 4: the loss, one forward/backward for the task batch and the samples

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        has_samples = "sample_input_ids" in inputs
        if model.training and not self.uses_task_loss and not self.constraints:
            raise L3MUserError("training.task_loss is false and there are no constraints: nothing to optimise")
        # without the task loss (minimax) the task batch still gives the eval loss, never the training one
        has_task = "input_ids" in inputs and (self.uses_task_loss or not has_samples)
        rows = self._loss_logprobs(model, inputs, has_task, has_samples)
        n_task = inputs["input_ids"].shape[0] if has_task else 0
        loss = rows[0].new_zeros(())
        if has_task:  # L: the mean over task rows of each row's mean NLL per response token
            n_tok = inputs["response_mask"].sum(1).clamp(min=1).to(loss.dtype)
            task_nll = (-torch.stack([r.sum() for r in rows[:n_task]]) / n_tok).mean()
            loss = loss + task_nll
            self._metrics["task_nll"].append(float(task_nll.detach()))
        if has_samples:  # sum_i lambda_i mean_j[(c_ij - b_ij) log pi(y_j|x_j)], a sequence log-probability: a sum
            seq_logp = torch.stack([r.sum() for r in rows[n_task:]])
            loss = loss + (self.sample_weights(inputs, seq_logp).to(loss.dtype) * seq_logp).mean()
            self._metrics["sample/mean_logprob"].append(float(seq_logp.detach().mean()))
        bad = not bool(torch.isfinite(loss.detach()))
        if model.training and self.accelerator.num_processes > 1:  # every process stops together, before backward
            flag = torch.tensor([float(bad)], device=loss.device)
            if bool(self.accelerator.reduce(flag, reduction="sum") > 0) and not bad:
                raise NonFiniteError(f"the loss is not finite on another process at step {self.state.global_step}")
        if bad:
            raise NonFiniteError(f"the loss is {loss.item()} at step {self.state.global_step}; no optimiser step taken")
        return (loss, None) if return_outputs else loss

    def _loss_logprobs(self, model, inputs: dict, has_task: bool, has_samples: bool) -> list[torch.Tensor]:
        """Per-token log-probabilities of the response tokens, one row per sequence: task rows, then samples.

        Task rows are scored at temperature 1, samples at the sampling temperature. Each sampled prompt is encoded
        once for its ``k`` samples and for its task row when the task batch's own prompts were sampled (prefix
        sharing); otherwise, or where weights are sharded over processes (every process must make the same forward
        calls), or under gradient checkpointing, every sequence goes through the model whole.
        """
        pad_id, t_s = self.processing_class.pad_token_id, float(self.args.temperature)
        task = (inputs["input_ids"], inputs["response_mask"], inputs["attention_mask"]) if has_task else None
        samples = (
            (inputs["sample_input_ids"], inputs["sample_mask"], inputs["sample_attention_mask"])
            if has_samples
            else None
        )
        groups = [g for g, on in ((task, has_task), (samples, has_samples)) if on]
        temps = [1.0] * has_task + [t_s] * has_samples
        if self._weights_sharded():
            return response_logprobs(model, groups, pad_id, temps, one_call=True)
        if has_samples and self._can_share_prefix(model):
            p_ids, p_mask = inputs["sample_prompt_ids"], inputs["sample_prompt_mask"]
            c_ids, c_mask = inputs["sample_completion_ids"], inputs["sample_completion_mask"]
            k = self.args.num_generations
            conts = [(c_ids[j][c_mask[j].bool()], j // k, t_s) for j in range(c_ids.shape[0])]
            task_conts = self._task_continuations(task, p_ids, p_mask) if has_task else []
            shared = shared_prefix_logprobs(model, p_ids, p_mask, (task_conts or []) + conts, pad_id)
            if shared is not None:
                if task_conts is None:  # task rows with prompts of their own (a separate prompt set)
                    return response_logprobs(model, [task], pad_id) + shared
                return shared
            self._prefix_sharing_failed = True
        return response_logprobs(model, groups, pad_id, temps)

    def _weights_sharded(self) -> bool:
        """Under ZeRO-3 and FSDP each forward call gathers the weights from all processes together."""
        if self.accelerator.num_processes < 2:
            return False
        from transformers.integrations import is_deepspeed_zero3_enabled

        return bool(getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled())

    def _can_share_prefix(self, model) -> bool:
        if getattr(self, "_prefix_sharing_failed", False):
            return False
        inner = self.accelerator.unwrap_model(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        flag = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else None
        return not getattr(inner, flag or "is_gradient_checkpointing", False)

    @staticmethod
    def _task_continuations(task: tuple, p_ids: torch.Tensor, p_mask: torch.Tensor) -> list[tuple] | None:
        """The task rows' responses as (tokens, prompt row, 1.0) continuations of the sampled prompts, when task row
        ``j`` is prompt ``j`` followed by its response; ``None`` otherwise (a separate prompt set)."""
        ids, resp, attn = task
        if ids.shape[0] != p_ids.shape[0]:
            return None
        out = []
        for j in range(ids.shape[0]):
            prompt = p_ids[j][p_mask[j].bool()]
            n, r = prompt.numel(), int(resp[j].sum())
            if (
                r == 0
                or int(attn[j].sum()) != n + r
                or bool(resp[j][:n].any())
                or not bool(resp[j][n : n + r].all())
                or not torch.equal(ids[j][:n].to(prompt.device), prompt)
            ):
                return None
            out.append((ids[j][n : n + r], j, 1.0))
        return out

    # ------------------------------------------------------------------------------------------
    # evaluation: the task NLL, then the constraints on held-out prompts (l3m.heldout)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            keep = {k: inputs[k] for k in ("input_ids", "attention_mask", "response_mask")}
            loss = self.compute_loss(model, keep)
        self._metrics.pop("task_nll", None)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.constraints and self.eval_examples and eval_dataset is None:
            checks = self.heldout.run(eval_loss=metrics.get(f"{metric_key_prefix}_loss"))
            self.log(checks)
            metrics.update(checks)
        return metrics

    # ------------------------------------------------------------------------------------------
    # logging: per-step metrics averaged on log, also written to metrics.jsonl

    def _progress_status(self) -> dict[str, str]:
        """The progress bar's postfix: mu and whether each constraint held on the last step's samples."""
        post = {"mu": f"{self.mu_schedule(max(self.state.global_step - 1, 0)):.3g}"}
        for c in self.constraints:
            if math.isfinite(c.state.value):
                post[c.name] = ("ok " if c.state.holds else "NO ") + f"{c.state.mean_raw:.3g}"
        return post

    def edit_logs(self, logs: dict[str, float]) -> None:
        if "task_nll" in logs:
            logs["objective"] = logs["task_nll"] + logs.get("barrier", 0.0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            keys = sorted(k for k, vals in self._metrics.items() if vals)
            means = [sum(self._metrics[k]) / len(self._metrics[k]) for k in keys]
            if self.accelerator.num_processes > 1:
                # per-process metrics (task_nll, time) become means over processes; global ones (mu, C_i, lambda_i)
                # are the same on every process and stay as they are
                local = torch.tensor(means, dtype=torch.float64, device=self.args.device)
                means = self.accelerator.reduce(local, reduction="mean").tolist()
            logs.update(zip(keys, means))
            self._metrics.clear()
            self.edit_logs(logs)
        super().log(logs, start_time)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, METRICS_FILE), "a") as f:
                f.write(json.dumps({"step": self.state.global_step, **logs}, default=float) + "\n")

    # ------------------------------------------------------------------------------------------
    # checkpoints (l3m.checkpointing): the barrier state travels with the model, optimiser and RNG states

    def checkpoint_state(self) -> dict:
        return {
            **self.l3m_state,
            "global_step": self.state.global_step,
            "mu": self.mu,
            "constraints": {c.name: vars(c.state) for c in self.constraints},
            "heldout": self.heldout.state_dict(),
        }

    def restore_state(self, saved: dict | None, checkpoint: str) -> None:
        if saved is None:
            if self.constraints:
                logger.warning("%s has no %s: the barrier state starts afresh", checkpoint, STATE_FILE)
            return
        for key in self.l3m_state:
            if key in saved:
                self.l3m_state[key] = saved[key]
        for con in self.constraints:
            for k, v in saved.get("constraints", {}).get(con.name, {}).items():
                setattr(con.state, k, v)
        self.heldout.load_state_dict(saved.get("heldout") or {})

    def save_extra(self, folder: str) -> None:
        """Each checkpoint gets its model card, with the estimates and held-out verdicts of its step."""
        from l3m.model_card import write_model_card

        write_model_card(folder, self.card_info())

    def _save_checkpoint(self, model, trial) -> None:
        self.heldout.mark_selected(os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}"))
        super()._save_checkpoint(model, trial)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self.heldout.load_selected()
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():
            from l3m.model_card import write_model_card

            out = output_dir or self.args.output_dir
            write_json(os.path.join(out, STATE_FILE), self.checkpoint_state())
            write_model_card(out, self.card_info())

    def card_info(self) -> dict:
        """What the model card states: the run's settings, the constraints, their estimates and held-out verdicts."""
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        info = {
            "base_model": getattr(base.config, "_name_or_path", None),
            "method": "l3m",
            "constraints": [{"constraint": c.describe()} for c in self.constraints],
            "training": {
                "steps": self.state.global_step,
                "learning_rate": self.args.learning_rate,
                "num_generations": self.args.num_generations,
                "max_new_tokens": self.args.max_new_tokens,
                "temperature": self.args.temperature,
                "mu_init": self.args.mu_init,
                "mu_min": self.args.mu_min,
            },
            "training_estimates": self.constraint_summary(),
            **self.heldout.card_info(),
        }
        info.update(self.model_card_info)
        return info

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
                "infeasible_warning": self.l3m_state.get("infeasible", {}).get(c.name),
            }
            for c in self.constraints
        ]
