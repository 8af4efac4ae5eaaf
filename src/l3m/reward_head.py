"""Reward models with a frozen backbone: fit only the score head, by Bradley-Terry logistic regression.

A one-output ``AutoModelForSequenceClassification`` scores a text as ``r = w . h``, where ``h`` is the backbone's
final hidden state at the position the model pools (its last non-padding token) and ``w`` is the ``score``
head. With the backbone frozen, the Bradley-Terry loss

    -log sigmoid(r_chosen - r_rejected) = -log sigmoid(w . (h_chosen - h_rejected))

is a logistic regression on feature differences, with no intercept: convex, fitted exactly (L-BFGS) from
features computed once. Why: full fine-tuning of even a 135M-parameter backbone takes hours on a CPU; this
takes one forward pass per text. The L2 penalty is chosen by cross-validation over the training pairs (folds
by prompt) and the head refitted on them all. ``l3m train-reward`` uses it when ``training.head_only: true``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def _head_name(model) -> str:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Linear):
            return name
    raise ValueError(
        f"{type(model).__name__} has no linear 'score' (or 'classifier') head; head_only needs one, "
        "as transformers' *ForSequenceClassification models for decoder LMs have"
    )


@torch.inference_mode()
def pooled_features(
    model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 8, progress: bool = True
) -> torch.Tensor:
    """``[N, H]`` float64: the hidden state each text's score is computed from, pooled as the model pools.

    The head is swapped for the identity for the duration, so the model's own pooling code picks the position;
    texts longer than ``max_length`` tokens keep their last tokens (the response), as :class:`l3m.rewards.RewardModel`
    does at scoring time.
    """
    name = _head_name(model)
    head = getattr(model, name)
    side = tokenizer.truncation_side
    tokenizer.truncation_side, tokenizer.padding_side = "left", "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    out = torch.empty(len(texts), head.in_features, dtype=torch.float64)
    was_training = model.training
    model.eval()
    setattr(model, name, torch.nn.Identity())
    device = next(model.parameters()).device
    try:
        bar = tqdm(total=len(texts), desc="reward features", disable=not progress, leave=False)
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            enc = tokenizer(
                [texts[j] for j in rows],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            ).to(device)
            out[rows] = model(**enc).logits.double().cpu()
            bar.update(len(rows))
        bar.close()
    finally:
        setattr(model, name, head)
        tokenizer.truncation_side = side
        model.train(was_training)
    return out


def _fit(diff: torch.Tensor, l2: float, max_iter: int = 300) -> torch.Tensor:
    """argmin_w mean(-log sigmoid(diff @ w)) + l2 * |w|^2 (standardised features), by L-BFGS."""
    w = torch.zeros(diff.shape[1], dtype=diff.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -F.logsigmoid(diff @ w).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def fit_bradley_terry_head(
    f_chosen: torch.Tensor,
    f_rejected: torch.Tensor,
    groups: Sequence[str] | None = None,
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = 5,
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """The head ``w`` (in the model's feature units) and how it was chosen.

    Features are divided by their standard deviation before fitting, so one L2 penalty suits every dimension;
    the scaling is folded back into ``w``. ``groups`` (e.g. the prompts) keeps a prompt's pairs in one fold.
    """
    feats = torch.cat([f_chosen, f_rejected])
    scale = feats.std(0).clamp(min=1e-6)
    diff = (f_chosen - f_rejected) / scale
    n = diff.shape[0]
    keys = list(groups) if groups is not None else [str(i) for i in range(n)]
    uniq = sorted(set(keys))
    random.Random(seed).shuffle(uniq)
    fold_of = {g: i % folds for i, g in enumerate(uniq)}
    fold = torch.tensor([fold_of[k] for k in keys])
    cv = []
    for l2 in l2_grid:
        correct, loss = 0.0, 0.0
        for f in range(folds):
            tr, te = fold != f, fold == f
            if not te.any() or not tr.any():
                continue
            w = _fit(diff[tr], l2)
            m = diff[te] @ w
            correct += float((m > 0).double().sum())
            loss += float(-F.logsigmoid(m).sum())
        cv.append({"l2": l2, "cv_accuracy": correct / n, "cv_loss": loss / n})
    best = min(cv, key=lambda r: (r["cv_loss"], -r["cv_accuracy"]))
    w = _fit(diff, best["l2"])
    train_acc = float(((diff @ w) > 0).double().mean())
    info = {"l2": best["l2"], "cross_validation": cv, "folds": folds, "train_accuracy": train_acc, "pairs": n}
    return w / scale, info


def train_head_only(
    model, tokenizer, pairs, text_of, max_length: int, batch_size: int = 8, seed: int = 0, progress: bool = True
) -> dict:
    """Fit ``model``'s score head on ``pairs`` (the backbone untouched); returns what was measured.

    ``text_of(pair, "chosen" | "rejected")`` gives the exact text the reward model will score.
    """
    name = _head_name(model)
    texts = [text_of(p, w) for p in pairs for w in ("chosen", "rejected")]
    feats = pooled_features(model, tokenizer, texts, max_length, batch_size, progress)
    w, info = fit_bradley_terry_head(feats[0::2], feats[1::2], [p.prompt_text for p in pairs], seed=seed)
    head = getattr(model, name)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype).unsqueeze(0))
        if head.bias is not None:
            head.bias.zero_()
    r = feats @ w
    info["reward_mean"], info["reward_std"] = float(r.mean()), float(r.std())
    if not math.isfinite(info["reward_std"]):
        raise ValueError("the fitted reward head gives non-finite rewards")
    return info
