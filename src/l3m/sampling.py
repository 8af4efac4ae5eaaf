"""Sampling the policy: one sampler for training and for evaluation.

The samples are drawn from exactly the distribution their log-probabilities are scored under,
``softmax(logits / temperature)``: the generation config is built from l3m's own settings alone. Nothing is taken
from the model's ``generation_config`` but its end tokens, since a ``repetition_penalty``, ``no_repeat_ngram_size``,
``min_new_tokens``, ``top_p`` or ``top_k`` there would change the distribution the samples come from and not the one
the score-function gradient assumes (a biased ``grad C_i``). ``top_p < 1`` and ``top_k > 0`` are refused for the
same reason (see :func:`check_sampling_settings`).

A completion is the response's tokens up to, not including, its first end token: ``completion_ids[j]`` has
``lengths[j]`` tokens, in training and in evaluation alike. The log-probability of a sample covers its end token
too (stopping there is part of the sampled response); :meth:`Completions.scored_ids` gives those tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig

from l3m.constraints import SampleBatch
from l3m.data import Example, pad, prompt_ids
from l3m.logprobs import cache_kwarg, cache_of, eos_token_ids


def check_sampling_settings(top_p: float = 1.0, top_k: int = 0) -> None:
    """Refuse truncated sampling: l3m scores samples under the full ``softmax(logits / temperature)``."""
    if top_p != 1.0 or top_k not in (0, None):
        raise ValueError(
            f"top_p={top_p}, top_k={top_k}: truncated sampling draws from a distribution other than the one the "
            "samples are scored under (softmax(logits / temperature)), which biases the constraints' gradient; "
            "leave top_p at 1.0 and top_k at 0, and use temperature to sharpen the samples"
        )


def generation_config(max_new_tokens: int, temperature: float, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """The explicit generation config of every sampling call: ancestral sampling at ``temperature``, nothing else."""
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )


@contextlib.contextmanager
def seeded_rng(device: str | torch.device, seed: int):
    """Run under an RNG seeded with ``seed``; the global RNG state is restored afterwards."""
    dev = torch.device(device)
    devices = [] if dev.type == "cpu" else [dev.index if dev.index is not None else 0]
    kwargs = {} if dev.type in ("cpu", "cuda") else {"device_type": dev.type}
    with torch.random.fork_rng(devices=devices, **kwargs):
        torch.manual_seed(seed % (2**63))
        yield


@contextlib.contextmanager
def _own_generation_config(model, config: GenerationConfig):
    """Let ``generate`` see ``config`` as the model's own generation config, so that no setting of the model's (a
    repetition penalty, a minimum length) fills the fields ``config`` leaves unset."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = saved


def _shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, k: int):
    """The KV cache of the prompts but their last token, computed once and repeated ``k`` times; ``None`` where that
    does not apply (one sample per prompt, one-token prompts, a model whose cache is not a ``DynamicCache``)."""
    if k < 2 or ids.shape[1] < 2:
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
    cache = cache_of(out)
    if type(cache) is not DynamicCache:
        return None
    cache.batch_repeat_interleave(k)
    return cache


@torch.no_grad()  # not inference_mode: FSDP gathers sharded weights in each forward call, which that forbids
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int, config: GenerationConfig):
    """``k`` samples per left-padded prompt, grouped consecutively: the new tokens ``[P * k, T]`` (padded after each
    sample's end). Each prompt is encoded once for its ``k`` samples (its KV cache repeated ``k`` times); the samples
    are drawn as ``generate(..., num_return_sequences=k)`` draws them, with the same random numbers."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids, mask = prompt_ids.to(dev), prompt_mask.to(dev)
    try:
        with _own_generation_config(model, config):
            cache = _shared_prompt_cache(model, ids, mask, k)
            if cache is None:
                out = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=k)
            else:
                rep_ids, rep_mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
                out = model.generate(input_ids=rep_ids, attention_mask=rep_mask, **{cache_kwarg(model): cache})
    finally:
        model.train(was_training)
    return out[:, ids.shape[1] :].cpu()


@dataclass
class Completions:
    """Sampled responses, split at their first end token."""

    ids: list[list[int]]  # the response's tokens, the end token not included
    end_ids: list[int | None]  # the end token each response stopped with; None where it was cut off

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    @property
    def truncated(self) -> list[bool]:
        """Cut off at ``max_new_tokens`` without an end token."""
        return [e is None for e in self.end_ids]

    def scored_ids(self) -> list[list[int]]:
        """The tokens a sample's log-probability covers: the response and the end token it stopped with."""
        return [x if e is None else x + [e] for x, e in zip(self.ids, self.end_ids)]


def split_completions(new_tokens: torch.Tensor, eos_ids: Sequence[int]) -> Completions:
    """Each row of ``generate``'s new tokens up to its first end token."""
    eos = set(eos_ids)
    ids, ends = [], []
    for row in new_tokens.tolist():
        end = next((j for j, t in enumerate(row) if t in eos), None)
        ids.append(row if end is None else row[:end])
        ends.append(None if end is None else row[end])
    return Completions(ids, ends)


def sample_batch(tokenizer, prompt_texts: list[str], comps: Completions, k: int, extra: dict | None = None):
    """What the constraints see: ``k`` decoded responses per prompt, with their ids, lengths and cut-off flags."""
    return SampleBatch(
        prompts=[prompt_texts[i // k] for i in range(len(comps.ids))],
        completions=tokenizer.batch_decode(comps.ids, skip_special_tokens=True),
        completion_ids=comps.ids,
        lengths=torch.as_tensor(comps.lengths, dtype=torch.long),
        group_ids=torch.arange(len(prompt_texts)).repeat_interleave(k),
        truncated=torch.as_tensor(comps.truncated, dtype=torch.bool),
        extra=extra or {},
    )


def sample_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    k: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    max_prompt_length: int = 256,
    seed: int | None = 0,
    progress: bool = True,
) -> SampleBatch:
    """``k`` samples for each example's prompt (held-out evaluation, ``l3m generate``), by :func:`generate`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if seed is not None:
        torch.manual_seed(seed)
    eos = eos_token_ids(model, tokenizer)
    config = generation_config(max_new_tokens, temperature, eos, tokenizer.pad_token_id)
    ids_all, ends_all = [], []
    bar = tqdm(total=len(examples), desc="sampling", disable=not progress, leave=False)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = [prompt_ids(tokenizer, ex.prompt)[-max_prompt_length:] for ex in chunk]
        p = pad(ids, tokenizer.pad_token_id, "left")
        m = pad([[1] * len(x) for x in ids], 0, "left")
        comps = split_completions(generate(model, p, m, k, config), eos)
        ids_all += comps.ids
        ends_all += comps.end_ids
        bar.update(len(chunk))
    bar.close()
    return sample_batch(tokenizer, [ex.prompt_text for ex in examples], Completions(ids_all, ends_all), k)
