"""Does the end token's tied input embedding carry the L3Ms' body-text cost?

Why: SmolLM2 ties its input and output embeddings, and its end-of-turn token ``<|im_end|>`` (the end token)
also closes the system and user turns of every prompt. Moving where a model stops is cheapest through the end
token's output row; with tied embeddings the same step moves that token's *input* embedding, which every
response then reads twice in its prompt. The yardstick (``eos_bias.py``) moves only the output logits and
leaves the text's log-perplexity where SFT has it; the length-constrained L3Ms pay +0-5% on the text.

The test is an intervention on trained models, no training: untie each model's embeddings, keep its output
rows, and put the end tokens' input rows back to those of the initial model (the one every model started
from). Then measure it as the experiment measures every model (``eos_bias.measure``: 150 held-out prompts x 2
samples, the references' log-perplexity split into text and end token), beside the unchanged model. If the
input row carries the body-text cost, the restored L3M's text costs less while its length stays; the SFT model
is the control (its input row moved for the task alone).

    .venv/bin/python experiments/length/tied_end_token.py runs/length/sft runs/length_shiftf3_seed0/l3m_medium \\
        -o experiments/length/results_shift_f1e-3/tied_end_token.json
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

from eos_bias import measure  # noqa: E402
from run import DATA, EVAL  # noqa: E402

from l3m.data import load_examples, split_heldout  # noqa: E402
from l3m.evaluation import paired_difference  # noqa: E402
from l3m.logprobs import eos_token_ids  # noqa: E402
from l3m.models import load_causal_lm, load_tokenizer  # noqa: E402


def row_change(trained: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Per vocabulary row, the relative change ||w - w0|| / ||w0|| of an embedding matrix."""
    return (trained - initial).norm(dim=1) / initial.norm(dim=1).clamp_min(1e-12)


def restore_input_rows(model, initial_embeddings: torch.Tensor, ids: list[int]) -> None:
    """Untie ``model``'s embeddings (its output rows stay as trained) and set the input rows of ``ids`` back."""
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if out.weight.data_ptr() == emb.weight.data_ptr():
        out.weight = torch.nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        emb.weight[ids] = initial_embeddings[ids]
    assert out.weight.data_ptr() != emb.weight.data_ptr()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="trained model directories (each trained from --initial)")
    p.add_argument("--initial", default="default", help="the model they all started from (default: SmolLM2)")
    p.add_argument("-o", "--out", help="write the rows as JSON here")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    initial = load_causal_lm(ns.initial)
    w0 = initial.get_input_embeddings().weight.detach().clone()
    tied = initial.get_output_embeddings().weight.data_ptr() == initial.get_input_embeddings().weight.data_ptr()
    del initial
    _, heldout = split_heldout(load_examples(str(DATA)), 0.2, seed=0)
    heldout = heldout[: EVAL["n_prompts"]]
    rows = []
    for path in ns.models:
        tok = load_tokenizer(path)
        model = load_causal_lm(path)
        ids = eos_token_ids(model, tok)
        change = row_change(model.get_input_embeddings().weight.detach(), w0)
        as_trained = measure(model, tok, heldout, 0.0)
        restore_input_rows(model, w0, ids)
        restored = measure(model, tok, heldout, 0.0)
        diff = paired_difference(restored["logppl_per_example"], as_trained["logppl_per_example"])
        row = {
            "model": path,
            "end_ids": ids,
            "end_row_change": [float(change[i]) for i in ids],
            "median_row_change": float(change.median()),
            "end_row_change_rank": [int((change > change[i]).sum()) + 1 for i in ids],
            "as_trained": as_trained,
            "end_input_rows_restored": restored,
            "restored_minus_trained": diff,
        }
        rows.append(row)
        for label, r in (("as trained", as_trained), ("end input rows restored", restored)):
            print(
                f"{path} {label}: mean length {r['mean_length']:.1f}, log-ppl {r['logppl']:.3f} "
                f"(text {r['logppl_body']:.3f}, end {r['end_nll']:.2f})",
                flush=True,
            )
        print(
            f"  end row change {row['end_row_change']} (median row {row['median_row_change']:.4f}, rank "
            f"{row['end_row_change_rank']}); restored - trained {diff['mean']:+.3f} ± {diff['se']:.3f}"
        )
    print("| model | end input row change (median row) | version | mean length [95% CI] | log-ppl | text | end NLL |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for label in ("as_trained", "end_input_rows_restored"):
            r = row[label]
            ci = r["mean_length_ci95"]
            print(
                f"| {row['model']} | {row['end_row_change'][0]:.3f} ({row['median_row_change']:.4f}) | {label} | "
                f"{r['mean_length']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}] | {r['logppl']:.3f} | {r['logppl_body']:.3f} | "
                f"{r['end_nll']:.2f} |"
            )
    if ns.out:
        Path(ns.out).write_text(
            json.dumps({"what": __doc__.split("\n")[0], "initial": ns.initial, "tied": tied, "rows": rows}, indent=1)
        )
        print(f"written {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
