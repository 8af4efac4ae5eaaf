"""``l3m report``: PNG plots and one Markdown page from training runs and ``l3m evaluate`` results.

* training curves from each run's ``metrics.jsonl``: task NLL, each C_i, each lambda_i, mu (and the
  mean sampled length) over the optimiser steps;
* the relaxed log-barrier for several mu (the paper's Figure 1);
* per evaluated model, a box plot of its held-out response lengths with the [min, max] range it was
  constrained to, and its task log-perplexity (mean ± std) beside its mean length (the paper's Figure 2),
  each against the first model given (the baseline: put the SFT model first), as a ratio and a paired difference.

Every figure has a title, axis labels with units and a legend, and a caption line in the Markdown.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from l3m.barrier import relaxed_log_barrier  # noqa: E402
from l3m.errors import L3MUserError  # noqa: E402
from l3m.evaluation import paired_difference  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl`` that carry training metrics (one per logging step)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        raise L3MUserError(f"run directory '{run_dir}' has no metrics.jsonl (is it an l3m training run?)")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise L3MUserError(f"{p}:{i}: malformed JSON line") from None
        if "task_nll" in row or "loss" in row:
            rows.append(row)
    return rows


def averaged_steps(run_dir: str | os.PathLike) -> int:
    """How many last iterates the run's saved model averages (``average_tail``; 0 = the last iterate)."""
    p = Path(run_dir) / "summary.json"
    try:
        return int(json.loads(p.read_text()).get("weights_averaged") or 0) if p.is_file() else 0
    except (json.JSONDecodeError, TypeError, ValueError):
        return 0


def run_barrier_s_power(run_dir: str | os.PathLike) -> float:
    """The barrier's ``s = mu**p`` power a run trained with: ``barrier_s_power`` of an experimental run (``method:
    experimental``), read from the run's config as its model card records it; 2, the paper's, for any other run."""
    from l3m.model_card import read_card

    meta, _ = read_card(Path(run_dir))
    info = meta.get("l3m") if isinstance(meta.get("l3m"), dict) else {}
    training = info.get("training") if isinstance(info.get("training"), dict) else {}
    power = training.get("barrier_s_power", 2.0)
    return float(power) if isinstance(power, (int, float)) and not isinstance(power, bool) else 2.0


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def constraint_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith("constraints/") and k.endswith("/value"):
                n = k[len("constraints/") : -len("/value")]
                if n not in names:
                    names.append(n)
    return names


def moving_average(ys: Sequence[float], window: int = 5) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _noisy(ax, xs: list[float], ys: list[float], col: str, name: str, window: int = 5) -> None:
    """A per-step series that is mostly sampling noise: faint, with its moving average drawn bold."""
    if not xs:
        return
    ax.plot(xs, ys, color=col, lw=0.8, alpha=0.35)
    ax.plot(xs, moving_average(ys, window), color=col, lw=2, label=f"{name} ({window}-step mean)")


