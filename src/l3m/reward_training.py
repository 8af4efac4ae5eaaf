"""Bradley-Terry reward-model training: ``l3m train-reward CONFIG``.

A reward model is an ``AutoModelForSequenceClassification`` with one output, trained on preference
pairs with the Bradley-Terry loss ``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))``. The text it scores
is built by :func:`l3m.rewards.format_for_reward`, the function :class:`l3m.rewards.RewardModel` uses at
scoring time, so a saved reward model plugs straight into ``{kind: reward, model: PATH, at_least: b}``.
The held-out pairwise accuracy is measured through ``RewardModel`` on the saved model, i.e. exactly as
the constraint will score responses.

    model: default                  # the backbone: "default" (SmolLM2-135M-Instruct), a hub name or a directory
    backbone_layers: null           # keep only the first N decoder layers (a smaller backbone)
    data:
      train: [a.json, b.jsonl.gz]   # one source or a list (see l3m.preference_data for the formats)
      eval: null                    # optional held-out pairs; else `heldout_fraction` of train, split by prompt
      heldout_fraction: 0.1
      heldout_seed: 0               # the split's seed (independent of training.seed)
      max_train_pairs: null         # optional seeded subsample
      max_eval_pairs: null
      format: null                  # force one of trl, hh, pandalm, autoj, pku (default: per record)
    peft: null                      # LoRA: {r: 16, lora_alpha: 32, ...}; merged into the saved model
    training: {output_dir: runs/rm, num_train_epochs: 1, ...}   # any RewardConfig / TrainingArguments field
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer, TrainingArguments

from l3m.errors import L3MUserError, did_you_mean
from l3m.preference_data import (
    FORMATS,
    PreferenceData,
    PreferencePair,
    load_preference_sources,
    split_pairs,
    subsample,
)
from l3m.rewards import format_for_reward

logger = logging.getLogger(__name__)

EVAL_FILE = "reward_eval.json"
TOP_KEYS = {"model", "backbone_layers", "data", "peft", "training", "trust_remote_code", "dtype"}
DATA_KEYS = {"train", "eval", "heldout_fraction", "heldout_seed", "max_train_pairs", "max_eval_pairs", "format"}
PEFT_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save", "use_rslora"}
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    None: torch.float32,
    "auto": "auto",
}


@dataclass
class RewardConfig(TrainingArguments):
    """Configuration of :class:`RewardTrainer`: ``TrainingArguments`` plus the fields below."""

    max_length: int = field(
        default=512,
        metadata={"help": "Longest formatted (prompt, response) text in tokens; see long_pairs for longer ones."},
    )
    long_pairs: str = field(
        default="truncate",
        metadata={
            "help": "What to do with a pair whose text is longer than max_length: 'truncate' keeps each text's last "
            "max_length tokens (the responses), as RewardModel scores texts; 'drop' drops the pair (counted)."
        },
    )
    center_rewards_coefficient: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the penalty mean((r_chosen + r_rejected)^2), which keeps rewards near zero "
            "(0 = off). Reward thresholds in constraints are easier to state for centred rewards."
        },
    )
    head_only: bool = field(
        default=False,
        metadata={
            "help": "Freeze the backbone and fit only the score head, as a Bradley-Terry logistic regression on the "
            "backbone's features with an L2 penalty chosen by 5-fold cross-validation (l3m.reward_head): one "
            "forward pass per text instead of epochs of fine-tuning. Texts longer than max_length keep their end."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimiser steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer needs its own columns (chosen/rejected ids)."}
    )
    report_to: str | list[str] | None = field(
        default="none", metadata={"help": "Integrations to report to (e.g. 'tensorboard'); 'none' by default."}
    )
    save_strategy: str = field(default="no", metadata={"help": "When to save checkpoints ('no': only the end)."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if self.long_pairs not in ("truncate", "drop"):
            raise ValueError(f"long_pairs must be 'truncate' or 'drop', got {self.long_pairs!r}")
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


# ----------------------------------------------------------------------------------------------
# tokenising pairs


def reward_text(tokenizer, pair: PreferencePair, which: str) -> str:
    """The exact text the reward model scores for ``pair.chosen`` or ``pair.rejected``."""
    return format_for_reward(tokenizer, pair.prompt_text, getattr(pair, which))


def tokenize_pairs(
    tokenizer, pairs: Sequence[PreferencePair], max_length: int, long_pairs: str = "drop"
) -> tuple[list[dict], int]:
    """Features ``{chosen_input_ids, rejected_input_ids}`` and the number of pairs dropped.

    Tokenised as ``RewardModel`` does (no special tokens added: the chat template already has them). A text
    longer than ``max_length`` drops its pair (``long_pairs="drop"``) or keeps its last ``max_length`` tokens
    (``"truncate"``, what ``RewardModel`` does when it scores); a pair whose two kept ends are equal is dropped.
    """
    feats, dropped = [], 0
    for i, pair in enumerate(pairs):
        ids = {}
        for which in ("chosen", "rejected"):
            ids[which] = tokenizer(reward_text(tokenizer, pair, which), add_special_tokens=False)["input_ids"]
        if max(len(ids["chosen"]), len(ids["rejected"])) > max_length:
            if long_pairs == "drop":
                dropped += 1
                continue
            ids = {k: v[-max_length:] for k, v in ids.items()}
            if ids["chosen"] == ids["rejected"]:  # the pair differs only before the kept ends
                dropped += 1
                continue
        feats.append({"chosen_input_ids": ids["chosen"], "rejected_input_ids": ids["rejected"], "index": i})
    return feats, dropped


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PairCollator:
    """Right-pads the chosen texts, then the rejected ones, into one ``[2B, T]`` batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s)
            attn[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": attn}


# ----------------------------------------------------------------------------------------------
# the trainer


def load_reward_backbone(
    name_or_path: str, dtype: str | None = None, trust_remote_code: bool = False, num_layers: int | None = None
):
    """A sequence-classification model with one output on top of any causal LM (its head starts random).

    ``num_layers`` keeps only the first decoder layers (a smaller, faster backbone; the model saved is that
    smaller model). Why: a frozen small LM's middle layers separate preferences better than its last one.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from l3m.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    level = hf_logging.get_verbosity()
    if num_layers:  # the dropped layers' weights would be listed one by one as "unexpected": expected here
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name_or_path),
            num_labels=1,
            dtype=DTYPES[dtype],
            **({"num_hidden_layers": int(num_layers)} if num_layers else {}),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    finally:
        hf_logging.set_verbosity(level)
    if num_layers:
        logger.info("reward backbone: the first %d decoder layers of %s (a new score head)", num_layers, name_or_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def pairwise_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: logits hold ``[r_chosen, r_rejected]`` per pair."""
    logits = torch.as_tensor(eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0])
    diff = logits[:, 0] - logits[:, 1]
    return {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}


