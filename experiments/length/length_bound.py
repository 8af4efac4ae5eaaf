"""How much task log-perplexity must a length range cost? A lower bound from the references' lengths, and a
yardstick model that comes near it.

Write ``p`` for the distribution of (prompt, reference response) in the data and ``q`` for any model whose mean
length lies in [l_min, l_max]. The task log-perplexity is the mean over examples of the per-token NLL,
``E_p[-log q(y|x) / n(y)]``, with ``n(y)`` the response's token count (end token included). Split
``q(y|x) = q(L|x) q(y|x, L)`` by the response length ``L``. Within one length the weight ``1/n`` is a constant, so
``q(y|x, L) = p(y|x, L)`` is best, and what is left is a weighted divergence between length distributions,
``sum_L p(L) log(p(L)/q(L)) / (L+1)``. That sum is jointly convex in (p, q), so pooling the prompts can only lower
it: minimising it over pooled length distributions ``q(L)`` whose mean (lengths capped at ``max_new_tokens``, as
the evaluation counts them) lies in the range gives

    log-ppl(q)  >=  log-ppl(p itself)  +  D_exact(range)

for every model q that meets the range. D_exact is what the constraint must cost relative to an exact model of the
data; ``D*`` (``task_loss_excess``) is the same minimum measured from the per-token optimum (q ∝ p / (L+1), which
per-token averaging prefers to p). The SFT model is not exact, so neither bounds "L3M minus SFT" strictly; they say
how much of a measured cost the range itself explains.

The optimum is exact (``length_optimum``): to raise the mean it keeps p's shape on short lengths and puts the rest of
the mass at the cap. The script also scores that shape on the real SFT model, as a yardstick: "with probability s
the SFT model, otherwise the SFT model with its end tokens removed" (sample from the SFT model, keep the first end
token drawn with probability s, otherwise never stop). Only the first component produces a reference (a reference
ends), so the mixture's log-perplexity is SFT's plus ``-log(s) / n`` per reference (n its scored tokens), and its
mean length is ``s * (SFT's mean) + (1 - s) * cap``. Each L3M whose range lies above the SFT model's length is
compared with the yardstick at the L3M's own mean length: runs that end at different lengths are not comparable by
cost alone.

It reads what ``run.py`` wrote (the test split's indices, every model's evaluation) and needs only the tokenizer:

    .venv/bin/python experiments/length/length_bound.py     # prints a table; writes results/length_bound.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import DATA, MODELS, RANGES  # noqa: E402


def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    """The root of an increasing function ``f`` on [lo, hi] (``f(lo) <= 0 <= f(hi)``)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _raise_mean(a: torch.Tensor, lengths: torch.Tensor, target: float) -> torch.Tensor:
    """argmin of ``-sum_L a_L log q_L`` over distributions q on ``lengths`` whose mean is ``target``, for a target
    above the unconstrained optimum's mean ``sum a L / sum a``.

    KKT: ``q_L = a_L / (nu - eta L)`` where ``a_L > 0``; a length with ``a_L = 0`` holds mass only where
    ``nu - eta L = 0``, which with ``eta > 0`` can only be the longest length. So either (i) the longest length is
    not in the support and takes the rest of the mass, with ``nu = eta L_max``: then ``mean = L_max - A / eta``
    (``A = sum a``) gives ``eta`` in closed form; or (ii) all the mass stays on the support, and (nu, eta) solve
    the two equations by nested bisection (the mean increases with eta).
    """
    support = a > 0
    a_s, l_s = a[support], lengths[support]
    top = float(lengths.max())
    total = float(a_s.sum())
    if float(l_s.max()) < top:  # case (i), if the rest of the mass at the longest length is >= 0
        eta0 = float((a_s / (top - l_s)).sum())  # where that rest is 0
        if target >= top - total / eta0:
            q = torch.zeros_like(a)
            q[support] = a_s * (top - target) / (total * (top - l_s))
            q[lengths == top] = 1 - float(q.sum())
            return q

    def q_of(eta: float) -> torch.Tensor:
        # nu such that the mass is 1: sum a / (nu - eta L) decreases in nu above eta * max L
        base = eta * float(l_s.max())
        nu_hi = base + total + 1.0
        while float((a_s / (nu_hi - eta * l_s)).sum()) > 1:
            nu_hi = base + 2 * (nu_hi - base)
        nu = _bisect(lambda v: 1 - float((a_s / (max(v, base + 1e-300) - eta * l_s)).sum()), base, nu_hi)
        return a_s / (nu - eta * l_s)

    eta_hi = 1.0
    while float((q_of(eta_hi) * l_s).sum()) < target:
        eta_hi *= 2
    eta = _bisect(lambda e: float((q_of(e) * l_s).sum()) - target, 0.0, eta_hi)
    q = torch.zeros_like(a)
    q[support] = q_of(eta)
    return q / q.sum()


