"""How much task log-perplexity must a length range cost? A lower bound from the references' lengths.

Why: the issue asks, where a range makes "within 10% of SFT" impossible, to say so with numbers. Write
``p`` for the distribution of (prompt, reference response) in the data and ``q`` for any model whose mean
sampled length lies in [l_min, l_max]. The task log-perplexity is the mean over examples of the per-token
NLL, ``E_p[-log q(y|x) / n(y)]``, with ``n(y)`` the response's token count (end token included). Split
``q(y|x) = q(L|x) q(y|x, L)`` by the response length ``L``. Within one length the weight ``1/n`` is a
constant, so ``q(y|x, L) = p(y|x, L)`` is best, and what is left is a weighted divergence between length
distributions, ``sum_L p(L) log(p(L)/q(L)) / (L+1)``. That sum is jointly convex in (p, q), so pooling the
prompts can only lower it: minimising it over pooled length distributions ``q(L)`` whose mean (lengths
capped at ``max_new_tokens``, as the evaluation counts them) lies in the range gives

    log-ppl(q)  >=  log-ppl(p itself)  +  D*(range)

for every model q that meets the range. D* is what the constraint must cost relative to a model of the
data that is exact; the SFT model is not exact, so D* is not a bound on "L3M minus SFT", but a D* above
10% of the SFT log-perplexity would show the target cannot be met by any model.

    .venv/bin/python experiments/length/length_bound.py   # prints a table; writes results/length_bound.json

It also scores the initial model on the same references, to show how much of SFT's improvement each L3M made.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DATA, EVAL, RANGES  # noqa: E402

from l3m.data import load_examples, split_heldout  # noqa: E402
from l3m.evaluation import task_logppl  # noqa: E402
from l3m.models import load_causal_lm, load_tokenizer  # noqa: E402


def task_loss_excess(
    p: torch.Tensor, w: torch.Tensor, lengths: torch.Tensor, lo: float, hi: float
) -> tuple[float, float]:
    """(D*, the unconstrained optimum's mean length) for the length part of the task loss.

    ``F(q) = -sum_L w_L p_L log q_L`` is the length part of the task loss. Its minimum over all length
    distributions is at ``q ∝ w p`` (note: per-token averaging favours short responses). D* is the minimum of F
    over the q whose capped mean lies in [lo, hi], minus that unconstrained minimum. Convex in q; solved on
    softmax logits with a growing quadratic penalty on the mean, in float64.
    """
    support = p > 0

    def F(logq: torch.Tensor) -> torch.Tensor:
        return -(w * p * logq)[support].sum()

    best = w * p / (w * p).sum()
    f_best = float(F(torch.log(best.clamp(min=1e-300))))
    mean_best = float((best * lengths).sum())
    if lo <= mean_best <= hi:
        return 0.0, mean_best
    target = lo if mean_best < lo else hi
    logits = torch.log(best.clamp(min=1e-12)).clone().requires_grad_(True)
    for rho in (1e1, 1e2, 1e3, 1e4, 1e5, 1e6):
        opt = torch.optim.LBFGS([logits], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure(opt=opt, rho=rho):
            opt.zero_grad()
            logq = torch.log_softmax(logits, 0)
            loss = F(logq) + rho * ((logq.exp() * lengths).sum() - target) ** 2
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        logq = torch.log_softmax(logits, 0)
        mean_q = float((logq.exp() * lengths).sum())
        assert abs(mean_q - target) < 0.05, f"the penalty did not reach the range's edge: mean {mean_q:.3f}"
        return float(F(logq)) - f_best, mean_best


def main() -> None:
    tok = load_tokenizer("default")
    examples = load_examples(str(DATA))
    _, heldout = split_heldout(examples, 0.2, seed=0)
    heldout = heldout[: EVAL["n_prompts"]]
    cap = EVAL["max_new_tokens"]
    n_ref = [len(tok(e.response, add_special_tokens=False)["input_ids"]) for e in heldout]
    lengths = torch.arange(cap + 1, dtype=torch.float64)  # cap stands for "cap or longer", as sampling clips
    p = torch.zeros(cap + 1, dtype=torch.float64)
    w = torch.zeros(cap + 1, dtype=torch.float64)
    for n in n_ref:
        p[min(n, cap)] += 1.0 / len(n_ref)
    for L in range(cap + 1):
        w[L] = 1.0 / (L + 1)  # per-token NLL: the end token counts
    # mass the optimum puts on lengths the references never have costs nothing in the divergence, but its weight
    # there is irrelevant (p = 0): only the support of p enters the sum

    sft = json.loads((RESULTS / "results.json").read_text())
    sft_logppl = next(e for e in sft["evaluations"] if e["model"] == "sft")["task_logppl"]["mean"]
    rows = {}
    mean_best = task_loss_excess(p, w, lengths, 0, cap)[1]
    print(f"references: {len(n_ref)} held-out, mean {sum(n_ref) / len(n_ref):.1f} tokens; SFT log-ppl {sft_logppl:.3f}")
    print(f"the task loss's own optimum has mean length {mean_best:.1f} tokens (per-token averaging favours short)")
    print("| range | D* (nats/token) | D* / SFT log-ppl | measured L3M - SFT |")
    print("|---|---|---|---|")
    targets = sft.get("targets", {})
    for name, (lo, hi) in RANGES.items():
        d, mean_best = task_loss_excess(p, w, lengths, lo, hi)
        measured = targets.get(f"l3m_{name}", {}).get("logppl_ratio_to_sft")
        gap = (measured - 1) * sft_logppl if measured else math.nan
        rows[name] = {"range": [lo, hi], "d_star": d, "d_star_over_sft": d / sft_logppl, "measured_gap": gap}
        print(f"| [{lo}, {hi}] | {d:.4f} | {100 * d / sft_logppl:.1f}% | {gap:+.3f} ({100 * gap / sft_logppl:+.0f}%) |")
    # where training started: the initial model's log-ppl on the same references (how far SFT and each L3M got)
    torch.set_num_threads(1)
    with torch.no_grad():
        initial = task_logppl(load_causal_lm("default"), tok, heldout, max_length=256, progress=False)
    start = float(initial.mean())
    print(f"initial model log-ppl {start:.3f}; share of SFT's improvement ({start - sft_logppl:.3f}) each L3M made:")
    for name, r in rows.items():
        r["share_of_sft_improvement"] = (start - sft_logppl - r["measured_gap"]) / (start - sft_logppl)
        print(f"  {name}: {100 * r['share_of_sft_improvement']:.0f}%")
    out = {
        "what": "lower bound D* on the log-ppl cost of each length range, from the held-out references' lengths",
        "n_references": len(n_ref),
        "reference_mean_tokens": sum(n_ref) / len(n_ref),
        "length_cap": cap,
        "task_optimum_mean_tokens": mean_best,
        "sft_logppl": sft_logppl,
        "initial_model_logppl": {"mean": start, "std": float(initial.std())},
        "ranges": rows,
    }
    (RESULTS / "length_bound.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