class RewardTrainer(Trainer):
    """Trains a one-output sequence-classification model on preference pairs with the Bradley-Terry loss.

    Args:
        model: a ``PreTrainedModel`` with ``num_labels == 1``, or a name/path of any causal LM or reward model.
        args: a :class:`RewardConfig`.
        train_dataset / eval_dataset: :class:`~l3m.preference_data.PreferencePair` lists, or anything
            :func:`~l3m.preference_data.load_preference_sources` reads (paths, lists of dicts, data sets).
        peft_config: an optional ``peft`` config; LoRA adapters are merged into the model when saved.
    """

    def __init__(
        self,
        model: PreTrainedModel | str = "default",
        args: RewardConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class=None,
        peft_config=None,
        compute_metrics=None,
        **kwargs,
    ):
        args = args or RewardConfig(output_dir="l3m-reward")
        if isinstance(model, str):
            model, tok = load_reward_backbone(model)
            processing_class = processing_class or tok
        if processing_class is None:
            from l3m.models import load_tokenizer

            processing_class = load_tokenizer(model.config._name_or_path)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if model.config.num_labels != 1:
            raise L3MUserError(
                f"a reward model needs one output (num_labels=1); this one has {model.config.num_labels}"
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = processing_class.pad_token_id
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.dropped_long: dict[str, int] = {}
        train_ds = self._as_dataset(train_dataset, processing_class, args, "train")
        eval_ds = self._as_dataset(eval_dataset, processing_class, args, "eval")
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=processing_class,
            data_collator=PairCollator(processing_class.pad_token_id),
            compute_metrics=compute_metrics or pairwise_metrics,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def _as_dataset(self, data: Any, tok, args: RewardConfig, what: str) -> PairDataset | None:
        if data is None:
            return None
        if isinstance(data, PairDataset):
            return data
        pairs = data if isinstance(data, list) and data and isinstance(data[0], PreferencePair) else None
        if pairs is None:
            pairs = load_preference_sources(data).pairs
        if not pairs:
            raise L3MUserError(f"the {what} preference data holds no usable pairs (all ties?)")
        max_length = args.max_length
        feats, dropped = tokenize_pairs(tok, pairs, max_length, args.long_pairs)
        self.dropped_long[what] = dropped
        if dropped:
            how = "longer than" if args.long_pairs == "drop" else "that differ only before the last"
            logger.warning(
                "%s data: dropped %d of %d pairs %s max_length=%d tokens", what, dropped, len(pairs), how, max_length
            )
        if not feats:
            raise L3MUserError(f"every {what} pair is longer than max_length={max_length} tokens; raise max_length")
        return PairDataset(feats)

    def _rewards(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        r = out.logits[:, 0].float()
        n = r.shape[0] // 2
        return r[:n], r[n:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r_c, r_r = self._rewards(model, inputs)
        loss = -F.logsigmoid(r_c - r_r).mean()  # Bradley-Terry
        if self.args.center_rewards_coefficient:
            loss = loss + self.args.center_rewards_coefficient * ((r_c + r_r) ** 2).mean()
        if model.training:
            with torch.no_grad():
                self._metrics["accuracy"].append(float((r_c > r_r).float().mean()))
                self._metrics["margin"].append(float((r_c - r_r).mean()))
                self._metrics["rewards/chosen"].append(float(r_c.mean()))
                self._metrics["rewards/rejected"].append(float(r_r.mean()))
        if return_outputs:
            return loss, {"rewards_chosen": r_c, "rewards_rejected": r_r}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            r_c, r_r = self._rewards(model, inputs)
            loss = -F.logsigmoid(r_c - r_r).mean()
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = torch.stack([r_c, r_r], dim=1)
        return loss.detach(), logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            for key, vals in self._metrics.items():
                if vals:
                    logs[key] = sum(vals) / len(vals)
            self._metrics.clear()
        super().log(logs, start_time)

    def save_reward_model(self, output_dir: str | None = None) -> str:
        """A standalone reward model in safetensors with its tokenizer (LoRA adapters merged in)."""
        out = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        if self.is_world_process_zero():
            os.makedirs(out, exist_ok=True)
            model.save_pretrained(out, safe_serialization=True)
            self.processing_class.save_pretrained(out)
        return out


# ----------------------------------------------------------------------------------------------
# held-out accuracy, through the scoring path


def evaluate_reward_model(
    reward_model: Any,
    pairs: Sequence[PreferencePair],
    batch_size: int = 16,
    device: str | torch.device | None = None,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Pairwise accuracy of a reward model (a path or a :class:`l3m.rewards.RewardModel`) on ``pairs``.

    The texts are scored exactly as a reward constraint scores them (``RewardModel.__call__``). A pair
    counts as correct when ``r(chosen) > r(rejected)``; the 95% interval is a bootstrap over pairs.
    """
    from l3m.quality import bootstrap_ci
    from l3m.rewards import RewardModel

    rm = reward_model if isinstance(reward_model, RewardModel) else RewardModel(str(reward_model), device, batch_size)
    prompts = [p.prompt_text for p in pairs]
    r_c = torch.tensor(rm(prompts, [p.chosen for p in pairs]), dtype=torch.float64)
    r_r = torch.tensor(rm(prompts, [p.rejected for p in pairs]), dtype=torch.float64)
    correct = (r_c > r_r).double()
    lo, hi = bootstrap_ci(correct, n_boot)
    return {
        "n_pairs": len(pairs),
        "accuracy": float(correct.mean()) if len(pairs) else math.nan,
        "ci95": [lo, hi],
        "mean_margin": float((r_c - r_r).mean()) if len(pairs) else math.nan,
        "reward_chosen_mean": float(r_c.mean()) if len(pairs) else math.nan,
        "reward_rejected_mean": float(r_r.mean()) if len(pairs) else math.nan,
        "reward_std": float(torch.cat([r_c, r_r]).std()) if len(pairs) > 1 else math.nan,
    }


# ----------------------------------------------------------------------------------------------
# the YAML config of `l3m train-reward`


def _check_keys(section: dict, known: set[str], where: str) -> None:
    for key in section:
        if key not in known:
            raise L3MUserError(
                f"{where}: unknown key '{key}'{did_you_mean(key, known)}; known keys: {', '.join(sorted(known))}"
            )


def _source_ok(value: Any, where: str, base_dir: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise L3MUserError(f"{where}: the list of preference files is empty")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise L3MUserError(f"{where}: expected a file path or 'hf:NAME[:SPLIT]', got {v!r}")
        if v.startswith("hf:") or Path(v).is_file():
            out.append(v)
        elif (Path(base_dir) / v).is_file():
            out.append(str(Path(base_dir) / v))
        else:
            raise L3MUserError(f"{where}: preference file '{v}' does not exist")
    return out


def reward_config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RewardConfig) if f.init}


def load_reward_config(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """Read and validate a ``train-reward`` config (before any model is loaded); data paths are resolved."""
    import yaml

    from l3m.runconfig import apply_overrides, fix_numbers

    cfg: dict = {}
    where = str(path or "config")
    base = "."
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise L3MUserError(f"config file '{path}' does not exist")
        try:
            cfg = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise L3MUserError(f"{f'{path}:{mark.line + 1}' if mark else path}: invalid YAML") from None
        if not isinstance(cfg, dict):
            raise L3MUserError(f"{path}: the config must be a mapping of sections (model, data, peft, training)")
        base = str(p.parent)
    cfg = fix_numbers(apply_overrides(cfg, overrides or []))
    _check_keys(cfg, TOP_KEYS, where)
    data = cfg.get("data")
    if not isinstance(data, dict) or "train" not in data:
        raise L3MUserError(f"{where}: data.train is missing: name a preference file (or a list of them)")
    _check_keys(data, DATA_KEYS, f"{where}: data")
    data["train"] = _source_ok(data["train"], f"{where}: data.train", base)
    if data.get("eval") is not None:
        data["eval"] = _source_ok(data["eval"], f"{where}: data.eval", base)
    frac = data.get("heldout_fraction", 0.1)
    if not isinstance(frac, int | float) or not 0 <= frac < 1:
        raise L3MUserError(f"{where}: data.heldout_fraction must be a number in [0, 1), got {frac!r}")
    if not isinstance(data.get("heldout_seed", 0), int) or isinstance(data.get("heldout_seed", 0), bool):
        raise L3MUserError(f"{where}: data.heldout_seed must be an integer, got {data['heldout_seed']!r}")
    for key in ("max_train_pairs", "max_eval_pairs"):
        v = data.get(key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise L3MUserError(f"{where}: data.{key} must be a positive integer, got {v!r}")
    if data.get("format") is not None and data["format"] not in FORMATS:
        raise L3MUserError(f"{where}: data.format must be one of {', '.join(FORMATS)}, got {data['format']!r}")
    training = cfg.get("training") or {}
    if not isinstance(training, dict):
        raise L3MUserError(f"{where}: 'training' must be a mapping of RewardConfig fields")
    _check_keys(training, reward_config_fields(), f"{where}: training")
    if cfg.get("peft") is not None:
        if not isinstance(cfg["peft"], dict):
            raise L3MUserError(f"{where}: 'peft' must be a mapping of LoRA settings (r, lora_alpha, ...)")
        _check_keys(cfg["peft"], PEFT_KEYS, f"{where}: peft")
    if cfg.get("dtype") not in DTYPES:
        raise L3MUserError(f"{where}: dtype must be one of bf16, fp16, fp32, auto, got {cfg.get('dtype')!r}")
    n = cfg.get("backbone_layers")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise L3MUserError(f"{where}: backbone_layers must be a positive integer (decoder layers kept), got {n!r}")
    if "model" in cfg and not isinstance(cfg["model"], str):
        raise L3MUserError(f"{where}: 'model' must be a hub name, a local directory, or 'default'")
    return cfg


def prepare_pairs(data: dict, seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """(train, held-out) pairs and a description of where they came from, from a config's ``data`` section."""
    fmt = data.get("format")
    train_data: PreferenceData = load_preference_sources(data["train"], fmt)
    info: dict[str, Any] = {"train_sources": data["train"], "train_read": train_data.describe()}
    if data.get("eval") is not None:
        eval_data = load_preference_sources(data["eval"], fmt)
        train, held = train_data.pairs, eval_data.pairs
        info["eval_sources"] = data["eval"]
        info["eval_read"] = eval_data.describe()
    else:
        frac, split_seed = float(data.get("heldout_fraction", 0.1)), int(data.get("heldout_seed", 0))
        train, held = split_pairs(train_data.pairs, frac, seed=split_seed)  # stays put when training.seed changes
        info["heldout"] = f"{frac:g} of the train pairs, split by prompt (seed {split_seed})"
    train = subsample(train, data.get("max_train_pairs"), seed)
    held = subsample(held, data.get("max_eval_pairs"), seed)
    if not train:
        raise L3MUserError("no training pairs are left (all ties, or the held-out split took them all)")
    return train, held, info


def run_train_reward(config_path: str | None, overrides: list[str], quiet: bool = False) -> dict:
    """Train a reward model from a YAML config; returns the summary also written to ``reward_eval.json``."""
    from l3m.models import check_model_exists

    cfg = load_reward_config(config_path, overrides)
    model_name = cfg.get("model", "default")
    check_model_exists(model_name)
    training = dict(cfg.get("training") or {})
    training.setdefault("output_dir", "runs/reward")
    try:
        args = RewardConfig(**training)
    except (ValueError, TypeError) as exc:
        raise L3MUserError(f"training: {exc}") from None
    train, held, info = prepare_pairs(cfg["data"], seed=args.seed)
    model, tok = load_reward_backbone(
        model_name, cfg.get("dtype"), bool(cfg.get("trust_remote_code", False)), cfg.get("backbone_layers")
    )
    if args.head_only:
        if cfg.get("peft"):
            raise L3MUserError("training.head_only fits the score head alone; remove the 'peft' section")
        summary = _train_head_only(model, tok, train, args, model_name, info)
        out = summary["output_dir"]
    else:
        peft_config = None
        if cfg.get("peft"):
            from peft import LoraConfig

            peft_config = LoraConfig(task_type="SEQ_CLS", **cfg["peft"])
        trainer = RewardTrainer(model, args=args, train_dataset=train, processing_class=tok, peft_config=peft_config)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        out = trainer.save_reward_model(args.output_dir)
        summary: dict[str, Any] = {
            "output_dir": out,
            "backbone": model_name,
            "peft": cfg.get("peft"),
            "steps": trainer.state.global_step,
            "train_pairs": len(trainer.train_dataset),
            "train_dropped_long": trainer.dropped_long.get("train", 0),
            "train_seconds": round(train_s, 1),
            "data": info,
            "train_log": [h for h in trainer.state.log_history if "loss" in h],
        }
    summary["backbone_layers"] = getattr(model.config, "num_hidden_layers", None)
    if held:
        t1 = time.perf_counter()
        summary["heldout"] = evaluate_reward_model(
            out, held, batch_size=args.per_device_eval_batch_size, device=args.device
        )
        summary["heldout"]["seconds"] = round(time.perf_counter() - t1, 1)
    if args.process_index == 0:
        with open(os.path.join(out, EVAL_FILE), "w") as f:
            json.dump(summary, f, indent=2, default=float)
        if not quiet:
            print_reward_summary(summary)
    return summary


def _train_head_only(model, tok, train, args: RewardConfig, model_name: str, info: dict) -> dict[str, Any]:
    """``training.head_only``: features once, the score head fitted exactly, the model saved (see l3m.reward_head)."""
    from l3m.reward_head import train_head_only

    t0 = time.perf_counter()
    model.to(args.device)
    fit = train_head_only(
        model,
        tok,
        train,
        lambda pair, which: reward_text(tok, pair, which),
        max_length=args.max_length,
        batch_size=args.per_device_train_batch_size,
        seed=args.seed,
        progress=not args.disable_tqdm,
    )
    train_s = time.perf_counter() - t0
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir, safe_serialization=True)
    tok.save_pretrained(args.output_dir)
    return {
        "output_dir": args.output_dir,
        "backbone": model_name,
        "peft": None,
        "head_only": True,
        "steps": 0,
        "train_pairs": len(train),
        "train_dropped_long": 0,
        "train_seconds": round(train_s, 1),
        "data": info,
        "head_fit": fit,
        "train_log": [],
    }


def print_reward_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]reward model saved to[/bold] {summary['output_dir']}  ({summary['steps']} steps, "
        f"{summary['train_pairs']} training pairs, {summary['train_seconds']} s)"
    )
    fit = summary.get("head_fit")
    if fit:
        best = next(r for r in fit["cross_validation"] if r["l2"] == fit["l2"])
        console.print(
            f"score head fitted on a frozen backbone: L2 {fit['l2']:g} (5-fold CV accuracy {best['cv_accuracy']:.3f}), "
            f"training accuracy {fit['train_accuracy']:.3f}"
        )
    h = summary.get("heldout")
    if h:
        table = Table(title="held-out pairwise accuracy (scored as a reward constraint scores)")
        for col in ("pairs", "accuracy", "95% CI", "mean margin"):
            table.add_column(col)
        table.add_row(
            str(h["n_pairs"]),
            f"{h['accuracy']:.3f}",
            f"{h['ci95'][0]:.3f} .. {h['ci95'][1]:.3f}",
            f"{h['mean_margin']:.3f}",
        )
        console.print(table)
    else:
        console.print("no held-out pairs (data.heldout_fraction is 0 and data.eval is unset): accuracy not measured")
    console.print(f"details: {os.path.join(summary['output_dir'], EVAL_FILE)}")


# ----------------------------------------------------------------------------------------------
# `l3m evaluate-reward`: a saved (or hub) reward model scored on new preference pairs


def add_evaluate_reward_arguments(p) -> None:
    p.add_argument("model", help="a reward model: a directory written by `l3m train-reward`, or a hub name")
    p.add_argument("data", nargs="+", help="preference files (.json/.jsonl/.jsonl.gz) or hf:NAME[:SPLIT]")
    p.add_argument("--format", default=None, help="force a preference format (default: detected per record)")
    p.add_argument("--limit", type=int, default=None, help="score a seeded random subsample of N pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of --limit's subsample and of the bootstrap")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="tokens per text; a longer text keeps its last max-length tokens, as a reward constraint scores it "
        "(default 1024)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_argument("--output", "-o", default=None, help="write the numbers to this JSON file")


def run_evaluate_reward(ns) -> dict[str, Any]:
    """Pairwise accuracy (with a 95% bootstrap interval) of a reward model on preference files."""
    from l3m.models import check_model_exists
    from l3m.rewards import RewardModel

    check_model_exists(ns.model)
    data = load_preference_sources(list(ns.data), ns.format)
    if not data.pairs:
        raise L3MUserError(f"no usable preference pairs in {', '.join(ns.data)} ({data.describe()})")
    if ns.limit is not None and ns.limit < 1:
        raise L3MUserError(f"--limit must be at least 1, got {ns.limit}")
    pairs = subsample(data.pairs, ns.limit, ns.seed)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rm = RewardModel(ns.model, device=device, batch_size=ns.batch_size, max_length=ns.max_length)
    t0 = time.perf_counter()
    result = evaluate_reward_model(rm, pairs)
    result.update(
        model=ns.model,
        data=list(ns.data),
        read=data.describe(),
        max_length=rm.max_length,
        seconds=round(time.perf_counter() - t0, 1),
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pairwise accuracy of {ns.model}")
    for col in ("pairs", "accuracy", "95% CI", "mean margin", "max length"):
        table.add_column(col)
    table.add_row(
        str(result["n_pairs"]),
        f"{result['accuracy']:.3f}",
        f"{result['ci95'][0]:.3f} .. {result['ci95'][1]:.3f}",
        f"{result['mean_margin']:.3f}",
        str(result["max_length"]),
    )
    console = Console()
    console.print(f"read {result['read']}")
    console.print(table)
    if ns.output:
        os.makedirs(os.path.dirname(os.path.abspath(ns.output)), exist_ok=True)
        with open(ns.output, "w") as f:
            json.dump(result, f, indent=2, default=float)
        console.print(f"written to {ns.output}")
    return result
