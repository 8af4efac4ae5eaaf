"""``L3MConfig``: the training arguments of transformers plus those of the L3M method."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from l3m.sampling import check_sampler, check_sampling_settings


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
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature; the samples are scored under softmax(logits / temperature)."},
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "Must stay 1.0: truncated sampling would draw from a distribution other than the one the samples "
            "are scored under, softmax(logits / temperature), and bias grad C_i."
        },
    )
    top_k: int = field(default=0, metadata={"help": "Must stay 0, for the same reason as top_p."})
    sampler: str = field(
        default="hf",
        metadata={
            "help": "What draws the samples, all from the same softmax(logits / temperature): 'hf' (transformers' "
            "generate, dynamic KV cache, each prompt encoded once), 'static' (static KV cache, shapes bucketed; the "
            "decode step compiled on a GPU) or 'paged' (transformers' continuous batching, paged attention)."
        },
    )
    # --- task data
    max_length: int = field(
        default=512, metadata={"help": "Longest task sequence (prompt + reference response), in tokens."}
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Longest prompt; longer prompts keep their last tokens (a warning counts them)."}
    )
    # --- the relaxed log-barrier (method.md sections 2-3)
    mu_init: float = field(default=1.0, metadata={"help": "Barrier parameter mu at the first step (ours: 1)."})
    mu_min: float = field(
        default=0.01,
        metadata={"help": "mu at the last step; mu decays exponentially each optimiser step (ours: 0.01)."},
    )
    constraint_ema: float = field(
        default=0.0,
        metadata={"help": "EMA factor for the estimates C_i across steps (0 = this step's samples only; ours: 0)."},
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
    # --- held-out checks during training (with eval_strategy "steps" or "epoch" and held-out data)
    eval_prompts: int | None = field(
        default=64,
        metadata={
            "help": "Held-out prompts sampled at each evaluation to check the constraints (None: all of them). Each "
            "evaluation logs eval/constraints/<name>/{value,ci_low,ci_high,mean_raw,holds} beside eval_loss."
        },
    )
    eval_num_generations: int = field(default=2, metadata={"help": "Samples per held-out prompt at each evaluation."})
    select_checkpoint: str = field(
        default="last",
        metadata={
            "help": "Which weights the run ends with: 'last' (the last step's) or 'best_feasible' (ours): of the "
            "evaluated checkpoints whose held-out verdicts all hold, the one with the lowest eval_loss; where none "
            "holds, the one with the least violation, named in the log and the model card. Needs evaluation at "
            "every save (eval_strategy = save_strategy, equal steps)."
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
        check_sampling_settings(self.top_p, self.top_k)
        check_sampler(self.sampler)
        if self.num_generations < 2 and self.baseline == "leave_one_out":
            raise ValueError("num_generations must be >= 2 for the leave-one-out baseline")
        if self.baseline not in ("leave_one_out", "none"):
            raise ValueError(f"baseline must be 'leave_one_out' or 'none', got {self.baseline!r}")
        if not 0 <= self.constraint_ema < 1:
            raise ValueError(f"constraint_ema must be in [0, 1), got {self.constraint_ema}")
        if not (0 < self.mu_min <= self.mu_init):
            raise ValueError(f"need 0 < mu_min <= mu_init, got mu_min={self.mu_min}, mu_init={self.mu_init}")
        if self.prompt_batch_size is not None and self.prompt_batch_size < 1:
            raise ValueError(f"prompt_batch_size must be >= 1 (or unset), got {self.prompt_batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.eval_prompts is not None and self.eval_prompts < 1:
            raise ValueError(f"eval_prompts must be >= 1 (or null for all), got {self.eval_prompts}")
        if self.eval_num_generations < 2:
            raise ValueError(f"eval_num_generations must be >= 2, got {self.eval_num_generations}")
        if self.select_checkpoint not in ("last", "best_feasible"):
            raise ValueError(f"select_checkpoint must be 'last' or 'best_feasible', got {self.select_checkpoint!r}")
        value = lambda strategy: getattr(strategy, "value", strategy)  # noqa: E731
        if self.select_checkpoint == "best_feasible" and value(self.eval_strategy) != value(self.save_strategy):
            raise ValueError(
                "select_checkpoint 'best_feasible' chooses among evaluated checkpoints: set eval_strategy to the "
                f"save_strategy ({self.save_strategy}) and eval_steps to save_steps"
            )
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on a CPU it only warns
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
