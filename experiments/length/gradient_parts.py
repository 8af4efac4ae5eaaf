"""How much of each update the task loss gets: the length experiment's gradients split into task and constraints.

Every L3M step's gradient is g = g_T + g_C: the task loss's and the constraints' score-function surrogate's
(sum_i lambda_i grad C_i, estimated from the step's 32 samples). The optimiser clips g to norm 1 and Adam
normalises it per coordinate, so what moves the task loss is the task's share of g. A run trained with
``log_gradient_parts: true`` logs both norms, their cosine and that share (``grad_parts/*`` in metrics.jsonl);
this summarises them per model and phase of training and plots them:

    .venv/bin/python experiments/length/gradient_parts.py [RESULTS_DIR]   # default experiments/length/results

It reads ``RESULTS_DIR/runs/<model>/metrics.jsonl`` and writes ``gradient_parts.{json,md,png}`` beside them.
The SFT run has no samples, so its row gives the task gradient's norm alone (transformers' ``grad_norm``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ((1, 20), (21, 40), (41, 60))
KEYS = ("task_norm", "constraints_norm", "cosine", "task_share")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _median(vals: list[float]) -> float:
    v = sorted(vals)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def summarise(rows: list[dict]) -> dict:
    """Per phase of training (steps 1-20, 21-40, 41-60): medians of the norms (a few infeasible steps, with
    lambda = 1/(m mu) up to 50, have norms in the thousands and would swamp a mean), the mean of the task's share,
    and how many steps gave the task less than a tenth of the update (steps spent on the constraints)."""
    out = {}
    for lo, hi in PHASES:
        part = [r for r in rows if lo <= r.get("step", 0) <= hi and "grad_norm" in r]
        if not part:
            continue
        cell = {"steps": len(part), "grad_norm_median": _median([r["grad_norm"] for r in part])}
        if all("grad_parts/task_share" in r for r in part):
            for key in ("task_norm", "constraints_norm", "cosine"):
                cell[f"{key}_median"] = _median([r[f"grad_parts/{key}"] for r in part])
            shares = [r["grad_parts/task_share"] for r in part]
            cell["task_share_mean"] = sum(shares) / len(shares)
            cell["steps_task_share_below_0.1"] = sum(x < 0.1 for x in shares)
        out[f"{lo}-{hi}"] = cell
    return out


def markdown(summary: dict) -> str:
    lines = [
        "| model | steps | whole gradient norm, median (before clipping) | task gradient, median "
        "| constraints' gradient, median | cosine, median | task's share of the whole, mean "
        "| steps where the task's share < 0.1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, phases in summary.items():
        for phase, c in phases.items():
            if "task_share_mean" in c:
                cells = [f"{c['task_norm_median']:.1f}", f"{c['constraints_norm_median']:.1f}"]
                cells += [f"{c['cosine_median']:+.2f}", f"{c['task_share_mean']:.2f}"]
                cells.append(f"**{c['steps_task_share_below_0.1']}** of {c['steps']}")
            else:  # SFT: the whole gradient is the task's
                cells = [f"{c['grad_norm_median']:.1f}", "—", "—", "1", f"0 of {c['steps']}"]
            lines.append(f"| {model} | {phase} | {c['grad_norm_median']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for model, rows in runs.items():
        rows = [r for r in rows if "grad_norm" in r]
        steps = [r["step"] for r in rows]
        if rows and "grad_parts/task_share" in rows[-1]:
            col = next(colours)
            a.plot(steps, [r["grad_parts/task_share"] for r in rows], marker=".", color=col, label=model)
            b.plot(steps, [r["grad_parts/constraints_norm"] for r in rows], color=col, label=f"{model}: g_C")
            b.plot(steps, [r["grad_parts/task_norm"] for r in rows], color=col, ls=":", label=f"{model}: g_T")
        else:
            b.plot(steps, [r["grad_norm"] for r in rows], color="k", lw=1, label=f"{model}: g_T")
    a.axhline(1, color="k", lw=1, ls="--")
    a.text(1, 0.97, "SFT: the whole update is the task's", va="top", fontsize=8)
    a.set(xlabel="optimiser step", ylabel="|g_T| / |g_T + g_C|", ylim=(0, 1.15))
    a.set_title("The task loss's share of each step's gradient", fontsize=10)
    a.legend(fontsize=8)
    b.set_yscale("log")
    b.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    b.set(xlabel="optimiser step", ylabel="gradient norm (before clipping to 1)")
    b.set_title("Task gradient g_T (dotted) and constraints' g_C (solid)", fontsize=10)
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0]) if argv else HERE / "results"
    runs = {d.name: read_rows(d) for d in sorted((results / "runs").glob("*")) if (d / "metrics.jsonl").is_file()}
    if not runs:
        print(f"no runs/<model>/metrics.jsonl under {results}", file=sys.stderr)
        return 1
    if not any("grad_parts/task_share" in r for rows in runs.values() for r in rows):
        print(f"the runs under {results} were not trained with log_gradient_parts: true", file=sys.stderr)
        return 1
    summary = {model: summarise(rows) for model, rows in runs.items()}
    (results / "gradient_parts.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "gradient_parts.md").write_text(markdown(summary))
    plot(runs, results / "gradient_parts.png")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
