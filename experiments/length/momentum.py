"""Did Adam's momentum drive the length's swings across the range? (stop 23)

Each step's λ_i jumps between ~0 (the step's estimate of C_i feasible) and up to 1/(mμ) (infeasible), and each
clipped update in an infeasible step points along the constraint's gradient. The hypothesis tested: Adam's first
moment is a mean over the last ~1/(1 − β1) updates (10 at the default β1 = 0.9), so after the samples come back
inside the range the optimiser keeps pushing the same way for several more steps, the length overshoots to the
other side, and the cycle repeats; a shorter memory (β1 = 0.5) should swing less. (Measured: it did not, on
average; see the README.) This draws, for runs of the same model with different settings, the mean
length of the training samples per step with the range shaded, and counts what each run spent on its constraints:

    .venv/bin/python experiments/length/momentum.py -o experiments/length/results_beta1_0.5/momentum \\
        "β1 0.9, seed 0=experiments/length/results_beta1_0.9/runs/l3m_medium" \\
        "β1 0.5, seed 0=experiments/length/results_beta1_0.5/runs/l3m_medium" ...

Writes ``OUT.png`` and ``OUT.json``: per run the steps whose largest λ_i exceeded 1 (an update that is, after
clipping, nearly all constraint), those among the last third of the steps (the ones the saved model averages),
the highest and lowest 5-step mean of the sampled length after step 10, and the steps that mean spent outside
the range.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))


def summarise(rows: list[dict], lo: float, hi: float) -> dict:
    """What one run spent on its constraints; ``rows`` are the steps of its metrics.jsonl."""
    from l3m.report import moving_average

    lam = [max((v for k, v in r.items() if k.endswith("/lambda")), default=0.0) for r in rows]
    lengths = [r["sample/mean_length"] for r in rows]
    smooth = moving_average(lengths, 5)
    tail = len(rows) - round(len(rows) / 3)
    late = smooth[10:]
    return {
        "steps": len(rows),
        "steps_lambda_above_1": sum(x > 1 for x in lam),
        "tail_steps_lambda_above_1": sum(x > 1 for x in lam[tail:]),
        "highest_5step_mean_length_after_step_10": max(late),
        "lowest_5step_mean_length_after_step_10": min(late),
        "steps_5step_mean_outside_range_after_step_10": sum(not lo <= x <= hi for x in late),
        "mean_sample_length_last_third": sum(lengths[tail:]) / (len(rows) - tail),
    }


def main(argv: list[str] | None = None) -> int:
    from l3m.report import read_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR", help="a run folder with metrics.jsonl, and its label")
    p.add_argument("--range", nargs=2, type=float, default=(20.0, 30.0), metavar=("L_MIN", "L_MAX"))
    p.add_argument("-o", "--output", required=True, help="output path without extension (.png and .json)")
    ns = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from l3m.report import moving_average

    lo, hi = ns.range
    out, runs = {}, []
    for item in ns.runs:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"expected LABEL=RUN_DIR, got {item!r}")
        rows = [r for r in read_metrics(path) if "sample/mean_length" in r]
        out[label] = {"run": path, **summarise(rows, lo, hi)}
        runs.append((label, rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.axhspan(lo, hi, color="green", alpha=0.12, label=f"range [{lo:g}, {hi:g}]")
    # one line style per setting (the label before its first comma), one colour per what follows (e.g. the seed)
    settings = list(dict.fromkeys(label.split(",")[0] for label, _ in runs))
    others = list(dict.fromkeys(label.partition(",")[2] for label, _ in runs))
    for label, rows in runs:
        style = ("-", "--", ":", "-.")[settings.index(label.split(",")[0]) % 4]
        colour = f"C{others.index(label.partition(',')[2]) % 10}"
        xs = [r["step"] for r in rows]
        ax.plot(xs, moving_average([r["sample/mean_length"] for r in rows], 5), style, color=colour, label=label)
    ax.set(
        xlabel="optimiser step",
        ylabel="mean length of the training samples (tokens, 5-step mean)",
        title="The training samples' mean length around the range, per run",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(f"{ns.output}.png", dpi=110)
    Path(f"{ns.output}.json").write_text(json.dumps(out, indent=1))
    for label, s in out.items():
        print(
            f"{label}: λ>1 in {s['steps_lambda_above_1']} steps ({s['tail_steps_lambda_above_1']} in the last third); "
            f"5-step mean after step 10 from {s['lowest_5step_mean_length_after_step_10']:.1f} to "
            f"{s['highest_5step_mean_length_after_step_10']:.1f}, outside the range in "
            f"{s['steps_5step_mean_outside_range_after_step_10']} steps"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
