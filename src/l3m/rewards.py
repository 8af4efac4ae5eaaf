"""Reward models: a transformers sequence-classification model used as a reward function.

A :class:`RewardModel` is a callable with TRL's reward-function signature, so it plugs into a
``RewardConstraint`` like any Python function. It scores the *decoded text* with its own tokenizer, so
the reward model need not share the policy's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from l3m.models import resolve_model_path


def format_for_reward(tokenizer, prompt: str, completion: str) -> str:
    """The text a reward model scores: its chat template when it has one, else a plain dialogue.

    ``l3m train-reward`` uses the same function, so training and scoring see the same format.
    """
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return f"\n\nHuman: {prompt}\n\nAssistant: {completion}"


class RewardModel:
    """Scores (prompt, completion) pairs with an ``AutoModelForSequenceClassification`` with one output."""

    def __init__(
        self,
        name_or_path: str,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        max_length: int = 1024,
        trust_remote_code: bool = False,
    ):
        self.name_or_path = name_or_path
        self.name = str(name_or_path).rstrip("/").split("/")[-1]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = batch_size
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(self.name_or_path)
        self._tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._tokenizer.padding_side = "right"
        self._tokenizer.truncation_side = "left"  # a text longer than max_length keeps its end: the response
        model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=self.trust_remote_code, use_safetensors=True
        )
        if model.config.num_labels != 1:
            raise ValueError(f"reward model {self.name_or_path} has {model.config.num_labels} outputs; expected 1")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model = model.to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
        if self._model is None:
            self._load()
        texts = [format_for_reward(self._tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(self.device)
            scores.extend(self._model(**enc).logits[:, 0].float().tolist())
        return scores
