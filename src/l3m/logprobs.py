"""Log-probabilities of responses under a causal LM: the one function the trainer, the minimax reference model and
the evaluation's task perplexity use.

Two ways to get the same numbers (up to float rounding):

* :func:`response_logprobs` runs each whole sequence (prompt + response) through the model;
* :func:`shared_prefix_logprobs` runs each distinct prompt once and lets its ``k`` continuations attend to the
  prompt's keys and values (prefix sharing): the prompt is encoded once instead of ``k`` times, with the gradient
  still reaching it.

A sample's log-probability is taken under the distribution it was drawn from, ``log softmax(logits / T)``; the task
loss uses ``T = 1``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from transformers import DynamicCache


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperatures: list[float] | None = None
) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` per position, for rows ``[B, L, V]`` of logits, ``T`` per row (default 1).

    A few rows at a time to bound the float32 copy of the logits; the rows are taken with ``split``, whose backward
    is one ``cat`` (slicing would fill a zero tensor as large as all the logits, once per slice).
    """
    chunk = 4
    inv = None
    if temperatures is not None and any(t != 1.0 for t in temperatures):
        inv = (1.0 / torch.tensor(temperatures, dtype=torch.float32, device=logits.device)).view(-1, 1, 1).split(chunk)
    out = []
    for n, (lg, t) in enumerate(zip(logits.split(chunk), targets.split(chunk))):
        lg = lg.float() if inv is None else lg.float() * inv[n]
        out.append(lg.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def cache_of(output) -> Any:
    """The KV cache a forward pass returned (``cache``, or ``past_key_values`` in older transformers)."""
    for name in ("cache", "past_key_values"):
        if output is not None and name in output.keys():
            return output[name]
    return None


def cache_kwarg(model) -> str:
    """The name under which the model's forward (and ``generate``) take a KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(getattr(base, "module", base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward_logits(model, keep: int, **kwargs) -> torch.Tensor:
    """The logits of the last ``keep`` positions (``logits_to_keep`` where the architecture has it)."""
    try:
        return model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # an architecture without logits_to_keep
        return model(**kwargs).logits[:, -keep:]


def response_logprobs(
    model,
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    pad_id: int,
    temperatures: list[float] | None = None,
    one_call: bool = False,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of the response tokens of each row, one 1-D tensor per row (zeros elsewhere).

    ``groups`` holds ``(input_ids, response_mask, attention_mask)`` triples (right- or left-padded), with
    ``temperatures[g]`` the temperature of group ``g`` (default 1). Rows are re-aligned to a common end so that only
    the last positions, where responses lie, go through the LM head. The groups share one forward pass unless padding
    them to a common width would cost more than 15% extra tokens; ``one_call`` forces one pass (sharded weights,
    where every process must make the same calls).
    """
    device = next(model.parameters()).device
    rows, row_temp, sizes = [], [], []
    for g, (ids, mask, attn) in enumerate(groups):
        sizes.append(ids.shape[0])
        for r in range(ids.shape[0]):
            keep = attn[r].bool()
            rows.append((ids[r][keep.to(ids.device)], mask[r][keep.to(mask.device)]))
            row_temp.append(1.0 if temperatures is None else float(temperatures[g]))
    lens = [ids.numel() for ids, _ in rows]
    batches, start = [], 0
    for n in sizes:
        batches.append(list(range(start, start + n)))
        start += n
    if len(batches) > 1 and lens:
        padded_apart = sum(max(lens[r] for r in b) * len(b) for b in batches if b)
        if one_call or max(lens) * len(lens) <= 1.15 * padded_apart:
            batches = [list(range(len(rows)))]
    out: list[torch.Tensor | None] = [None] * len(rows)
    for batch in batches:
        if not batch:
            continue
        width = max(lens[r] for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
        for j, r in enumerate(batch):
            t, m = rows[r]
            ids[j, width - t.numel() :] = t
            attn[j, width - t.numel() :] = 1
            resp[j, width - t.numel() :] = m
        has = resp.any(1)
        first = int(resp[has].float().argmax(1).min()) if has.any() else width - 1  # the earliest response token
        keep = width - max(first, 1) + 1  # positions whose logits predict a response token (and one more)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        logits = _forward_logits(model, keep, input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        targets = torch.cat([ids[:, width - keep + 1 :], ids.new_zeros(len(batch), 1)], 1)  # the last: unused
        logp = token_logprobs(logits, targets, [row_temp[r] for r in batch])[:, :-1]
        logp = logp * resp[:, width - keep + 1 :]
        for j, r in enumerate(batch):
            out[r] = logp[j]
    return out


def shared_prefix_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    continuations: list[tuple[torch.Tensor, int, float]],
    pad_id: int,
) -> list[torch.Tensor] | None:
    """Log-probabilities of continuations that share prompts, each prompt encoded once.

    ``continuations`` holds ``(tokens, prompt row, temperature)``. The left-padded prompts go through the model once,
    with ``use_cache``; each continuation then attends to its prompt's keys and values, taken from that cache with
    their autograd history, so the gradient reaches the prompt positions as in a pass over the whole sequence.
    Continuations are batched by length (longest first; a new batch when padding would pass a fifth of its tokens).
    Returns one row of per-token log-probabilities per continuation (the first token's from the prompt's last
    position), or ``None`` when the model does not return a ``DynamicCache`` (the caller then uses
    :func:`response_logprobs`).
    """
    dev = next(model.parameters()).device
    p_ids, p_mask = prompt_ids.to(dev), prompt_mask.to(dev)
    pos = (p_mask.cumsum(1) - 1).clamp(min=0)
    try:
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    except TypeError:  # an architecture without logits_to_keep
        return None
    cache = cache_of(out)
    if type(cache) is not DynamicCache:
        return None
    kwarg = cache_kwarg(model)
    first_logits = out.logits  # [P, 1, V]: each prompt's last position predicts its continuations' first token
    n_prompt = p_mask.sum(1)
    rows: list[torch.Tensor | None] = [None] * len(continuations)
    order = sorted(range(len(continuations)), key=lambda i: -continuations[i][0].numel())
    start = 0
    while start < len(order):
        width = continuations[order[start]][0].numel()
        end, tokens = start, 0
        while end < len(order) and width * (end - start + 1) <= 1.2 * (tokens + continuations[order[end]][0].numel()):
            tokens += continuations[order[end]][0].numel()
            end += 1
        batch, start = order[start:end], end
        if width == 0:
            for i in batch:
                rows[i] = first_logits.new_zeros(1)
            continue
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=dev)
        c_mask = torch.zeros_like(ids)
        for j, i in enumerate(batch):
            t = continuations[i][0]
            ids[j, : t.numel()] = t
            c_mask[j, : t.numel()] = 1
        owner = torch.tensor([continuations[i][1] for i in batch], device=dev)
        temps = [float(continuations[i][2]) for i in batch]
        sub = copy.copy(cache)  # the prompts' keys and values, one row per continuation
        sub.layers = [copy.copy(layer) for layer in cache.layers]
        sub.batch_select_indices(owner)
        o = model(
            input_ids=ids,
            attention_mask=torch.cat([p_mask[owner], c_mask], 1),
            position_ids=n_prompt[owner].unsqueeze(1) + torch.arange(width, device=dev),
            use_cache=True,
            logits_to_keep=width,
            **{kwarg: sub},
        )
        targets = torch.cat([ids[:, 1:], ids.new_zeros(len(batch), 1)], 1)  # the last position: unused
        rest = token_logprobs(o.logits, targets, temps)[:, :-1]
        first = token_logprobs(first_logits[owner], ids[:, :1], temps)
        logp = torch.cat([first, rest], 1) * c_mask
        for j, i in enumerate(batch):
            rows[i] = logp[j]
    return rows
