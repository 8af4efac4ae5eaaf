"""Small shared pieces: per-token log-probabilities and the model's end-of-turn tokens."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """``log softmax(logits)[target]`` per position, a few rows at a time to bound memory."""
    out = []
    for i in range(0, logits.shape[0], chunk):
        lg = logits[i : i + chunk].float()
        out.append(lg.gather(-1, targets[i : i + chunk].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out, dim=0)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)
