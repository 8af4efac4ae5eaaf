"""Where does a model's length change sit? The shift of the stop decision's log-odds, at the references' ends and
inside their text.

Why: the medium L3Ms pay most of their extra log-perplexity in the end token after the references' text, more
than the yardstick (the SFT model with a uniform end-token bias δ, ``eos_bias.py``) pays at the same mean length.
A uniform bias moves the log-odds of stopping by −δ at every position. This script measures how an L3M moved
them instead: for each held-out reference and each response position, the log-odds of stopping,
``log P(stop) − log(1 − P(stop))`` (P(stop) = the probability of any end token), under each model and under the
first model (the SFT model), and their difference, averaged at the positions where the reference ends and at the
positions inside its text (split further by how likely the SFT model was to stop there).

    .venv/bin/python experiments/length/stop_shift.py runs/length/sft runs/length/l3m_medium ...
    # prints a table; -o FILE writes it as JSON
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

from run import DATA, EVAL  # noqa: E402

from l3m.data import load_examples, pad, split_heldout, tokenize_examples  # noqa: E402
from l3m.logprobs import eos_token_ids  # noqa: E402
from l3m.models import load_causal_lm, load_tokenizer  # noqa: E402

# bins of the SFT model's stop probability at a position inside the text
BINS = [(0.0, 0.01), (0.01, 0.1), (0.1, 1.0)]


def stop_log_odds(logits: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """log P(stop) − log P(go) per position, from next-token logits [..., vocab]; stop = any of ``end_ids``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    stop = torch.logsumexp(logp[..., end_ids], dim=-1)
    go = torch.log1p(-stop.exp().clamp(max=1 - 1e-7))
    return stop - go


@torch.no_grad()
def response_log_odds(model, tok, examples, end_ids: list[int], batch_size: int = 10) -> list[torch.Tensor]:
    """Per example, the stop log-odds at each position that predicts a response token (the last is the end)."""
    feats = tokenize_examples(tok, list(examples), max_length=256, what="held-out data")
    model.eval()
    out = []
    for i in range(0, len(feats), batch_size):
        chunk = feats[i : i + batch_size]
        ids = pad([f["input_ids"] for f in chunk], tok.pad_token_id)
        attn = pad([[1] * len(f["input_ids"]) for f in chunk], 0)
        mask = pad([f["response_mask"] for f in chunk], 0)[:, 1:].bool()
        lo = stop_log_odds(model(input_ids=ids, attention_mask=attn).logits[:, :-1], end_ids)
        out += [lo[j][mask[j]] for j in range(len(chunk))]
    return out


def shift_summary(base: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Mean log-odds shift (other − base) at the references' last position (their end token) and inside the text,
    the latter also per bin of the base model's stop probability."""
    end = torch.stack([o[-1] - b[-1] for b, o in zip(base, other, strict=True)])
    inner_b = torch.cat([b[:-1] for b in base])
    inner_d = torch.cat([o[:-1] - b[:-1] for b, o in zip(base, other, strict=True)])
    p = torch.sigmoid(inner_b)
    bins = []
    for lo, hi in BINS:
        sel = (p >= lo) & (p < hi)
        n = int(sel.sum())
        bins.append({"p_stop_sft": [lo, hi], "positions": n, "shift": float(inner_d[sel].mean()) if n else None})
    return {
        "end_shift": float(end.mean()),
        "end_shift_sd": float(end.std()),
        "inner_shift": float(inner_d.mean()),
        "inner_positions": int(inner_d.numel()),
        "inner_by_sft_p_stop": bins,
        "end_p_stop": float(torch.sigmoid(torch.stack([o[-1] for o in other])).mean()),
        # -log P(stop) at the references' ends, and what the same mean shift would cost if it were uniform
        "end_stop_nll": float(torch.nn.functional.softplus(-torch.stack([o[-1] for o in other])).mean()),
        "end_stop_nll_uniform_shift": float(
            torch.nn.functional.softplus(-(torch.stack([b[-1] for b in base]) + end.mean())).mean()
        ),
    }


def plot(rows: dict, labels: dict, path: str) -> None:
    """Grouped bars: each model's mean log-odds shift at the references' ends and inside the text per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["at the reference's end"] + [f"inside the text,\nSFT P(stop) in [{lo}, {hi})" for lo, hi in BINS]
    models = [m for m in rows if rows[m]["end_shift"] != 0 or rows[m]["inner_shift"] != 0]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        r = rows[m]
        vals = [r["end_shift"]] + [b["shift"] or 0.0 for b in r["inner_by_sft_p_stop"]]
        ax.bar([g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))], vals, width, label=labels[m])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("shift of log P(stop) / P(go) against SFT")
    ax.set_title("Where each model moved its stop decision (a uniform end-token bias δ moves every bar to −δ)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model directories; the first is the reference (the SFT model)")
    ap.add_argument("-o", "--output", help="write the numbers as JSON here")
    ap.add_argument("--plot", help="draw the shifts as a PNG here")
    ap.add_argument("--labels", nargs="+", help="a name per model for the plot (default: the paths)")
    ns = ap.parse_args(argv)
    torch.set_num_threads(2)
    _, heldout = split_heldout(load_examples(str(DATA)), 0.2, seed=0)
    heldout = heldout[: EVAL["n_prompts"]]
    tok = load_tokenizer(ns.models[0])
    per_model = {}
    for path in ns.models:
        model = load_causal_lm(path)
        per_model[path] = response_log_odds(model, tok, heldout, eos_token_ids(model, tok))
        del model
    base = per_model[ns.models[0]]
    rows = {path: shift_summary(base, lo) for path, lo in per_model.items()}
    head = (
        "| model | P(stop) at the reference's end | -log P(stop) there | the same mean shift, uniform | "
        "shift there (± sd) | shift inside the text | "
        + " | ".join(f"inside, SFT P(stop) in [{lo}, {hi})" for lo, hi in BINS)
    )
    print(head + " |")
    print("|---" * (6 + len(BINS)) + "|")
    for path, r in rows.items():
        bins = " | ".join(
            "—" if b["shift"] is None else f"{b['shift']:+.2f} ({b['positions']})" for b in r["inner_by_sft_p_stop"]
        )
        print(
            f"| {path} | {r['end_p_stop']:.3f} | {r['end_stop_nll']:.2f} | {r['end_stop_nll_uniform_shift']:.2f} | "
            f"{r['end_shift']:+.2f} ± {r['end_shift_sd']:.2f} | {r['inner_shift']:+.2f} | {bins} |"
        )
    if ns.plot:
        plot(rows, dict(zip(ns.models, ns.labels or ns.models, strict=True)), ns.plot)
    if ns.output:
        Path(ns.output).write_text(json.dumps({"reference": ns.models[0], "models": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
