"""``L3MConfig``: the training arguments of transformers plus those of the L3M method."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class L3MConfig(TrainingArguments):
    """Configuration of :class:`l3m.L3MTrainer`.

    Everything ``transformers.TrainingArguments`` offers (optimiser, schedule, precision, accumulation,
    checkpointing, ``report_to``) applies unchanged; the fields below control sampling and the barrier.
    Defaults marked (ours) are this project's choices where the paper is silent (see method.md).
    """

    # --- sampling from the policy (the constraints are averages over the model's own responses)
    num_generations: int = field(
        default=4, metadata={"help": "Samples per prompt (k >= 2, for the leave-one-out baseline)."}
    )
    prompt_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts sampled per micro-batch and process; default per_device_train_batch_size (the task "
            "rows' own prompts). Any other value draws them from the prompt set (data.prompts) or, without one, "
            "from the training prompts: more prompts than task rows lower the variance of the constraints' estimates."
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest sampled response, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    score_temperature: bool = field(
        default=True,
        metadata={
            "help": "Score-function log-probabilities of the samples at the sampling temperature (logits divided by "
            "`temperature`): those of the distribution the samples were drawn from, whose mean C_i the constraints "
            "bound, so the estimate of grad C_i is unbiased (default). False scores them at temperature 1, which "
            "biases the estimate when temperature != 1 (kept for comparisons with earlier runs). The task loss is "
            "always at temperature 1."
        },
    )
    # --- task data
    max_length: int = field(
        default=512, metadata={"help": "Longest task sequence (prompt + reference response), in tokens."}
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Longest prompt; longer prompts keep their last tokens (a warning counts them)."}
    )
    task_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Include the task (SFT) loss L in the objective. False optimises the constraint terms alone (the "
            "same work as a GRPO step, e.g. for benchmarks); it then needs at least one constraint. None (default): "
            "True for method 'l3m', False for method 'minimax' (the MM baseline starts from an SFT model)."
        },
    )
    # --- the relaxed log-barrier (method.md sections 2-3)
    mu_init: float = field(default=1.0, metadata={"help": "Barrier parameter mu at the first step (ours: 1)."})
    mu_min: float = field(
        default=0.01,
        metadata={"help": "mu at the last step; mu decays exponentially each optimiser step (ours: 0.01)."},
    )
    barrier_s: float | None = field(
        default=None,
        metadata={"help": "Relaxation point s of the barrier, fixed; None (default) uses s = mu**barrier_s_power."},
    )
    barrier_s_power: float = field(
        default=2.0,
        metadata={
            "help": "With barrier_s None, s = mu**p. The paper: p = 2 (the default), so a violated constraint gets "
            "lambda_i = 1/(m mu), up to 50 at mu = 0.01 with m = 2, and the barrier tends to the characteristic "
            "function of {C <= 0}. p = 1 (ours, an option) caps every lambda_i at 1/m: an exact penalty of weight 1 "
            "on a violation rather than an infinite wall, with gentler swings near an active bound (README)."
        },
    )
    constraint_ema: float = field(
        default=0.0,
        metadata={"help": "EMA factor for the estimates C_i across steps (0 = this step's samples only; ours: 0)."},
    )
    average_tail: float = field(
        default=0.0,
        metadata={
            "help": "Save the mean of the weights over the last fraction of optimiser steps (tail averaging, as "
            "Polyak-Ruppert or SWA) instead of the last iterate; 0 = off (ours: off). Near an active constraint the "
            "sampled estimates make the iterates oscillate around its boundary; their mean sits near the middle."
        },
    )
    baseline: str = field(
        default="leave_one_out",
        metadata={"help": "Score-function baseline: 'leave_one_out' (ours, default) or 'none'."},
    )
    infeasible_patience: int = field(
        default=0,
        metadata={
            "help": "Warn once when a constraint stays violated this many consecutive steps (0 = a quarter "
            "of the run, at least 10)."
        },
    )
    # --- the minimax (MM) baseline (method.md section 6): min_theta max_{lambda >= 0} beta KL(pi || pi_ref) + lambda.C
    fixed_forward_calls: bool | None = field(
        default=None,
        metadata={
            "help": "One forward call per micro-batch for the loss, with no prompt-prefix sharing, so every process "
            "makes the same calls. Needed where weights are sharded (ZeRO-3, FSDP): each forward call gathers them "
            "on all processes together. None (default) = on exactly when weights are sharded over several processes."
        },
    )
    loss_chunks: int = field(
        default=1,
        metadata={
            "help": "Split each micro-batch's loss into this many chunks of prompts (each with its samples and task "
            "rows), each back-propagated before the next goes through the model: peak activation memory falls about "
            "this many times, with the same gradient (up to float rounding) and the same sampling, which still runs "
            "on the whole micro-batch at once (unlike gradient_accumulation_steps, which also splits the sampling). "
            "Costs a little speed: smaller forward passes. 1 (default) = one pass. Not with DeepSpeed or FSDP."
        },
    )
    shift_min_stop_prob: float = field(
        default=1e-4,
        metadata={
            "help": "Constraints with 'gradient: shift' (ours): the uniform push on the stop log-odds counts only the "
            "decisions where the model's P(stop) is at least this (detached); dC/d(shift) is still estimated over all "
            "of them. Why: a shift of a few nats changes the length only where stopping is plausible, and pushing "
            "log-odds that are already near -50 (most positions inside a sentence) moves the weights for nothing: "
            "with 0 (every decision) the length experiment's task loss rose to 1-3.5 nats (README). Default 1e-4."
        },
    )
    shift_direction: str = field(
        default="logodds",
        metadata={
            "help": "Constraints with 'gradient: shift' (ours): which uniform change of the stop decisions the push "
            "makes. 'logodds' (default): every decision's stop log-odds moves alike, as an end-token bias. "
            "'stop_prob': every decision's P(stop) is scaled alike (its log-odds moved in proportion to "
            "1 / (1 - P(stop)), at most shift_max_weight, normalised to a mean of 1). Why: a length bound above the "
            "model's own length is cheapest for the task loss when the model stops after each answer with the same "
            "probability whatever the prompt; a uniform log-odds shift keeps confident ends confident and drives "
            "less confident ones near 0, and -log P(stop) is convex, so that unevenness costs (README)."
        },
    )
    shift_max_weight: float = field(
        default=100.0,
        metadata={
            "help": "With shift_direction 'stop_prob': the largest weight 1 / (1 - P(stop)) a decision gets (100: "
            "decisions with P(stop) above 0.99 are moved as one at 0.99), which bounds the estimator's variance."
        },
    )
    shift_passed_end_weight: float = field(
        default=0.0,
        metadata={
            "help": "Constraints with 'gradient: shift' (ours): a decision's push is also multiplied by "
            "1 + shift_passed_end_weight * (1 - S_t), with S_t the probability, under the model, that the sample had "
            "not stopped before it (the product of 1 - P(stop) over its earlier decisions), then normalised to a mean "
            "of 1 as before. Why: a length bound above the model's own length is cheapest when the model stops at "
            "each answer's end with some probability and, once past it, does not stop again (README, length_bound); "
            "a uniform push lowers P(stop) at the end as much as after it. 0 (default): off."
        },
    )
    log_gradient_parts: bool = field(
        default=False,
        metadata={
            "help": "Diagnostic: each step, also log the norm of the task loss's gradient (grad_parts/task_norm), of "
            "the constraints' surrogate gradient sum_i lambda_i grad C_i (grad_parts/constraints_norm), their cosine, "
            "and the task's share of the whole gradient's norm (grad_parts/task_share), before clipping. Shows when "
            "the constraints' noisy score-function gradient takes most of each (clipped, Adam-normalised) update and "
            "the task loss moves slowly. Costs two extra backward passes per micro-batch; norms are per process and "
            "micro-batch. Not with loss_chunks, DeepSpeed or FSDP; under clip_each_part only the two norms are "
            "logged, from that option's own passes."
        },
    )
    clip_each_part: bool = field(
        default=False,
        metadata={
            "help": "(ours) Clip the task loss's gradient and the constraints' surrogate gradient each to "
            "max_grad_norm before adding them; the sum is then clipped to max_grad_norm as usual. Why: in a step "
            "whose estimate is infeasible the constraints' gradient can be 10-100 times the task's, and one clip of "
            "the sum hands that step's whole update to the constraints (README, 'the task's share'); clipped apart, "
            "the task keeps at least about half of every update. Costs a second forward of the task rows' prompts. "
            "Logs grad_parts/task_norm and grad_parts/constraints_norm (before clipping). Needs "
            "gradient_accumulation_steps 1 and loss_chunks 1; not with fp16, DeepSpeed or FSDP. False (default): the "
            "method's one gradient."
        },
    )
    method: str = field(
        default="l3m",
        metadata={
            "help": "'l3m': the relaxed log-barrier (lambda_i = B'(C_i)/m). 'minimax': the saddle-point baseline: "
            "a KL penalty to a reference (SFT) model and multipliers by projected gradient ascent."
        },
    )
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "minimax: the reference (SFT) model, a name or path; None uses a frozen copy of the initial "
            "model (with LoRA: the model with its adapters disabled)."
        },
    )
    beta: float = field(
        default=0.05, metadata={"help": "minimax: weight beta of KL(pi || pi_ref) (a heuristic knob; ours: 0.05)."}
    )
    multiplier_lr: float = field(
        default=0.1,
        metadata={"help": "minimax: step size eta of the ascent lambda_i <- max(0, lambda_i + eta * C_i) (ours: 0.1)."},
    )
    multiplier_init: float = field(default=1.0, metadata={"help": "minimax: lambda_i at the first step (ours: 1)."})
    multiplier_update: str = field(
        default="projected",
        metadata={
            "help": "minimax: 'projected' (lambda <- max(0, lambda + eta C)) or 'log' (ascent on log lambda: "
            "lambda <- lambda * exp(eta C), always > 0)."
        },
    )
    # --- housekeeping (TrainingArguments defaults that do not suit this trainer)
    logging_steps: float = field(default=1, metadata={"help": "Log every this many optimiser steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer needs its own columns (prompt ids, masks)."}
    )
    report_to: str | list[str] | None = field(
        default="none", metadata={"help": "Integrations to report to (e.g. 'tensorboard', 'wandb'); 'none' by default."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "When to save checkpoints."})
    save_steps: float = field(default=50, metadata={"help": "Save a checkpoint every this many optimiser steps."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2 and self.baseline == "leave_one_out":
            raise ValueError("num_generations must be >= 2 for the leave-one-out baseline")
        if self.baseline not in ("leave_one_out", "none"):
            raise ValueError(f"baseline must be 'leave_one_out' or 'none', got {self.baseline!r}")
        if not 0 <= self.constraint_ema < 1:
            raise ValueError(f"constraint_ema must be in [0, 1), got {self.constraint_ema}")
        if not 0 <= self.average_tail <= 1:
            raise ValueError(f"average_tail must be in [0, 1] (a fraction of the steps), got {self.average_tail}")
        if not self.barrier_s_power > 0:
            raise ValueError(f"barrier_s_power must be > 0, got {self.barrier_s_power}")
        if not (0 < self.mu_min <= self.mu_init):
            raise ValueError(f"need 0 < mu_min <= mu_init, got mu_min={self.mu_min}, mu_init={self.mu_init}")
        if self.prompt_batch_size is not None and self.prompt_batch_size < 1:
            raise ValueError(f"prompt_batch_size must be >= 1 (or unset), got {self.prompt_batch_size}")
        if not isinstance(self.loss_chunks, int) or isinstance(self.loss_chunks, bool) or self.loss_chunks < 1:
            raise ValueError(f"loss_chunks must be an integer >= 1, got {self.loss_chunks!r}")
        if not 0 <= self.shift_min_stop_prob < 1:
            raise ValueError(f"shift_min_stop_prob must be in [0, 1), got {self.shift_min_stop_prob}")
        if self.shift_direction not in ("logodds", "stop_prob"):
            raise ValueError(f"shift_direction must be 'logodds' or 'stop_prob', got {self.shift_direction!r}")
        if not self.shift_max_weight >= 1:
            raise ValueError(f"shift_max_weight must be >= 1, got {self.shift_max_weight}")
        if not self.shift_passed_end_weight >= 0:
            raise ValueError(f"shift_passed_end_weight must be >= 0, got {self.shift_passed_end_weight}")
        if self.log_gradient_parts and self.loss_chunks > 1:
            raise ValueError("log_gradient_parts needs the one-pass loss: set loss_chunks to 1")
        if self.clip_each_part and (self.gradient_accumulation_steps != 1 or self.loss_chunks != 1 or self.fp16):
            raise ValueError("clip_each_part needs gradient_accumulation_steps 1, loss_chunks 1 and no fp16")
        if self.clip_each_part and not (self.max_grad_norm and self.max_grad_norm > 0):
            raise ValueError(f"clip_each_part needs max_grad_norm > 0, got {self.max_grad_norm}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.method not in ("l3m", "minimax"):
            raise ValueError(f"method must be 'l3m' or 'minimax', got {self.method!r}")
        if self.task_loss is None:
            self.task_loss = self.method == "l3m"
        if self.beta < 0 or self.multiplier_lr < 0 or self.multiplier_init < 0:
            raise ValueError("beta, multiplier_lr and multiplier_init must be >= 0")
        if self.multiplier_update not in ("projected", "log"):
            raise ValueError(f"multiplier_update must be 'projected' or 'log', got {self.multiplier_update!r}")
        if self.multiplier_update == "log" and self.multiplier_init <= 0:
            raise ValueError("multiplier_update 'log' needs multiplier_init > 0")