def plot_training(
    runs: Mapping[str, list[dict]],
    path: str | os.PathLike,
    length_ranges: Mapping[str, Sequence[float]] | None = None,
    averaged: Mapping[str, int] | None = None,
    title: str | None = None,
) -> Path:
    """Training curves of several runs: task NLL, mean sampled length, C_i, lambda_i, mu (``title``: added to
    the figure's title).

    ``length_ranges`` (run name -> [l_min, l_max]) shades each run's length range on the length panel;
    ``averaged`` (run name -> n) marks the last n steps, whose weights the saved model averages (``average_tail``).
    """
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ax_nll, ax_len, ax_mu, ax_c, ax_lam, ax_obj = axes.flatten()
    linestyles = ["-", "--", ":", "-."]
    for j, (name, rows) in enumerate(runs.items()):
        col = COLORS[j % len(COLORS)]
        _noisy(ax_nll, *_series(rows, "task_nll"), col, name)
        xs, ys = _series(rows, "sample/mean_length")
        if xs:
            _noisy(ax_len, xs, ys, col, name)
            if length_ranges and name in length_ranges:
                lo, hi = length_ranges[name]
                ax_len.axhspan(lo, hi, color=col, alpha=0.1, lw=0)
        ax_mu.plot(*_series(rows, "mu"), color=col, label=name)
        xs, ys = _series(rows, "objective")
        if xs:
            ax_obj.plot(xs, ys, color=col, label=name)
        for i, c in enumerate(constraint_names(rows)):
            ls = linestyles[i % len(linestyles)]
            ax_c.plot(*_series(rows, f"constraints/{c}/value"), color=col, ls=ls, label=f"{name}: {c}")
            ax_lam.plot(*_series(rows, f"constraints/{c}/lambda"), color=col, ls=ls, label=f"{name}: {c}")
    ax_nll.set(
        title="Task loss on the training batches", xlabel="optimiser step", ylabel="task NLL (nats per response token)"
    )
    ax_len.set(
        title="Mean length of the responses sampled in training\n(shaded: each L3M's range, in its colour)",
        xlabel="optimiser step",
        ylabel="mean response length (tokens)",
    )
    ax_mu.set(title="Barrier parameter μ (decays each step)", xlabel="optimiser step", ylabel="μ", yscale="log")
    ax_c.axhline(0, color="black", lw=1)
    ax_c.set(
        title="Constraint estimates C_i (feasible when ≤ 0)",
        xlabel="optimiser step",
        ylabel="C_i (constraint units, after scale)",
    )
    ax_lam.set(title="Lagrange multipliers λ_i = B'(C_i)/m", xlabel="optimiser step", ylabel="λ_i", yscale="log")
    ax_obj.set(
        title="Objective G_μ = task NLL + mean barrier",
        xlabel="optimiser step",
        ylabel="G_μ (nats; symmetric log scale)",
        yscale="symlog",
    )
    windows = sorted({n for n in (averaged or {}).values() if n})
    if len(windows) == 1:  # one window shared by every run that averages (the usual case: same steps, same setting)
        last = max((r[-1]["step"] for r in runs.values() if r), default=0)
        for ax in (ax_nll, ax_len):
            ax.axvspan(last - windows[0] + 0.5, last + 0.5, color="grey", alpha=0.12, lw=0)
        ax_len.text(
            last - windows[0] / 2,
            0.98,
            f"saved model = mean of\nthese {windows[0]} steps' weights",
            transform=ax_len.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=7,
            color="dimgrey",
        )
    for ax in axes.flatten():
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no constrained run", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(
        "Training curves (one colour per run; solid/dashed = first/second constraint)" + (f": {title}" if title else "")
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_barrier(path: str | os.PathLike, mus: Sequence[float] = (1.0, 0.5, 0.3, 0.1), s_power: float = 2.0) -> Path:
    """The relaxed log-barrier B_{mu, mu^2}(z) for several mu (the paper's Figure 1); with ``s_power`` p other
    than 2 (``barrier_s_power`` of :mod:`l3m.experimental`), also B_{mu, mu^p}, dashed: the barrier the runs used."""
    import torch

    z = torch.linspace(-2.0, 0.5, 1001, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for j, mu in enumerate(mus):
        ax.plot(z, relaxed_log_barrier(z, mu), color=COLORS[j], label=f"μ = {mu:g} (s = μ² = {mu * mu:.3g})")
        s = mu * mu
        ax.plot([-s], [relaxed_log_barrier(-s, mu)], "o", color=COLORS[j], ms=4)
        if s_power != 2:
            s = mu**s_power
            ax.plot(z, relaxed_log_barrier(z, mu, s), color=COLORS[j], ls="--", lw=1.2)
            ax.plot([-s], [relaxed_log_barrier(-s, mu, s)], "s", color=COLORS[j], ms=4)
    ax.plot([-2.0, 0, 0], [0, 0, 4.0], color="black", lw=1.5, ls=":", label="limit μ → 0: 0 if z ≤ 0, +∞ beyond")
    if s_power != 2:
        ax.plot([], [], color="grey", ls="--", label=f"dashed: s = μ^{s_power:g}, the runs' barrier (squares: −s)")
    ax.axvline(0, color="black", lw=1, ls="--", label="constraint boundary z = 0")
    ax.axvspan(-2.0, 0, color="green", alpha=0.06, label="feasible (z ≤ 0)")
    ax.set(
        xlim=(-2.0, 0.5),
        ylim=(-1.0, 4.0),
        xlabel="constraint value z = C_i",
        ylabel="barrier value B_μ(z)",
        title="Relaxed log-barrier: −μ log(−z) for z ≤ −μ², linear beyond (dots)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _length_range(ev: dict) -> tuple[float | None, float | None] | None:
    """The [l_min, l_max] a model was constrained to: the ``range`` field, else its length constraints."""
    if "range" in ev:  # set by an experiment: None means "trained without a length constraint"
        return tuple(ev["range"]) if ev["range"] else None
    lo = hi = None
    for c in ev.get("constraints") or []:
        if c.get("kind") == "length":
            if c.get("direction") == "at_least":
                lo = c["threshold"]
            elif c.get("direction") == "at_most":
                hi = c["threshold"]
    return (lo, hi) if lo is not None or hi is not None else None


def against_first(evals: Sequence[dict]) -> list[dict]:
    """Each model's task log-perplexity against the first model's (the baseline, e.g. SFT; put it first).

    The std over examples (the error bars) is several times any difference between models, so what a reader
    needs is the difference itself: the ratio of the means and, where both models scored the same references
    (``per_example`` of equal length), the mean paired difference with its standard error.
    """
    if len(evals) < 2 or not evals[0].get("task_logppl"):
        return []
    ref = evals[0]["task_logppl"]
    rows = []
    for e in evals[1:]:
        t = e.get("task_logppl")
        if not t or not ref["mean"]:
            continue
        row = {"model": e["model"], "against": evals[0]["model"], "ratio": t["mean"] / ref["mean"]}
        paired = paired_difference(t.get("per_example"), ref.get("per_example"))
        if paired:
            row.update(paired_diff=paired["mean"], paired_se=paired["se"])
        rows.append(row)
    return rows


def against_first_table(evals: Sequence[dict]) -> str:
    """The Markdown table of ``against_first`` ('' when there is nothing to compare)."""
    rows = against_first(evals)
    if not rows:
        return ""
    ref = rows[0]["against"]
    out = [
        f"| model | log-ppl / {ref}'s | minus {ref}'s, paired per reference (± s.e., nats per token) |",
        "|---|---|---|",
    ]
    for r in rows:
        paired = f"{r['paired_diff']:+.3f} ± {r['paired_se']:.3f}" if "paired_diff" in r else "—"
        out.append(f"| {r['model']} | {r['ratio']:.3f} ({r['ratio'] - 1:+.1%}) | {paired} |")
    return "\n".join(out)


def plot_length_histograms(
    lengths: Mapping[str, Sequence[int]],
    path: str | os.PathLike,
    cap: int | None = None,
    ranges: Mapping[str, Sequence[float]] | None = None,
    title: str = "Response lengths per model",
) -> Path:
    """One histogram of response lengths per model, with its range (green) and the sampling cap (red, dashed) and the
    share of responses cut off there in each title: a mean inside a range can hide answers that run to the cap."""
    names = [m for m in lengths if len(lengths[m])]
    if not names:
        raise L3MUserError("no sampled response lengths to plot")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharex=True)
    top = int(cap or max(max(v) for v in lengths.values() if len(v)))
    for ax, m in zip(axes.flat, names):
        ax.hist(lengths[m], bins=range(0, top + 2), color="#7a9cc6")
        for b in (ranges or {}).get(m) or ():
            ax.axvline(b, color="darkgreen", lw=1.5)
        if cap:
            share = sum(v >= cap for v in lengths[m]) / len(lengths[m])
            ax.axvline(cap, color="red", ls="--", lw=1.2)
            ax.set_title(f"{m}: cut off at the cap {share:.0%}", fontsize=9)
        else:
            ax.set_title(m, fontsize=9)
        ax.set_xlabel("length (tokens)", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{title}; green: its range, red dashed: the sampling cap")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def length_boxes(ax, data: Sequence[Sequence[int]], pos: Sequence[int]) -> None:
    """Response lengths as box plots (box: quartiles, black line: median, red diamond: mean, whiskers: min-max)."""
    ax.boxplot(
        data,
        positions=pos,
        whis=(0, 100),
        widths=0.5,
        showmeans=True,
        patch_artist=True,
        boxprops={"facecolor": "#dde6f3"},
        medianprops={"color": "black"},
        meanprops={"marker": "D", "markerfacecolor": "red", "markeredgecolor": "red", "markersize": 6},
    )


def plot_lengths_and_perplexity(evals: Sequence[dict], path: str | os.PathLike) -> Path:
    """The paper's Figure 2: response-length box plots with the constraint range, and task log-ppl."""
    evals = [e for e in evals if (e.get("lengths") or {}).get("values")]
    if not evals:
        raise L3MUserError("no evaluation with sampled response lengths to plot")
    names = [e["model"] for e in evals]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    data = [e["lengths"]["values"] for e in evals]
    pos = list(range(1, len(evals) + 1))
    length_boxes(ax, data, pos)
    drew_range = False
    for p, e in zip(pos, evals):
        rng = _length_range(e)
        if rng:
            for b in rng:
                if b is not None:
                    ax.hlines(
                        b,
                        p - 0.38,
                        p + 0.38,
                        colors="darkgreen",
                        lw=2.5,
                        label=None if drew_range else "constraint range [l_min, l_max]",
                    )
                    drew_range = True
        # to the right of the range bars (which span p ± 0.38), on white, so a bar at the same height never hides it
        ax.annotate(
            f"{e['lengths']['mean']:.1f}",
            (p + 0.41, e["lengths"]["mean"]),
            color="red",
            fontsize=8,
            va="center",
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.9},
        )
    cap = evals[0].get("max_new_tokens")
    if cap:
        ax.axhline(cap, color="grey", ls=":", lw=1, label=f"sampling cap ({cap} new tokens)")
    ax.plot([], [], "D", color="red", label="mean length")
    ax.plot([], [], color="black", label="median (box: quartiles, whiskers: min–max)")
    ax.set_xticks(pos, names, rotation=15)
    n_info = f"{evals[0].get('n_prompts', '?')} held-out prompts × {evals[0].get('k', '?')} samples"
    ax.set(ylabel="response length (tokens)", title=f"Response lengths ({n_info})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    ppl = [
        (e["task_logppl"]["mean"], e["task_logppl"]["std"]) if e.get("task_logppl") else (math.nan, 0.0) for e in evals
    ]
    ax2.errorbar(
        pos,
        [m for m, _ in ppl],
        yerr=[s for _, s in ppl],
        fmt="o",
        capsize=5,
        color="navy",
        label="mean ± std over held-out examples",
    )
    rel = {r["model"]: r["ratio"] for r in against_first(evals)}
    if rel and math.isfinite(ppl[0][0]):
        ax2.axhline(ppl[0][0], color="grey", ls=":", lw=1, label=f"{names[0]}'s mean (the % are against it)")
    for p, (m, _s), e in zip(pos, ppl, evals):
        if math.isfinite(m):
            vs = f" ({rel[e['model']] - 1:+.1%})" if e["model"] in rel else ""
            ax2.annotate(f"{m:.3f}{vs}\n(len {e['lengths']['mean']:.0f})", (p + 0.12, m), fontsize=8, va="center")
    ax2.set_xticks(pos, names, rotation=15)
    ax2.set_xlim(0.5, len(pos) + 0.7)
    n_ppl = next((e["task_logppl"]["n"] for e in evals if e.get("task_logppl")), "?")
    ax2.set(
        ylabel="task log-perplexity (nats per response token)",
        title=f"Task log-perplexity on {n_ppl} held-out references",
    )
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle("Held-out response lengths against each model's length constraint, and the cost in task loss")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_evaluations(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Evaluation dicts from ``l3m evaluate -o`` JSON files (``{"results": [...]}``) or an experiment's
    ``results.json`` (``{"evaluations": [...]}``)."""
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise L3MUserError(f"evaluation file '{p}' does not exist")
        try:
            doc = json.loads(Path(p).read_text())
        except json.JSONDecodeError as exc:
            raise L3MUserError(f"{p}: not JSON ({exc.msg}, line {exc.lineno})") from None
        items = doc.get("results", doc.get("evaluations")) if isinstance(doc, dict) else doc
        if not isinstance(items, list):
            raise L3MUserError(f"{p}: expected the JSON that `l3m evaluate -o` writes (a 'results' list)")
        out.extend(items)
    return out


def make_report(
    run_dirs: Sequence[str | os.PathLike],
    evals: Sequence[dict],
    out_dir: str | os.PathLike,
    ranges: Mapping[str, Sequence[float]] | None = None,
    title: str = "l3m report",
    reward_results: Sequence[Mapping] = (),
    barrier_s_power: float | None = None,
) -> Path:
    """Write the PNGs and ``report.md`` into ``out_dir``; returns the Markdown file.

    ``reward_results``: results of reward-constrained experiments (``points`` and ``models``, as the
    helpful-and-harmless experiment writes them), each drawn as the paper's Figure 3. ``barrier_s_power``: the
    runs' ``barrier_s_power`` (default: read from the runs' configs, 2 where they have none); other than the
    paper's 2, the barrier figure draws theirs beside the paper's.
    """
    from l3m.evaluation import markdown_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    if runs:
        spans = {n: ranges[n.removeprefix("l3m_")] for n in runs if ranges and n.removeprefix("l3m_") in ranges}
        averaged = {Path(d).name: averaged_steps(d) for d in run_dirs}
        plot_training(runs, out / "training_curves.png", spans, averaged)
        names = ", ".join(f"`{n}` ({len(r)} steps)" for n, r in runs.items())
        md += [
            "## Training curves",
            "",
            "![training curves](training_curves.png)",
            "",
            f"*Figure: training curves of {names}. Task NLL is the mean negative log-likelihood per reference "
            "response token on each step's training batch; it and the mean sampled length are drawn per step "
            "(faint) and as a 5-step moving average (bold), since each step sees only a few examples; "
            "C_i is the estimate of each constraint from the "
            "step's sampled responses (feasible when ≤ 0; for a length range, C = (l_min − mean length)/scale "
            "and (mean length − l_max)/scale); λ_i is the Lagrange multiplier the barrier assigns it (large "
            "when violated, falling toward 0 as μ decays when it holds); μ decays exponentially."
            + (
                " Grey band: the last steps, whose weights the saved model averages (`average_tail`).*"
                if any(averaged.values())
                else "*"
            ),
            "",
        ]
    which = ""
    if barrier_s_power is None:
        used = {Path(d).name: run_barrier_s_power(d) for d in run_dirs}
        others = [p for p in dict.fromkeys(used.values()) if p != 2]
        barrier_s_power = others[0] if others else 2.0
        names = [n for n, p in used.items() if p == barrier_s_power]
        if others and len(names) < len(used):
            which = "runs " + ", ".join(f"`{n}`" for n in names)
    plot_barrier(out / "barrier.png", s_power=barrier_s_power)
    own = (
        ""
        if barrier_s_power == 2
        else f" Dashed: the barrier {which or 'these runs'} used, s = μ^{barrier_s_power:g} (`barrier_s_power`); "
        "its slope past "
        f"−s, the multiplier of a violated constraint times m, is μ^{1 - barrier_s_power:g}"
        + (" = 1 at every μ: a bounded push instead of a wall." if barrier_s_power == 1 else ".")
    )
    md += [
        "## The relaxed log-barrier",
        "",
        "![relaxed log-barrier](barrier.png)",
        "",
        "*Figure (paper Figure 1): B_μ(z) = −μ log(−z) for z ≤ −s and its linear continuation beyond, with "
        "s = μ². As μ → 0 it tends to 0 on the feasible side and to +∞ past the boundary; unlike a plain "
        "log-barrier it is finite for infeasible z, so training may start infeasible." + own + "*",
        "",
    ]
    evals = list(evals)
    if ranges:
        for e in evals:
            key = e["model"].removeprefix("l3m_")
            if "range" not in e and key in ranges:
                e["range"] = list(ranges[key])
    if evals:
        plot_lengths_and_perplexity(evals, out / "lengths_perplexity.png")
        caps = {e.get("max_new_tokens") for e in evals}
        plot_length_histograms(
            {e["model"]: e["lengths"]["values"] for e in evals if (e.get("lengths") or {}).get("values")},
            out / "length_histograms.png",
            cap=caps.pop() if len(caps) == 1 else None,
            ranges={e["model"]: e["range"] for e in evals if e.get("range")},
        )
        md += [
            "## Held-out response lengths and task perplexity",
            "",
            "![lengths and perplexity](lengths_perplexity.png)",
            "",
            "*Figure (paper Figure 2): left, the lengths of responses sampled on held-out prompts, one box per "
            "model (box: quartiles, black line: median, whiskers: minimum and maximum, red diamond and number: "
            "mean); green bars mark the range [l_min, l_max] each L3M was trained to keep its mean length in "
            "(the SFT model has none). Right, the task log-perplexity of the held-out reference responses "
            "(mean ± std over examples): the cost of the constraint in task performance"
            + (
                "; the percentage beside each model is its change against the first model, whose mean the dotted "
                "line marks.*"
                if against_first(evals)
                else ".*"
            ),
            "",
            "![length histograms](length_histograms.png)",
            "",
            "*Figure: the same lengths as histograms, with each model's range (green) and the sampling cap (red, "
            "dashed); the title gives the share of responses cut off at the cap, which a mean length cannot show.*",
            "",
            "## Numbers",
            "",
            markdown_table(evals),
        ]
        vs = against_first_table(evals)
        if vs:
            md += [
                "",
                f"Task log-perplexity against the first model, `{evals[0]['model']}` (the paired difference is "
                "taken reference by reference, so it is far more precise than the std above suggests):",
                "",
                vs,
            ]
        notes = [f"- {e['model']}: {w}" for e in evals for w in e.get("warnings") or []]
        if notes:
            md += ["", "Warnings:", "", *notes]
    for i, res in enumerate(reward_results):
        from l3m.report_rewards import markdown_reward_table, plot_reward_plane

        png = f"reward_plane{'' if len(reward_results) == 1 else f'_{i + 1}'}.png"
        plot_reward_plane(res, out / png)
        ax = res["axes"]
        md += [
            f"## Reward constraints: {ax[0]} and {ax[1]}",
            "",
            f"![reward plane]({png})",
            "",
            f"*Figure (paper Figure 3): left, each model's mean rewards on held-out prompts ({ax[0]} across, "
            f"{ax[1]} up), with 95% intervals; each constraint point (b1, b2) is a star, and the region where "
            "both constraints hold (above and to the right of it) is shaded; a line joins each model to the point "
            "it was trained for (circles: L3M, squares: minimax). A model meets its constraints when it lies in its "
            "point's shaded region. Right, the task log-perplexity of held-out references per method and point "
            "(mean ± std; lower is better).*",
            "",
            markdown_reward_table(res),
        ]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def run_report(ns) -> Path:
    """``l3m report RUN_DIR... [--eval FILE.json]``."""
    if not ns.runs and not ns.eval:
        raise L3MUserError("give run directories (with metrics.jsonl) and/or --eval FILE.json")
    rewards, plain = [], []
    for f in ns.eval:  # a reward experiment's results.json (points + models) is drawn as Figure 3
        doc = json.loads(Path(f).read_text()) if Path(f).is_file() and str(f).endswith(".json") else None
        if isinstance(doc, dict) and "points" in doc and "models" in doc:
            rewards.append(doc)
        else:
            plain.append(f)
    evals = load_evaluations(plain)
    for d in ns.runs:
        if not Path(d).is_dir():
            raise L3MUserError(f"run directory '{d}' does not exist")
    path = make_report(ns.runs, evals, ns.output_dir, title=ns.title, reward_results=rewards)
    print(f"report written to {path} (PNGs beside it)")
    return path
