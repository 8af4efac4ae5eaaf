"""What does the simplest length control cost? The SFT model with its end-token logits lowered by a constant.

Why: the L3Ms pay for their length ranges in task log-perplexity, and the bound D* (``length_bound.py``) says
what any model must pay at least. This script measures a plain, hand-set alternative between the two: the SFT
model with ``delta`` subtracted from the logits of its end tokens at every position (a logit bias, as a
decoding-time ``logit_bias`` would apply it). Each ``delta`` is one model: its responses are sampled as the
experiment samples (150 held-out prompts x 2, temperature 0.8, at most 64 new tokens) and the held-out
references are scored under the same biased logits, so the log-perplexity is that of the biased model.

    .venv/bin/python experiments/length/eos_bias.py --model runs/length/sft --deltas 0 2 4 5 6 7
    # prints a table; writes results/eos_bias.json (merged with the rows already there and those of --merge FILES)

It is a yardstick, not a method: the bias is set by hand for one prompt distribution, and it moves every
response's end alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

from run import DATA, EVAL, RANGES  # noqa: E402

from l3m.data import load_examples, split_heldout  # noqa: E402
from l3m.evaluation import bootstrap_ci, paired_difference, sample_responses, task_logppl, verdict  # noqa: E402
from l3m.logprobs import eos_token_ids  # noqa: E402
from l3m.models import load_causal_lm, load_tokenizer  # noqa: E402


def bias_end_tokens(model, ids: list[int], delta: float):
    """Subtract ``delta`` from the output logits of ``ids`` on every forward pass; returns the hook handle."""

    def hook(_module, _inputs, logits):
        logits[..., ids] -= delta
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def measure(model, tok, heldout, delta: float) -> dict:
    handle = bias_end_tokens(model, eos_token_ids(model, tok), delta)
    try:
        sampling = {key: EVAL[key] for key in ("k", "max_new_tokens", "temperature", "batch_size", "seed")}
        s = sample_responses(model, tok, heldout, **sampling, progress=False)  # as run.py evaluates every model
        ppl, body, end = task_logppl(model, tok, heldout, max_length=256, progress=False, split_end=True)
    finally:
        handle.remove()
    lengths = s.batch.lengths.float()
    per_prompt = lengths.view(-1, s.k).mean(1)  # the bootstrap resamples prompts, as `l3m evaluate` does
    lo, hi = bootstrap_ci(per_prompt)
    row = {
        "delta": delta,
        "mean_length": float(lengths.mean()),
        "mean_length_ci95": [lo, hi],
        "median_length": float(lengths.median()),
        "clipped": float((lengths >= EVAL["max_new_tokens"]).float().mean()),
        "logppl": float(ppl.mean()),
        "logppl_body": float(body.mean()),
        "end_nll": float(end.mean()),
        "logppl_per_example": ppl.tolist(),
        "verdicts": {},
    }
    for name, (l_min, l_max) in RANGES.items():  # the verdicts each range would give this model
        row["verdicts"][name] = [verdict(l_min - hi, l_min - lo), verdict(lo - l_max, hi - l_max)]
    return row


def plot(rows: list[dict], seeds_json: Path, out_png: Path) -> None:
    """Task log-perplexity against held-out mean length: the bias family as a curve, every L3M run as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["delta"] == 0.0)
    fig, ax = plt.subplots(figsize=(8, 5.6))
    colors = {"short": "tab:orange", "medium": "tab:green", "long": "tab:red"}
    for name, (lo, hi) in RANGES.items():
        ax.axvspan(lo, hi, color=colors[name], alpha=0.12, label=f"{name} range [{lo}, {hi}]")
    xs = [r["mean_length"] for r in rows]
    ys = [100 * (r["logppl"] / base["logppl"] - 1) for r in rows]
    ax.plot(xs, ys, "k-", lw=1.5, marker=".", label="SFT model, end-token logits lowered by δ (hand-set)")
    for r, x, y in zip(rows, xs, ys):
        if r["delta"] == 0 or abs(r["delta"]) >= 4:  # the small shifts crowd around the SFT model
            ax.annotate(f"δ={r['delta']:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if seeds_json.is_file():
        marker = {"sequence": "o", "stop": "s"}
        seen = set()
        for run in json.loads(seeds_json.read_text())["runs"]:
            rng = next(n for n, r in RANGES.items() if list(r) == run["range"])
            label = f"L3M, gradient: {run['gradient']}"
            ax.plot(
                run["mean_length"],
                100 * (run["ratio_to_sft"] - 1),
                marker=marker.get(run["gradient"], "D"),
                color=colors[rng],
                mec="black",
                ls="none",
                ms=7,
                label=None if label in seen else label,
            )
            seen.add(label)
    ax.axhline(10, color="grey", ls="--", lw=1, label="10% above SFT (the issue's target)")
    ax.set(
        xlabel="held-out mean response length (tokens; 150 prompts × 2 samples)",
        ylabel="task log-perplexity vs its SFT model (%)",
        title="What a length costs: a hand-set end-token bias on SFT against the trained L3Ms\n"
        "(each L3M point: one training seed, against that seed's SFT model)",
    )
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="lower center", ncol=3)  # below the axes: the points fill the plot
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "runs" / "length" / "sft"), help="the SFT model of the experiment")
    p.add_argument("--deltas", type=float, nargs="*", default=[0.0, 2.0, 4.0, 5.0, 6.0, 7.0])
    p.add_argument("--merge", nargs="*", default=[], help="also take the rows of these earlier outputs (parallel runs)")
    p.add_argument("--out", default=str(HERE / "results" / "eos_bias.json"))
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    tok = load_tokenizer(ns.model)
    model = load_causal_lm(ns.model)
    _, heldout = split_heldout(load_examples(str(DATA)), 0.2, seed=0)
    heldout = heldout[: EVAL["n_prompts"]]
    out_file = Path(ns.out)
    rows = {}
    for f in [out_file, *map(Path, ns.merge)]:
        if f.is_file():
            rows.update({r["delta"]: r for r in json.loads(f.read_text())["rows"]})
    for delta in ns.deltas:
        rows[delta] = measure(model, tok, heldout, delta)
        r = rows[delta]
        print(f"delta {delta:g}: mean length {r['mean_length']:.1f}, log-ppl {r['logppl']:.3f}", flush=True)
    rows = dict(sorted(rows.items()))
    base = rows.get(0.0)
    print("| delta | mean length [95% CI] | median | log-ppl | vs delta 0 | body text | end-token NLL | paired |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        d = paired_difference(r["logppl_per_example"], base["logppl_per_example"]) if base else None
        r["vs_delta0"] = d
        rel = f"{100 * (r['logppl'] / base['logppl'] - 1):+.1f}%" if base else "?"
        pair = f"{d['mean']:+.3f} ± {d['se']:.3f}" if d else ""
        ci = r["mean_length_ci95"]
        print(
            f"| {r['delta']:g} | {r['mean_length']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}] | {r['median_length']:.0f} | "
            f"{r['logppl']:.3f} | {rel} | {r['logppl_body']:.3f} | {r['end_nll']:.2f} | {pair} |"
        )
    out_file.write_text(
        json.dumps(
            {
                "what": "the SFT model with its end-token logits lowered by delta: held-out lengths and log-ppl",
                "model": ns.model,
                "eval": EVAL,
                "rows": list(rows.values()),
            },
            indent=1,
        )
    )
    if base:  # the plot is drawn relative to the unbiased model
        plot(list(rows.values()), HERE / "results" / "seeds.json", out_file.with_suffix(".png"))
    print(f"written {out_file} and {out_file.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
