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

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import shutil
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from l3m.averaging import TailAverage
from l3m.barrier import MuSchedule, lagrange_multipliers, relaxed_log_barrier
from l3m.config import L3MConfig
from l3m.constraints import Constraint, SampleBatch, evaluate_constraints, leave_one_out_baseline
from l3m.data import Example, L3MCollator, ListDataset, load_examples, pad, tokenize_examples
from l3m.errors import L3MUserError, NonFiniteError
from l3m.logprobs import eos_token_ids

logger = logging.getLogger(__name__)

STATE_FILE = "l3m_state.json"
METRICS_FILE = "metrics.jsonl"
STAGING_PREFIX = "tmp-"  # checkpoints are written to tmp-checkpoint-N, then renamed: get_last_checkpoint skips them


class ConstraintFunctionError(RuntimeError):
    """A constraint's function (a reward function, a reward model) raised while scoring the step's samples.

    Like :class:`~l3m.errors.NonFiniteError`, it stops training before the optimiser step; ``samples`` holds the
    (prompt, completion) pairs it was scoring and ``details`` the function's traceback.
    """

    def __init__(self, message: str, samples: list[dict] | None = None, details: str = ""):
        super().__init__(message)
        self.samples = samples or []
        self.details = details
        self.prompt = self.samples[0]["prompt"] if self.samples else None
        self.completion = self.samples[0]["completion"] if self.samples else None


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
        ref_model: ``method: minimax`` only: the reference (SFT) model or its name/path (default ``args.ref_model``,
            else a frozen copy of the initial model); see :mod:`l3m.minimax`.
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
        ref_model: PreTrainedModel | str | None = None,
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

            if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing:
                # the frozen embeddings' output must carry a gradient into the checkpointed blocks
                model.enable_input_require_grads()
            model = get_peft_model(model, peft_config)
        if args.ddp_broadcast_buffers is None:
            # DDP broadcasts buffers at every forward call, a collective; the loss makes a data-dependent number of
            # forward calls per micro-batch, which would then deadlock the processes. LM buffers (rotary
            # frequencies) are constants: nothing needs broadcasting.
            args.ddp_broadcast_buffers = False
        self.constraints: list[Constraint] = list(constraints or [])
        self.eos_token_ids = eos_token_ids(model, tok)
        kinds = [getattr(c, "gradient", "sequence") for c in self.constraints]
        self._stop_gradient = [g == "stop" for g in kinds]
        self._shift_gradient = [g == "shift" for g in kinds]
        if (any(self._stop_gradient) or any(self._shift_gradient)) and not self.eos_token_ids:
            g = "stop" if any(self._stop_gradient) else "shift"
            raise L3MUserError(
                f"a constraint has 'gradient: {g}', which needs the model's end-of-response token, and neither the "
                "tokenizer nor the generation config names one (set generation_config.eos_token_id)"
            )
        if any(self._shift_gradient) and args.loss_chunks > 1:
            raise L3MUserError(
                "a constraint has 'gradient: shift', whose surrogate is a product of two means over the whole "
                "micro-batch and cannot be split into chunks: set training.loss_chunks to 1"
            )

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
        # Sampled prompts are drawn apart from the task rows when there is a prompt set, or when a different
        # number of them is asked for (prompt_batch_size): then from the training prompts, by a seeded permutation.
        # More prompts per step than task rows lower the variance of the constraints' estimates (C_i and its
        # gradient) without changing the task loss's batch.
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
        if args.loss_chunks > 1 and (
            getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
        ):
            raise L3MUserError(
                f"training.loss_chunks = {args.loss_chunks} splits each micro-batch's backward in several, which "
                "DeepSpeed and FSDP do not support here; use gradient_accumulation_steps to save memory there"
            )
        if args.clip_each_part and (
            getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
        ):
            raise L3MUserError(
                "training.clip_each_part clips the task's and the constraints' gradients apart, which needs whole "
                "gradients on each process: not with DeepSpeed or FSDP"
            )
        self._loss_part: str | None = None  # clip_each_part: "task" or "samples" while that part's loss is built
        self.minimax = None  # method "minimax": the MM baseline's multipliers, reference model and hooks
        if args.method == "minimax":
            from l3m.minimax import Minimax

            self.minimax = Minimax(self, ref_model)
        self.tail_average: TailAverage | None = None  # average_tail > 0: save the mean of the last iterates
        if args.average_tail:
            from transformers.integrations import is_deepspeed_zero3_enabled

            if args.load_best_model_at_end:
                raise L3MUserError("training.average_tail and load_best_model_at_end exclude each other: pick one")
            if getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
                raise L3MUserError("training.average_tail needs whole weights on each process: not with FSDP or ZeRO-3")
            self.tail_average = TailAverage(self.model, args.average_tail)
            self.add_callback(self.tail_average)
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

    @contextlib.contextmanager
    def _sampling_rng(self, micro: int):
        """Sample from an RNG seeded by ``(seed, global micro-batch index)``, restoring the global RNG afterwards.

        The micro-batch index counts across steps, accumulation and processes in the order the data loader deals
        batches out, so a run's samples do not depend on how its global batch is split (N processes x 1 micro-batch
        or 1 process x N accumulation steps), nor on whether it was resumed from a checkpoint.
        """
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        index = (self.state.global_step * self.args.gradient_accumulation_steps + micro) * world + rank
        dev = torch.device(self.args.device)
        devices = [] if dev.type == "cpu" else [dev.index if dev.index is not None else 0]
        kwargs = {} if dev.type in ("cpu", "cuda") else {"device_type": dev.type}
        with torch.random.fork_rng(devices=devices, **kwargs):
            torch.manual_seed((self.args.seed * 1_000_003 + index) % (2**63))
            yield

    def _constraint_error(self, exc: Exception, sb: SampleBatch) -> Exception:
        """What to raise when evaluating the constraints failed: user and non-finite errors as they are; any other
        exception (a reward function that raised) as a :class:`ConstraintFunctionError` holding the samples."""
        if isinstance(exc, (NonFiniteError, L3MUserError)):
            return exc
        samples = [{"prompt": p, "completion": c} for p, c in zip(sb.prompts, sb.completions)]
        return ConstraintFunctionError(
            f"a constraint function raised {type(exc).__name__}: {exc} (while scoring {len(samples)} samples)",
            samples=samples,
            details="".join(traceback.format_exception(exc)),
        )

    # ------------------------------------------------------------------------------------------
    # sampling and the constraint estimates: done once per optimiser step, for all micro-batches

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.constraints and batches:
            self._sample_and_weight(batches)
        return batches, None

    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        # FSDP2 gathers the sharded weights in each forward call, which fails under inference_mode ("Inference
        # tensors do not track version counter", seen on an H100); no_grad works there
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        with torch.no_grad() if sharded else torch.inference_mode():
            return self._generate_samples(prompt_ids, prompt_mask)

    def _generate_samples(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """``k`` samples per prompt; generation stops once every sequence has ended (or at ``max_new_tokens``).

        The prompts go through the model once, not ``k`` times: their KV cache (all but the last token) is
        computed for the distinct prompts and repeated ``k`` times before sampling. The samples are drawn exactly
        as ``generate(..., num_return_sequences=k)`` draws them, with the same random numbers.
        """
        args, k = self.args, self.args.num_generations
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        ids, mask = prompt_ids.to(self.args.device), prompt_mask.to(self.args.device)
        kwargs = dict(
            do_sample=True,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.processing_class.pad_token_id,
            use_cache=True,
        )
        try:
            cache = self._shared_prompt_cache(model, ids, mask, k)
            if cache is None:
                out = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=k, **kwargs)
            else:
                kwargs[self._cache_kwarg(model)] = cache
                out = model.generate(
                    input_ids=ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0), **kwargs
                )
        finally:
            model.train(was_training)
        return out[:, prompt_ids.shape[1] :].cpu()

    @staticmethod
    def _shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, k: int):
        """The KV cache of the prompts but their last token, computed once and repeated ``k`` times; ``None``
        where that does not apply (one sample per prompt, one-token prompts, a model whose generation uses
        another cache type), and ``generate`` then encodes the prompts itself."""
        if k < 2 or ids.shape[1] < 2 or getattr(model.generation_config, "cache_implementation", None):
            return None
        try:
            out = model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=(mask[:, :-1].cumsum(1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,
            )
        except TypeError:  # an architecture without logits_to_keep
            return None
        cache = L3MTrainer._cache_of(out)
        if type(cache) is not DynamicCache:
            return None
        cache.batch_repeat_interleave(k)
        return cache

    @staticmethod
    def _cache_of(output) -> Any:
        """The KV cache a forward pass returned (``cache``; ``past_key_values`` before transformers renamed it)."""
        for name in ("cache", "past_key_values"):
            if output is not None and name in output.keys():
                return output[name]
        return None

    @staticmethod
    def _cache_kwarg(model) -> str:
        """The name under which the model's forward (and ``generate``) take a KV cache."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(getattr(base, "module", base).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

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
        sb_prompts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the left-padded prompts each batch sampled
        error: BaseException | None = None
        for micro, batch in enumerate(batches):
            p_ids, p_mask, idx = self._prompt_batch(batch, micro)
            sb_prompts[id(batch)] = (p_ids, p_mask)
            with self._sampling_rng(micro):
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
            try:
                raw, c = evaluate_constraints(self.constraints, sb)
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every process at once
                error = self._constraint_error(exc, sb)
                raw = c = torch.zeros(len(comps), len(self.constraints))
            per_batch.append((sb, raw, c, prompt_rep, clipped))
            if error is not None:
                break
        t_gen = time.perf_counter() - t0

        # C_i: the mean of c_i over all of this step's samples, on all processes. The sums travel in float64, and
        # a failure flag travels with them, so that every process stops together when one sample is bad.
        dev = self.args.device
        dtype = torch.float32 if dev.type == "mps" else torch.float64
        sums = torch.stack([c.sum(0) for _, _, c, _, _ in per_batch]).sum(0).to(dev, dtype)
        raw_sums = torch.stack([r.sum(0) for _, r, _, _, _ in per_batch]).sum(0).to(dev, dtype)
        len_sum = sum(float(sb.lengths.sum()) for sb, *_ in per_batch)
        n_clip = sum(sum(cl) for *_, cl in per_batch)
        count = sum(len(sb.completions) for sb, *_ in per_batch)
        extra = torch.tensor([len_sum, n_clip, float(error is not None), count], device=dev, dtype=dtype)
        stats = self.accelerator.reduce(torch.cat([sums, raw_sums, extra]), reduction="sum")
        if stats[-2] > 0:
            if error is None:
                error = NonFiniteError(
                    f"a constraint failed on another process at step {self.state.global_step}; its error is above"
                )
            raise error
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
        lam = self._multipliers(c_est, mu)

        for batch, (sb, _raw, c, prompt_rep, _) in zip(batches, per_batch):
            if args.baseline == "leave_one_out":
                base = leave_one_out_baseline(c.double(), sb.group_ids)
            else:
                base = torch.zeros_like(c, dtype=torch.float64)
            terms = (c.double() - base) * lam.unsqueeze(0)  # lambda_i (c_i - b_i), per sample and constraint
            stop = torch.tensor(self._stop_gradient, dtype=torch.bool)
            shift = torch.tensor(self._shift_gradient, dtype=torch.bool)
            weights = terms[:, ~(stop | shift)].sum(1)  # these multiply the sequence log-probability
            seqs = [p + comp for p, comp in zip(prompt_rep, sb.completion_ids)]
            masks = [[0] * len(p) + [1] * len(comp) for p, comp in zip(prompt_rep, sb.completion_ids)]
            batch["sample_input_ids"] = pad(seqs, tok.pad_token_id)
            batch["sample_attention_mask"] = pad([[1] * len(s) for s in seqs], 0)
            batch["sample_mask"] = pad(masks, 0)
            batch["sample_weights"] = weights.float()
            if stop.any():  # constraints with gradient "stop": their weights multiply the stop decisions' log-prob
                batch["sample_stop_weights"] = terms[:, stop].sum(1).float()
            if shift.any():  # gradient "shift": their weights estimate dC/d(a uniform shift of the stop log-odds)
                batch["sample_shift_weights"] = terms[:, shift].sum(1).float()
            # the same samples as (prompt, completion): the loss's forward pass encodes each prompt once
            batch["sample_prompt_ids"], batch["sample_prompt_mask"] = sb_prompts[id(batch)]
            batch["sample_completion_ids"] = pad(sb.completion_ids, tok.pad_token_id)
            batch["sample_completion_mask"] = pad([[1] * len(x) for x in sb.completion_ids], 0)
            if self.minimax is not None:  # the reference model's log-probabilities of the samples (the KL term)
                self.minimax.prepare_batch(batch, sb)

        # metrics and state for this step
        met = self._metrics
        met["mu"].append(mu)
        met["sample/mean_length"].append(float(stats[2 * m] / total))
        met["sample/clipped_ratio"].append(float(stats[2 * m + 1] / total))
        met["time/generation_s"].append(t_gen)
        barrier = relaxed_log_barrier(c_est, mu, self._barrier_s(mu))
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
                self.l3m_state["infeasible"][con.name] = {
                    "step": self.state.global_step + 1,
                    "violated_steps": viol[i],
                    "value": st.value,
                    "mean_raw": st.mean_raw,
                    "lambda": st.lam,
                    "mu": mu,
                }
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

    def _fixed_forward_calls(self) -> bool:
        """Whether the loss must make the same forward calls on every process: under ZeRO-3 and FSDP each call
        gathers the sharded weights from all processes, so a process that made one call more would wait forever."""
        if self.args.fixed_forward_calls is not None:
            return bool(self.args.fixed_forward_calls)
        if self.accelerator.num_processes < 2:
            return False
        if getattr(self, "is_fsdp_enabled", False):
            return True
        from transformers.integrations import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())

    def _response_logprobs(
        self,
        model,
        seqs: list[tuple],
        one_call: bool = False,
        temps: list[float] | None = None,
        stop_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per-token log-probabilities of the masked (response) tokens of each group of sequences.

        ``temps`` gives each group's temperature (logits divided by it; default 1 for every group). With
        ``stop_ids`` each row is ``[positions, 2]``: the tokens' log-probabilities and the stop decisions' (see
        :meth:`_gathered_logprobs`).

        Sequences are left-aligned to a common end so that only the last positions, where responses lie,
        go through the LM head (``logits_to_keep``). Groups share one forward pass unless padding them to a
        common width would cost more than 15% extra tokens (long task sequences beside short samples).
        """
        pad_id = self.processing_class.pad_token_id
        unpadded = []  # (ids, response mask) per row, padding stripped
        row_temp: list[float] = []
        for g, (ids, mask, attn) in enumerate(seqs):
            for r in range(ids.shape[0]):
                keep = attn[r].bool()
                unpadded.append((ids[r][keep], mask[r][keep]))
                row_temp.append(1.0 if temps is None else float(temps[g]))
        sizes = [s[0].shape[0] for s in seqs]
        lens = [u[0].numel() for u in unpadded]
        together = sum(lens) and len(seqs) > 1
        if together:
            widths, start = [], 0
            for n in sizes:
                widths.append(max(lens[start : start + n]) * n)
                start += n
            together = max(lens) * len(lens) <= 1.15 * sum(widths)
        groups = [list(range(len(unpadded)))] if together or one_call or len(seqs) == 1 else []
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
                logits = model(**kwargs).logits[:, -keep:]
            targets = torch.cat([ids[:, width - keep + 1 :], ids.new_zeros(len(rows), 1)], 1)  # the last: unused
            temp = [row_temp[r] for r in rows]
            logp = self._gathered_logprobs(logits, targets, temp, stop_ids)[:, :-1]
            logp = logp * _per_position(resp[:, width - keep + 1 :], logp)
            for j, r in enumerate(rows):
                out[r] = logp[j]
        return out

    def _loss_logprobs(self, model, inputs: dict, has_task: bool, has_samples: bool) -> list[torch.Tensor]:
        """Per-token log-probabilities of the response tokens, one row per sequence: task rows, then samples.

        Each sampled prompt is encoded once for its ``k`` samples (and for its task row, when the task batch's
        own prompts were sampled): see :meth:`_shared_prefix_logprobs`. Where that does not apply (gradient
        checkpointing, a model without a ``DynamicCache``), every sequence goes through the model whole
        (:meth:`_response_logprobs`). Both give the same numbers, up to floating-point rounding.
        """
        task = (inputs["input_ids"], inputs["response_mask"], inputs["attention_mask"]) if has_task else None
        samples = None
        if has_samples:
            samples = (inputs["sample_input_ids"], inputs["sample_mask"], inputs["sample_attention_mask"])
        t_s = self.sample_temperature
        groups = [g for g in (task, samples) if g is not None]
        temps = [1.0] * (task is not None) + [t_s] * (samples is not None)
        stop = None  # constraints with gradient "stop": each row also carries the stop decisions' log-probabilities
        if has_samples and ("sample_stop_weights" in inputs or "sample_shift_weights" in inputs):
            stop = torch.tensor(self.eos_token_ids, device=self.args.device)
        if self._fixed_forward_calls():  # sharded weights: one forward call, whatever the data
            return self._response_logprobs(model, groups, one_call=True, temps=temps, stop_ids=stop)
        if has_samples and "sample_prompt_ids" in inputs and self._can_share_prefix(model):
            p_ids, p_mask = inputs["sample_prompt_ids"], inputs["sample_prompt_mask"]
            c_ids, c_mask = inputs["sample_completion_ids"], inputs["sample_completion_mask"]
            k = self.args.num_generations
            if c_ids.shape[0] == p_ids.shape[0] * k:  # k samples per prompt, in prompt order
                conts = [(c_ids[i][c_mask[i].bool()], i // k, t_s) for i in range(c_ids.shape[0])]
                task_conts = self._task_continuations(task, p_ids, p_mask) if has_task else []
                shared = self._shared_prefix_logprobs(model, p_ids, p_mask, (task_conts or []) + conts, stop)
                if shared is not None:
                    if task_conts is None:  # task rows with prompts of their own (a separate prompt set)
                        return self._response_logprobs(model, [task], stop_ids=stop) + shared
                    return shared
        return self._response_logprobs(model, groups, temps=temps, stop_ids=stop)

    @property
    def sample_temperature(self) -> float:
        """The temperature of the samples' score-function log-probabilities (see ``score_temperature``)."""
        return float(self.args.temperature) if self.args.score_temperature else 1.0

    @staticmethod
    def _gathered_logprobs(
        logits: torch.Tensor,
        targets: torch.Tensor,
        temps: list[float] | None = None,
        stop_ids: torch.Tensor | None = None,
        chunk: int = 4,
    ) -> torch.Tensor:
        """``log softmax(logits / T)[targets]`` per position, a few rows at a time (as ``token_logprobs``).

        ``temps`` holds each row's temperature T (default 1): a sample's score function is that of the
        distribution it was drawn from, ``softmax(logits / temperature)``.
        With ``stop_ids`` (the end tokens) the result is ``[rows, positions, 5]``: beside each token's log-probability,
        that of the stop-or-go decision it makes, ``log P(stop)`` where the target is an end token and
        ``log (1 - P(stop))`` elsewhere, with ``P(stop)`` the probability of all end tokens together; then the stop
        log-odds ``s = log P(stop) - log (1 - P(stop))`` and, detached, ``1[the target is an end token] - P(stop)``
        (the decision's score with respect to ``s``; both for gradient "shift"), and a 1 that marks a real position
        once the caller has zeroed the padding.
        The rows are taken with ``split`` and the logits are never sliced: the backward of a slice or of an indexed
        chunk fills a zero tensor as large as all the logits, once per slice (about a twentieth of the loss's
        forward and backward on a CPU); ``split`` gives the gradient back with one ``cat``.
        """
        out = []
        inv = None
        if temps is not None and any(t != 1.0 for t in temps):
            inv = (1.0 / torch.tensor(temps, dtype=torch.float32, device=logits.device)).view(-1, 1, 1).split(chunk)
        for n, (lg, t) in enumerate(zip(logits.split(chunk), targets.split(chunk))):
            lg = lg.float() if inv is None else lg.float() * inv[n]
            norm = torch.logsumexp(lg, dim=-1)
            tok = lg.gather(-1, t.unsqueeze(-1)).squeeze(-1) - norm
            if stop_ids is None:
                out.append(tok)
                continue
            log_stop = (torch.logsumexp(lg.index_select(-1, stop_ids), dim=-1) - norm).clamp(max=-1e-6)
            log_go = torch.where(  # log(1 - exp(x)), accurate on both sides of log 1/2
                log_stop > -0.6931, torch.log(-torch.expm1(log_stop)), torch.log1p(-torch.exp(log_stop))
            )
            ends = torch.isin(t, stop_ids)
            score = ends.float() - log_stop.detach().exp()
            one = torch.ones_like(score)  # zeroed with the padding by the caller: marks the real decisions
            out.append(torch.stack([tok, torch.where(ends, log_stop, log_go), log_stop - log_go, score, one], -1))
        return torch.cat(out)

    def _can_share_prefix(self, model) -> bool:
        if getattr(self, "_prefix_sharing_failed", False):
            return False
        inner = self.accelerator.unwrap_model(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        name = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else None
        return not getattr(inner, name or "is_gradient_checkpointing", False)

    @staticmethod
    def _task_continuations(task: tuple, p_ids: torch.Tensor, p_mask: torch.Tensor) -> list[tuple] | None:
        """The task rows' responses as (tokens, prompt row) continuations of the sampled prompts, when task row
        ``j`` is prompt ``j`` followed by its response; ``None`` otherwise (e.g. a separate prompt set)."""
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
            out.append((ids[j][n : n + r], j))
        return out

    def _shared_prefix_logprobs(
        self,
        model,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        conts: list[tuple],
        stop_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | None:
        """Log-probabilities of continuations that share prompts, each prompt encoded once.

        ``conts`` holds (tokens, prompt row) pairs, or (tokens, prompt row, temperature) triples. The left-padded
        prompts go through the model once, with
        ``use_cache``; each continuation then attends to its prompt's keys and values, gathered from that cache
        with their autograd history, so the gradient reaches the prompt positions as in a forward pass over the
        whole sequence, while the prompt tokens are computed once instead of once per sample. Continuations are
        batched by length (longest first; a new batch when padding would pass a fifth of its tokens). Returns one
        row of per-token log-probabilities per continuation (the first token's come from the prompt's last
        position), or ``None`` when the model does not return a ``DynamicCache``.
        """
        dev = self.args.device
        p_ids, p_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        pos = (p_mask.cumsum(1) - 1).clamp(min=0)
        try:
            out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        except TypeError:  # an architecture without logits_to_keep
            out = None
        cache = self._cache_of(out)
        if type(cache) is not DynamicCache:
            self._prefix_sharing_failed = True
            return None
        cache_kwarg = self._cache_kwarg(self.accelerator.unwrap_model(model))
        first_logits = out.logits  # [P, 1, V]: each prompt's last position predicts its continuations' first token
        n_prompt = p_mask.sum(1)
        pad_id = self.processing_class.pad_token_id
        rows: list[torch.Tensor | None] = [None] * len(conts)
        order = sorted(range(len(conts)), key=lambda i: -conts[i][0].numel())
        start = 0
        while start < len(order):
            width = conts[order[start]][0].numel()
            end, tokens = start, 0
            while end < len(order) and width * (end - start + 1) <= 1.2 * (tokens + conts[order[end]][0].numel()):
                tokens += conts[order[end]][0].numel()
                end += 1
            chunk, start = order[start:end], end
            if width == 0:
                for i in chunk:
                    rows[i] = first_logits.new_zeros((1,) if stop_ids is None else (1, 5))
                continue
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=dev)
            c_mask = torch.zeros_like(ids)
            for j, i in enumerate(chunk):
                t = conts[i][0]
                ids[j, : t.numel()] = t
                c_mask[j, : t.numel()] = 1
            owner = torch.tensor([conts[i][1] for i in chunk], device=dev)
            temp = [float(conts[i][2]) if len(conts[i]) > 2 else 1.0 for i in chunk]
            sub = copy.copy(cache)  # the prompts' keys and values, one row per continuation
            sub.layers = [copy.copy(layer) for layer in cache.layers]
            sub.batch_select_indices(owner)
            o = model(
                input_ids=ids,
                attention_mask=torch.cat([p_mask[owner], c_mask], 1),
                position_ids=n_prompt[owner].unsqueeze(1) + torch.arange(width, device=dev),
                use_cache=True,
                logits_to_keep=width,
                **{cache_kwarg: sub},
            )
            targets = torch.cat([ids[:, 1:], ids.new_zeros(len(chunk), 1)], 1)  # the last position: unused
            rest = self._gathered_logprobs(o.logits, targets, temp, stop_ids)[:, :-1]
            first = self._gathered_logprobs(first_logits[owner], ids[:, :1], temp, stop_ids)
            logp = torch.cat([first, rest], 1)
            logp = logp * _per_position(c_mask, logp)
            for j, i in enumerate(chunk):
                rows[i] = logp[j]
        return rows

    def _multipliers(self, c_est: torch.Tensor, mu: float) -> torch.Tensor:
        """lambda_i for this step: the barrier's B'(C_i)/m, or (method minimax) the dual-ascent multipliers."""
        if self.minimax is not None:
            return self.minimax.update_multipliers(c_est)
        return lagrange_multipliers(c_est, mu, self._barrier_s(mu))

    def _barrier_s(self, mu: float) -> float | None:
        """The barrier's relaxation point s at this mu: ``barrier_s`` where set, else ``mu**barrier_s_power``."""
        if self.args.barrier_s is not None:
            return self.args.barrier_s
        return None if self.args.barrier_s_power == 2 else mu**self.args.barrier_s_power  # None: mu * mu, the paper's

    def _sample_weights(self, inputs: dict, seq_logp: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the score-function surrogate: sum_i lambda_i (c_i - b_i), plus (method minimax)
        beta (KL_j - b_j) from the samples' detached log-probabilities ``seq_logp``."""
        weights = inputs["sample_weights"].to(seq_logp.dtype)
        if self.minimax is not None:
            weights = weights + self.minimax.kl_weights(inputs, seq_logp).to(weights.dtype)
        return weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        part = self._loss_part  # clip_each_part: one of the two parts only
        has_samples = "sample_input_ids" in inputs and part != "task"
        if model.training and not self.args.task_loss and not self.constraints:
            raise L3MUserError("training.task_loss is false and there are no constraints: nothing to optimise")
        # without the task loss (task_loss=False) the task batch still gives the eval loss, never the training one
        has_task = "input_ids" in inputs and (self.args.task_loss or not has_samples) and part != "samples"
        rows = self._loss_logprobs(model, inputs, has_task, has_samples)
        n_task = inputs["input_ids"].shape[0] if has_task else 0
        loss = rows[0].new_zeros(())
        if rows and rows[0].dim() == 2:  # rows carry the stop decisions too (gradient "stop" or "shift")
            stop_rows = [r[:, 1:] for r in rows[n_task:]]
            rows = [r[:, 0] for r in rows]
        if has_task:
            n_tok = inputs["response_mask"].sum(1).clamp(min=1).to(loss.dtype)
            per_example = -torch.stack([r.sum() for r in rows[:n_task]]) / n_tok
            task_nll = per_example.mean()
            loss = loss + self._share("task") * task_nll
            self.record_metric("task_nll", float(task_nll.detach()), "task")
        if has_samples:
            seq_logp = torch.stack([r.sum() for r in rows[n_task:]])  # a sequence log-probability: a sum
            surrogate = (self._sample_weights(inputs, seq_logp).to(loss.dtype) * seq_logp).mean()
            if "sample_stop_weights" in inputs:  # sum_i lambda_i (c_i - b_i) log P(the stop decisions), gradient "stop"
                stop_logp = torch.stack([r[:, 0].sum() for r in stop_rows])
                surrogate = surrogate + (inputs["sample_stop_weights"].to(loss.dtype) * stop_logp).mean()
            if "sample_shift_weights" in inputs:  # gradient "shift": dC/d delta, times the mean stop log-odds
                surrogate = surrogate + self._shift_surrogate(inputs, stop_rows).to(loss.dtype)
            loss = loss + self._share("samples") * surrogate
            self.record_metric("sample/mean_logprob", float(seq_logp.detach().mean()), "samples")
            if has_task and model.training and self.args.log_gradient_parts:
                self._log_gradient_parts(model, task_nll, surrogate)
        bad = not bool(torch.isfinite(loss.detach()))
        if model.training and self.accelerator.num_processes > 1:  # every process stops together, before backward
            flag = torch.tensor([float(bad)], device=loss.device)
            if bool(self.accelerator.reduce(flag, reduction="sum") > 0) and not bad:
                raise NonFiniteError(f"the loss is not finite on another process at step {self.state.global_step}")
        if bad:
            raise NonFiniteError(f"the loss is {loss.item()} at step {self.state.global_step}; no optimiser step taken")
        return (loss, None) if return_outputs else loss

    def _shift_surrogate(self, inputs: dict, stop_rows: list[torch.Tensor]) -> torch.Tensor:
        """Gradient "shift": ``g * mean_t u_t s_t``, where ``s_t`` is the stop log-odds at each of the samples'
        decisions (every response token: go, or stop at the end token) and ``g = mean_j w_j sum_t u_t (1[d_jt = stop]
        - P_jt)`` with ``w_j = sum_i lambda_i (c_ij - b_ij)``: the score-function estimate of ``sum_i lambda_i dC_i/d
        delta`` for the change ``s_t += delta u_t`` of every decision. Its gradient moves the decisions' log-odds in
        proportion to ``u_t``; the mean counts only those with ``P(stop) >= shift_min_stop_prob``, where a shift of a
        few nats can change the length. ``shift_direction`` sets ``u_t``: ``logodds``, 1 (a uniform shift, as an
        end-token bias); ``stop_prob``, ``1 / (1 - P_t)`` (at most ``shift_max_weight``) over its mean on the counted
        decisions, which scales every ``P(stop)`` by the same factor (``d log P / d s = 1 - P``)."""
        # the push counts the decisions where stopping is plausible (shift_min_stop_prob)
        floor = (
            math.log(self.args.shift_min_stop_prob / (1 - self.args.shift_min_stop_prob))
            if (self.args.shift_min_stop_prob > 0)
            else -math.inf
        )
        keeps = [(r[:, 3] > 0) & (r[:, 1].detach() >= floor) for r in stop_rows]
        n = sum(int(k.sum()) for k in keeps)
        n_all = sum(int((r[:, 3] > 0).sum()) for r in stop_rows)
        weights = [None] * len(stop_rows)
        if self.args.shift_direction == "stop_prob":  # u_t = 1 / (1 - P_t), capped
            weights = [(1 + r[:, 1].detach().exp()).clamp(max=self.args.shift_max_weight) for r in stop_rows]
        if self.args.shift_passed_end_weight > 0:  # u_t *= 1 + w (1 - S_t), S_t = prod_{tau < t} (1 - P_tau)
            w_end = self.args.shift_passed_end_weight
            passed = [self._passed_end(r) for r in stop_rows]
            weights = [(1 + w_end * p) * (1 if u is None else u) for p, u in zip(passed, weights)]
            self.record_metric(
                "sample/shift_passed_end", sum(float(p[k].sum()) for p, k in zip(passed, keeps)) / max(n, 1)
            )
        if weights[0] is not None:  # mean 1 on the counted decisions
            mean_w = sum(float(w[k].sum()) for w, k in zip(weights, keeps)) / max(n, 1)
            weights = [w / max(mean_w, 1e-12) for w in weights]
            self.record_metric("sample/shift_mean_weight", mean_w, "samples")
        scores, total = [], stop_rows[0].new_zeros(())
        for r, k, w in zip(stop_rows, keeps, weights):
            scores.append(r[:, 2].sum() if w is None else (w * r[:, 2]).sum())  # padding's score is 0
            total = total + (r[k, 1].sum() if w is None else (w[k] * r[k, 1]).sum())
        score = torch.stack(scores).detach()
        g = (inputs["sample_shift_weights"].to(score.dtype) * score).mean()
        mean_logodds = total / max(n, 1)
        self.record_metric("sample/shift_decisions", n / max(n_all, 1), "samples")
        self.record_metric("sample/shift_dC_ddelta", float(g), "samples")
        self.record_metric("sample/mean_stop_logodds", float(mean_logodds.detach()), "samples")
        return g * mean_logodds

    @staticmethod
    def _passed_end(r: torch.Tensor) -> torch.Tensor:
        """``1 - S_t`` per decision of one sample's stop rows: the model's probability (detached) that it would
        have stopped before this decision, ``S_t = prod_{tau < t} (1 - P_tau)`` over the sample's earlier decisions
        (all of them go decisions: a sample stops once)."""
        log_dec = (r[:, 0] * r[:, 3]).detach()  # log P(the decision taken); 0 at padding
        log_survival = torch.cumsum(log_dec, 0) - log_dec  # the sum over the earlier decisions only
        return -torch.expm1(log_survival)

    def _log_gradient_parts(self, model, task_nll: torch.Tensor, surrogate: torch.Tensor) -> None:
        """The diagnostic ``log_gradient_parts``: the task gradient g_T and the constraints' g_C = sum_i lambda_i
        grad C_i, each by its own backward pass (the graph kept for the real one). Both are scaled like the loss,
        so g_T + g_C is the gradient the optimiser gets (before clipping); ``task_share`` = |g_T| / |g_T + g_C|."""
        params = [p for p in model.parameters() if p.requires_grad]
        g_t = torch.autograd.grad(task_nll, params, retain_graph=True, allow_unused=True)
        g_c = torch.autograd.grad(surrogate, params, retain_graph=True, allow_unused=True)
        tt = cc = tc = 0.0
        for a, b in zip(g_t, g_c):
            a = a.float() if a is not None else None
            b = b.float() if b is not None else None
            if a is not None:
                tt += float((a * a).sum())
            if b is not None:
                cc += float((b * b).sum())
            if a is not None and b is not None:
                tc += float((a * b).sum())
        total = max(tt + cc + 2 * tc, 0.0) ** 0.5
        self.record_metric("grad_parts/task_norm", tt**0.5, "task")
        self.record_metric("grad_parts/constraints_norm", cc**0.5, "samples")
        self.record_metric("grad_parts/cosine", tc / max((tt * cc) ** 0.5, 1e-30), "samples")
        self.record_metric("grad_parts/task_share", tt**0.5 / max(total, 1e-30), "samples")

    # ------------------------------------------------------------------------------------------
    # loss_chunks: a micro-batch's loss in chunks of prompts, each back-propagated before the next

    _TASK_KEYS = ("index", "prompt_ids", "prompt_attention_mask", "input_ids", "response_mask", "attention_mask")
    _PROMPT_KEYS = ("sample_prompt_ids", "sample_prompt_mask")
    _SAMPLE_KEYS = (
        "sample_input_ids",
        "sample_attention_mask",
        "sample_mask",
        "sample_weights",
        "sample_stop_weights",
        "sample_shift_weights",
        "sample_completion_ids",
        "sample_completion_mask",
        "sample_ref_logp",
        "sample_group_ids",
    )
    # padded groups: (keys, mask key, side of the padding), trimmed after slicing
    _PADDED = (
        (("input_ids", "response_mask", "attention_mask"), "attention_mask", "right"),
        (("prompt_ids", "prompt_attention_mask"), "prompt_attention_mask", "left"),
        (("sample_prompt_ids", "sample_prompt_mask"), "sample_prompt_mask", "left"),
        (("sample_input_ids", "sample_attention_mask", "sample_mask"), "sample_attention_mask", "right"),
        (("sample_completion_ids", "sample_completion_mask"), "sample_completion_mask", "right"),
    )

    def _share(self, part: str) -> float:
        """This chunk's share of the micro-batch's task rows or samples (1 without ``loss_chunks``)."""
        shares = getattr(self, "_chunk_shares", None)
        return 1.0 if shares is None else shares[part]

    def record_metric(self, key: str, value: float, part: str = "samples") -> None:
        """Log a per-micro-batch mean; under ``loss_chunks`` the chunks' means are combined, weighted by their share
        of the rows (``part``: "task" or "samples"), into the micro-batch's mean."""
        acc = getattr(self, "_chunk_metrics", None)
        if acc is None:
            self._metrics[key].append(value)
        else:
            acc[key] = acc.get(key, 0.0) + self._share(part) * value

    def _loss_chunks(self, inputs: dict) -> list[tuple[dict, dict[str, float]]] | None:
        """The micro-batch cut into ``loss_chunks`` runs of consecutive prompts (each with its ``k`` samples) and of
        task rows, with each chunk's share of the samples and of the task rows; ``None``: one pass."""
        if self.args.loss_chunks < 2 or "sample_input_ids" not in inputs:
            return None
        k = self.args.num_generations
        n_prompts = inputs["sample_input_ids"].shape[0] // k
        n_task = inputs["input_ids"].shape[0] if "input_ids" in inputs else 0
        n = min(self.args.loss_chunks, n_prompts)
        known = set(self._TASK_KEYS) | set(self._PROMPT_KEYS) | set(self._SAMPLE_KEYS)
        unknown = [key for key, v in inputs.items() if torch.is_tensor(v) and key not in known]
        if n < 2 or unknown:
            if unknown and not getattr(self, "_warned_chunks", False):
                self._warned_chunks = True
                logger.warning("loss_chunks: batch fields %s cannot be split; the loss takes one pass", unknown)
            return None
        chunks = []
        for c in range(n):
            p0, p1 = c * n_prompts // n, (c + 1) * n_prompts // n
            t0, t1 = c * n_task // n, (c + 1) * n_task // n
            sub = {key: v for key, v in inputs.items() if not torch.is_tensor(v)}
            for keys, (a, b) in (
                (self._TASK_KEYS, (t0, t1)),
                (self._PROMPT_KEYS, (p0, p1)),
                (self._SAMPLE_KEYS, (p0 * k, p1 * k)),
            ):
                if a == b and keys is self._TASK_KEYS:
                    continue  # no task rows in this chunk
                for key in keys:
                    if key in inputs:
                        sub[key] = inputs[key][a:b]
            for keys, mask_key, side in self._PADDED:
                if mask_key in sub and sub[mask_key].numel():
                    cols = sub[mask_key].bool().any(0).nonzero().flatten()
                    if cols.numel():
                        lo, hi = (int(cols[0]), sub[mask_key].shape[1]) if side == "left" else (0, int(cols[-1]) + 1)
                        for key in keys:
                            if key in sub:
                                sub[key] = sub[key][:, lo:hi]
            if "sample_group_ids" in sub:  # numbered from 0 within the chunk, as the leave-one-out baseline needs
                sub["sample_group_ids"] = torch.unique(sub["sample_group_ids"], return_inverse=True)[1]
            shares = {"samples": (p1 - p0) / n_prompts, "task": (t1 - t0) / n_task if n_task else 0.0}
            chunks.append((sub, shares))
        return chunks

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step``, once per chunk of the micro-batch under ``loss_chunks``: each chunk's loss is
        its share of the micro-batch's (task mean and sample mean weighted by its rows), so the gradients add up
        to the one-pass gradient, while only one chunk's activations are alive at a time. With several processes
        the chunks before the last skip the gradient all-reduce, as accumulation micro-batches do."""
        if self.args.clip_each_part and self.args.task_loss and "sample_input_ids" in inputs:
            return self._clipped_parts_step(model, inputs, num_items_in_batch)
        chunks = self._loss_chunks(inputs)
        if chunks is None:
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        self._chunk_metrics = {}
        try:
            for c, (sub, shares) in enumerate(chunks):
                self._chunk_shares = shares
                last = c == len(chunks) - 1
                sync = last or self.accelerator.num_processes < 2
                with contextlib.nullcontext() if sync else self.accelerator.no_sync(model):
                    loss = super().training_step(model, sub, num_items_in_batch)
                total = loss if total is None else total + loss
            for key, value in self._chunk_metrics.items():
                self._metrics[key].append(value)
        finally:
            self._chunk_shares = self._chunk_metrics = None
        return total

    def _clipped_parts_step(self, model, inputs, num_items_in_batch=None):
        """``clip_each_part``: the task loss and the constraints' surrogate, each with its own forward and backward;
        each gradient is clipped to ``max_grad_norm`` and the two are added (the optimiser then clips the sum as
        usual). The task rows get a forward of their own (their prompts are not shared with the samples'), so the two
        backward passes together cost what one does."""
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.grad for p in params]  # gradients already there (none, with accumulation 1), kept as they are
        parts, total = [], None
        try:
            for part in ("task", "samples"):
                for p in params:
                    p.grad = None
                self._loss_part = part
                loss = super().training_step(model, inputs, num_items_in_batch)
                total = loss if total is None else total + loss
                parts.append([p.grad for p in params])
        finally:
            self._loss_part = None
        g_t, g_c = parts
        norm_t = _global_norm(g_t)
        norm_c = _global_norm(g_c)
        c = float(self.args.max_grad_norm)
        scale_t, scale_c = min(1.0, c / (norm_t + 1e-6)), min(1.0, c / (norm_c + 1e-6))
        for p, old, a, b in zip(params, before, g_t, g_c):
            grad = old
            for g, scale in ((a, scale_t), (b, scale_c)):
                if g is not None:
                    grad = g * scale if grad is None else grad + g * scale
            p.grad = grad
        self._metrics["grad_parts/task_norm"].append(norm_t)
        self._metrics["grad_parts/constraints_norm"].append(norm_c)
        return total

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
            keys = sorted(k for k, vals in self._metrics.items() if vals)
            means = [sum(self._metrics[k]) / len(self._metrics[k]) for k in keys]
            if self.accelerator.num_processes > 1:
                # per-process metrics (task_nll, time) become means over processes; global ones (mu, C_i, lambda_i)
                # are the same on every process and stay as they are
                local = torch.tensor(means, dtype=torch.float64, device=self.args.device)
                means = self.accelerator.reduce(local, reduction="mean").tolist()
            logs.update(zip(keys, means))
            self._metrics.clear()
            if "task_nll" in logs:
                logs["objective"] = logs["task_nll"] + logs.get("barrier", 0.0)
            if self.minimax is not None:
                self.minimax.edit_logs(logs)
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
            **({"weights_averaged": self.tail_average.count} if self.tail_average else {}),
        }

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        staging = getattr(self, "_staging_name", None)
        return os.path.join(run_dir, staging) if staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint to ``tmp-checkpoint-N/checkpoint-N``, then rename it to ``checkpoint-N``.

        transformers writes into ``checkpoint-N`` directly, so a process killed while saving would leave a
        half-written folder that ``get_last_checkpoint`` takes for the latest. Here the folder gets its final name
        only once everything is in it (model, optimiser, scheduler, RNG states of every process, trainer state and
        ``l3m_state.json``); ``tmp-`` folders match neither ``get_last_checkpoint`` nor checkpoint rotation.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_name = STAGING_PREFIX + name
        try:
            super()._save_checkpoint(model, trial)  # writes into staged (rotation there finds one checkpoint: a no-op)
        finally:
            self._staging_name = None
        if self.args.should_save:
            _write_json(os.path.join(staged, STATE_FILE), self._l3m_state_dict())
            if self.tail_average is not None:
                self.tail_average.save(staged)
            best = self.state.best_model_checkpoint
            if best and os.path.abspath(best).startswith(os.path.abspath(staging_root) + os.sep):
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if self.args.should_save:
            if os.path.exists(final):  # an older copy of this step, from a run resumed before it
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # transformers calls this once on resume with every backend (DDP, DeepSpeed, FSDP), unlike
        # _load_from_checkpoint, which DeepSpeed bypasses: the barrier state is restored here
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_l3m_state(checkpoint)

    def _load_l3m_state(self, checkpoint: str) -> None:
        """Restore the barrier state saved with ``checkpoint``; drop the metrics rows logged after it."""
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            for key in self.l3m_state:
                if key in saved:
                    self.l3m_state[key] = saved[key]
            for con in self.constraints:
                for k, v in saved.get("constraints", {}).get(con.name, {}).items():
                    setattr(con.state, k, v)
        elif self.constraints:
            logger.warning("%s has no %s: the barrier state starts afresh", checkpoint, STATE_FILE)
        if self.tail_average is not None:
            self.tail_average.load(checkpoint)
        if not self.is_world_process_zero():
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            step = json.load(f)["global_step"]
        truncate_metrics(os.path.join(self.args.output_dir, METRICS_FILE), step)
        for leftover in os.listdir(self.args.output_dir):
            if leftover.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR):
                logger.warning("removing %s, a checkpoint left half-written by an earlier run", leftover)
                shutil.rmtree(os.path.join(self.args.output_dir, leftover), ignore_errors=True)

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
                "gradient": getattr(c, "gradient", "sequence"),
                "value": c.state.value,
                "lambda": c.state.lam,
                "mean_raw": c.state.mean_raw,
                "holds": bool(c.state.holds) if math.isfinite(c.state.value) else None,
                "warned_infeasible": c.name in self.l3m_state["warned"],
                "infeasible_warning": self.l3m_state.get("infeasible", {}).get(c.name),
            }
            for c in self.constraints
        ]


def _global_norm(grads: list[torch.Tensor | None]) -> float:
    """The 2-norm of a list of gradients taken together (None: a parameter the loss did not reach)."""
    return math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None))


def _per_position(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[rows, positions]`` mask shaped to multiply ``like`` (or its stop channels)."""
    return mask.unsqueeze(-1) if like.dim() == 3 else mask


def _write_json(path: str, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so that a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def truncate_metrics(path: str, step: int) -> int:
    """Drop the rows of a metrics.jsonl logged after ``step`` (a resumed run logs those steps again).

    Returns how many rows were dropped.
    """
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
        if row.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


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