def length_optimum(p: torch.Tensor, w: torch.Tensor, lengths: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The length distribution q* that minimises the length part of the task loss, ``F(q) = -sum_L w_L p_L
    log q_L``, among those whose mean lies in [lo, hi]. Exact (see ``_raise_mean``); lengths the references never
    have may carry mass (the cap, for a range above the optimum; length 0, for one below it)."""
    a = w * p
    best = a / a.sum()
    mean_best = float((best * lengths).sum())
    if lo <= mean_best <= hi:
        return best
    if mean_best < lo:
        return _raise_mean(a, lengths, lo)
    return _raise_mean(a, -lengths, -hi)  # lowering the mean is raising the mean of -L


def task_loss_excess(
    p: torch.Tensor, w: torch.Tensor, lengths: torch.Tensor, lo: float, hi: float
) -> tuple[float, float]:
    """(D*, the unconstrained optimum's mean length) for the length part of the task loss.

    ``F(q) = -sum_L w_L p_L log q_L`` is the length part of the task loss. Its minimum over all length
    distributions is at ``q ∝ w p`` (note: per-token averaging favours short responses). D* is the minimum of F
    over the q whose capped mean lies in [lo, hi] (``length_optimum``), minus that unconstrained minimum.
    """
    support = p > 0

    def F(q: torch.Tensor) -> float:
        return float(-(w * p * torch.log(q.clamp(min=1e-300)))[support].sum())

    best = w * p / (w * p).sum()
    mean_best = float((best * lengths).sum())
    q = length_optimum(p, w, lengths, lo, hi)
    mean_q = float((q * lengths).sum())
    assert lo - 1e-6 <= mean_q <= hi + 1e-6, f"the optimum's mean {mean_q:.4f} is outside [{lo}, {hi}]"
    return F(q) - F(best), mean_best


def yardstick_gap(sft_mean_length: float, mean_length: float, n_scored: torch.Tensor, cap: int) -> float:
    """The stop-or-never mixture's log-ppl above SFT's at a mean length between SFT's and the cap: with
    ``s = (cap - mean) / (cap - SFT's mean)`` each reference pays ``-log(s) / n`` more (n its scored tokens)."""
    s = (cap - mean_length) / (cap - sft_mean_length)
    return float((-math.log(s) / n_scored).mean())


def reference_lengths(tok, records: list[dict], cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The references' response lengths (tokens, capped at ``cap``) and the tokens each is scored on (its response
    and end token, as the task log-perplexity counts them)."""
    from l3m.data import load_examples, tokenize_examples

    examples = load_examples(records)
    n_ref = torch.tensor([min(len(tok(e.response, add_special_tokens=False)["input_ids"]), cap) for e in examples])
    feats = tokenize_examples(tok, examples, max_length=512, what="reference data")
    n_scored = torch.tensor([sum(f["response_mask"][1:]) for f in feats], dtype=torch.float64)
    return n_ref, n_scored


def bounds(n_ref: torch.Tensor, cap: int) -> dict[str, dict]:
    """Per range: D_exact and D* (nats per token) and the optimum's mass at the cap and at length 0."""
    lengths = torch.arange(cap + 1, dtype=torch.float64)  # cap stands for "cap or longer", as sampling clips
    p = torch.bincount(n_ref, minlength=cap + 1).double() / n_ref.numel()
    w = 1.0 / (lengths + 1)  # per-token NLL: the end token counts
    support = p > 0
    F = lambda q: float(-(w * p * torch.log(q.clamp(min=1e-300)))[support].sum())  # noqa: E731
    exact_gap = F(p) - F(w * p / (w * p).sum())  # how far below an exact model's log-ppl the per-token optimum lies
    out = {}
    for name, (lo, hi) in RANGES.items():
        if lo >= cap:  # no length distribution capped at `cap` reaches the range
            continue
        d, _ = task_loss_excess(p, w, lengths, lo, hi)
        q = length_optimum(p, w, lengths, lo, hi)
        out[name] = {"d_exact": d - exact_gap, "d_star": d, "mass_at_cap": float(q[-1]), "mass_at_0": float(q[0])}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results"), help="a results folder written by run.py")
    ap.add_argument("--tokenizer", default="default", help="the initial model whose tokenizer counts tokens")
    ns = ap.parse_args(argv)
    results = Path(ns.results)
    res = json.loads((results / "results.json").read_text())
    split = res["split"]
    cap = int(res["eval"]["max_new_tokens"])
    idx = json.loads((results / "splits.json").read_text())[split]
    records = json.loads(DATA.read_text())
    from l3m.models import load_tokenizer

    n_ref, n_scored = reference_lengths(load_tokenizer(ns.tokenizer), [records[i] for i in idx], cap)
    rows = bounds(n_ref, cap)
    evals = {}
    for s in res["seeds"]:
        for m in MODELS[1:]:
            f = results / "evals" / f"seed{s}" / f"{m}.json"
            if f.is_file():
                evals[(s, m)] = json.loads(f.read_text())["evaluation"]
    print(f"{len(idx)} {split} references, mean {float(n_ref.double().mean()):.1f} tokens (capped at {cap})")
    print("| range | D_exact (nats) | D* (nats) | optimum's mass at the cap |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} {list(RANGES[name])} | {r['d_exact']:.4f} | {r['d_star']:.4f} | {r['mass_at_cap']:.2f} |")
    yard = []
    for (s, m), ev in sorted(evals.items()):
        sft = evals.get((s, "sft"))
        rng = RANGES.get(m.removeprefix("l3m_").removesuffix("_truncated"))
        if not sft or not rng or rng[0] <= sft["lengths"]["mean"] or ev["lengths"]["mean"] >= cap:
            continue
        cost = ev["task_logppl"]["mean"] - sft["task_logppl"]["mean"]
        y = yardstick_gap(sft["lengths"]["mean"], max(ev["lengths"]["mean"], sft["lengths"]["mean"]), n_scored, cap)
        yard.append({"model": m, "seed": s, "mean_length": ev["lengths"]["mean"], "cost": cost, "yardstick": y})
    if yard:
        print("\n| model | seed | mean length | cost against its SFT (nats) | yardstick at that length | excess |")
        print("|---|---|---|---|---|---|")
        for y in yard:
            print(
                f"| {y['model']} | {y['seed']} | {y['mean_length']:.1f} | {y['cost']:+.4f} | {y['yardstick']:+.4f} "
                f"| {y['cost'] - y['yardstick']:+.4f} |"
            )
    out = {
        "what": "lower bound on each range's log-ppl cost from the references' lengths, and each L3M above SFT's "
        "length against the stop-or-never yardstick at its own mean length",
        "split": split,
        "n_references": len(idx),
        "reference_mean_tokens": float(n_ref.double().mean()),
        "length_cap": cap,
        "ranges": rows,
        "yardstick": yard,
        "excess_mean": {
            m: statistics.fmean(y["cost"] - y["yardstick"] for y in yard if y["model"] == m)
            for m in dict.fromkeys(y["model"] for y in yard)
        },
    }
    (results / "length_bound.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
