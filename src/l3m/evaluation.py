"""Checking a model against its constraints on held-out prompts, and its task log-perplexity.

A constraint's verdict comes from a 95% bootstrap confidence interval of ``C_i`` (resampling prompts,
each with its ``k`` samples): **holds** when the interval lies at or below 0, **violated** when it lies
at or above 0, **undecided** when it straddles 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from l3m.constraints import Constraint, SampleBatch, evaluate_constraints
from l3m.data import Example, pad, prompt_ids, tokenize_examples
from l3m.logprobs import eos_token_ids, token_logprobs


@dataclass
class Samples:
    """Sampled responses: ``k`` per prompt, grouped consecutively."""

    batch: SampleBatch
    k: int


@torch.inference_mode()
def sample_responses(
    model,
    tokenizer,
    examples: Sequence[Example],
    k: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    max_prompt_length: int = 256,
    seed: int | None = 0,
    progress: bool = True,
) -> Samples:
    """``k`` samples per prompt with ``generate`` (KV cache, left padding, stops when all have ended)."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    prompts, comps, comp_ids, lengths = [], [], [], []
    bar = tqdm(total=len(examples), desc="sampling", disable=not progress, leave=False)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = [prompt_ids(tokenizer, ex.prompt)[-max_prompt_length:] for ex in chunk]
        p = pad(ids, tokenizer.pad_token_id, "left").to(device)
        m = pad([[1] * len(x) for x in ids], 0, "left").to(device)
        out = model.generate(
            input_ids=p,
            attention_mask=m,
            do_sample=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            num_return_sequences=k,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[:, p.shape[1] :].tolist()
        for j, row in enumerate(out):
            end = next((t for t, tid in enumerate(row) if tid in eos), None)
            n = len(row) if end is None else end
            comp_ids.append(row[:n])
            lengths.append(n)
            prompts.append(chunk[j // k].prompt_text)
        comps.extend(tokenizer.batch_decode([r for r in comp_ids[-len(out) :]], skip_special_tokens=True))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    n_prompts = len(examples)
    batch = SampleBatch(
        prompts=prompts,
        completions=comps,
        completion_ids=comp_ids,
        lengths=torch.as_tensor(lengths),
        group_ids=torch.arange(n_prompts).repeat_interleave(k),
    )
    return Samples(batch=batch, k=k)


def bootstrap_ci(
    per_prompt: torch.Tensor, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over prompts (``per_prompt`` holds one mean per prompt)."""
    n = per_prompt.numel()
    if n < 2:
        v = float(per_prompt.mean()) if n else float("nan")
        return v, v
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    means = per_prompt.double()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    if hi <= 0:
        return "holds"
    if lo >= 0:
        return "violated"
    return "undecided"


def constraint_report(constraints: Sequence[Constraint], samples: Samples, n_boot: int = 2000) -> list[dict]:
    """Per constraint: the estimate of C_i, its 95% bootstrap interval, the mean raw quantity, a verdict."""
    raw, c = evaluate_constraints(constraints, samples.batch)
    n_prompts = int(samples.batch.group_ids.max()) + 1 if len(samples.batch.completions) else 0
    rows = []
    for i, con in enumerate(constraints):
        per_prompt = c[:, i].reshape(n_prompts, samples.k).mean(1)
        lo, hi = bootstrap_ci(per_prompt, n_boot)
        rows.append(
            {
                "name": con.name,
                "constraint": con.describe(),
                "value": float(c[:, i].mean()),
                "ci95": [lo, hi],
                "mean_raw": float(raw[:, i].mean()),
                "verdict": verdict(lo, hi),
            }
        )
    return rows


@torch.inference_mode()
def task_logppl(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 8, max_length: int = 512, progress: bool = True
) -> torch.Tensor:
    """Per-example task log-perplexity: the mean NLL per response token (prompt tokens never count)."""
    device = next(model.parameters()).device
    feats = tokenize_examples(tokenizer, list(examples), max_length=max_length, what="held-out data")
    was_training = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(feats), batch_size), desc="perplexity", disable=not progress, leave=False):
        chunk = feats[i : i + batch_size]
        ids = pad([f["input_ids"] for f in chunk], tokenizer.pad_token_id).to(device)
        attn = pad([[1] * len(f["input_ids"]) for f in chunk], 0).to(device)
        mask = pad([f["response_mask"] for f in chunk], 0).to(device)[:, 1:].float()
        logp = token_logprobs(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])
        out.append((-(logp * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
