"""The paper's Figure 3: reward pairs of L3Ms and minimax (MM) baselines against their constraint points.

``results`` is a dict (the helpful-and-harmless experiment writes it as ``results.json``)::

    {
      "axes": ["helpful", "harmless"],                 # the two reward constraints, x then y
      "points": [{"name": "P1", "b": [b1, b2]}, ...],  # constraint points: E[r_x] >= b1, E[r_y] >= b2
      "models": [                                      # one entry per evaluated model
        {"model": "L3M@P1", "method": "L3M", "point": "P1",      # point: null for an unconstrained model (SFT)
         "rewards": [r_x, r_y],                                 # mean rewards on held-out prompts
         "rewards_ci95": [[lo, hi], [lo, hi]],                  # optional 95% intervals
         "verdicts": ["holds", "undecided"],                    # optional, per axis
         "task_logppl": {"mean": m, "std": s}},                 # optional
        ...
      ]
    }

A model summarised over several training seeds may give, instead of intervals, ``"rewards_range": [[lo, hi],
[lo, hi]]`` (drawn as its bars), ``"rewards_per_seed": [[r_x, r_y], ...]`` or ``{seed: [r_x, r_y]}`` (drawn faint) and
``"task_logppl": {"mean": m, "range": [lo, hi]}``; ``results["point_notes"]`` (text per point name, drawn under
its tick in place of the paired difference) and ``results["spread"]`` (what the bars are, for the titles).

:func:`model_entry` builds a model entry from an :func:`l3m.evaluation.evaluate_model` result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from l3m.errors import L3MUserError  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
METHOD_MARKERS = {"L3M": "o", "MM": "s"}
FREE_MARKERS, FREE_LINES = ["X", "P", "D"], [":", "-.", "--"]


def model_entry(evaluation: Mapping[str, Any], method: str, point: str | None, axes: Sequence[str]) -> dict:
    """A ``results["models"]`` entry from an ``evaluate_model`` result whose constraints include ``axes``.

    The reward interval comes from the constraint's interval: for ``E[r] >= b``, ``C = b - E[r]``.
    """
    by_name = {c["name"]: c for c in evaluation.get("constraints") or []}
    missing = [a for a in axes if a not in by_name]
    if missing:
        raise L3MUserError(f"evaluation of '{evaluation.get('model')}' has no constraint named {missing}")
    rewards, cis, verdicts = [], [], []
    for a in axes:
        c = by_name[a]
        r = float(c["mean_raw"])
        rewards.append(r)
        lo, hi = c["ci95"]
        # at least b: C = (b - r) / scale, so r = b - scale * C; at most b: r = b + scale * C
        scale = float(c.get("scale", 1.0))
        if c.get("direction", "at_least") == "at_least":
            b = float(c.get("threshold", r + scale * float(c["value"])))
            cis.append([b - scale * hi, b - scale * lo])
        else:
            b = float(c.get("threshold", r - scale * float(c["value"])))
            cis.append([b + scale * lo, b + scale * hi])
        verdicts.append(c.get("verdict"))
    entry: dict[str, Any] = {
        "model": evaluation.get("model", method),
        "method": method,
        "point": point,
        "rewards": rewards,
        "rewards_ci95": cis,
        "verdicts": verdicts,
    }
    if evaluation.get("task_logppl"):
        entry["task_logppl"] = {
            k: evaluation["task_logppl"][k] for k in ("mean", "std") if k in evaluation["task_logppl"]
        }
    return entry


def _check(results: Mapping[str, Any]) -> tuple[list[str], list[dict], list[dict]]:
    axes = list(results.get("axes") or [])
    points = list(results.get("points") or [])
    models = list(results.get("models") or [])
    if len(axes) != 2:
        raise L3MUserError(f"reward plane: 'axes' must name two rewards, got {axes}")
    names = set()
    for p in points:
        if "name" not in p or len(p.get("b") or []) != 2:
            raise L3MUserError(f"reward plane: each point needs a 'name' and 'b': [b1, b2]; got {p}")
        names.add(p["name"])
    if not models:
        raise L3MUserError("reward plane: no models to plot")
    for m in models:
        if len(m.get("rewards") or []) != 2:
            raise L3MUserError(f"reward plane: model '{m.get('model')}' needs 'rewards': [r1, r2]")
        if m.get("point") is not None and m["point"] not in names:
            raise L3MUserError(f"reward plane: model '{m.get('model')}' names an unknown point {m['point']!r}")
    return axes, points, models


def plot_reward_plane(results: Mapping[str, Any], out_png: str | os.PathLike) -> Path:
    """Left: the reward plane, each constraint point with its feasible region shaded and each model's reward
    pair joined to its point. Right: task log-perplexity per method and point (the paper's Figure 3)."""
    axes, points, models = _check(results)
    color = {p["name"]: COLORS[i % len(COLORS)] for i, p in enumerate(points)}
    bpos = {p["name"]: p["b"] for p in points}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [3, 2]})

    xs = [p["b"][0] for p in points] + [m["rewards"][0] for m in models]
    ys = [p["b"][1] for p in points] + [m["rewards"][1] for m in models]
    for m in models:
        for (lo, hi), vals in zip(m.get("rewards_range") or m.get("rewards_ci95") or [], (xs, ys)):
            vals.extend([lo, hi])
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    x0, x1 = min(xs) - 0.12 * span_x, max(xs) + 0.12 * span_x
    y0, y1 = min(ys) - 0.12 * span_y, max(ys) + 0.12 * span_y

    for p in points:
        b1, b2 = p["b"]
        c = color[p["name"]]
        ax.fill_between([b1, x1], b2, y1, color=c, alpha=0.10, lw=0)
        ax.plot([b1, x1], [b2, b2], color=c, lw=1, alpha=0.6)
        ax.plot([b1, b1], [b2, y1], color=c, lw=1, alpha=0.6)
        ax.plot(b1, b2, marker="*", ms=15, color=c, mec="black", mew=0.6, ls="none", zorder=4)
        ax.annotate(p["name"], (b1, b2), textcoords="offset points", xytext=(-6, -14), fontsize=9, color=c)
    free = [m.get("model") for m in models if m.get("point") is None]
    for m in models:
        r1, r2 = m["rewards"]
        method = m.get("method", "?")
        if m.get("point") is None:  # unconstrained models (SFT, the initial model): one marker each
            c, marker = "black", FREE_MARKERS[free.index(m.get("model")) % len(FREE_MARKERS)]
        else:
            c, marker = color[m["point"]], METHOD_MARKERS.get(method, "D")
            b1, b2 = bpos[m["point"]]
            ax.plot([b1, r1], [b2, r2], color=c, lw=1.2, ls="--" if method == "MM" else "-", alpha=0.8)
        ci = m.get("rewards_range") or m.get("rewards_ci95")
        per_seed = m.get("rewards_per_seed") or []
        for s1, s2 in per_seed.values() if isinstance(per_seed, Mapping) else per_seed:
            ax.plot(s1, s2, marker=marker, ms=5, color=c, alpha=0.35, ls="none", zorder=3)
        if ci:
            ax.errorbar(
                r1,
                r2,
                # max(0, ·): a mean of equal values can differ from them in the last bit
                xerr=[[max(0.0, r1 - ci[0][0])], [max(0.0, ci[0][1] - r1)]],
                yerr=[[max(0.0, r2 - ci[1][0])], [max(0.0, ci[1][1] - r2)]],
                color=c,
                alpha=0.45,
                lw=1,
                capsize=2,
                ls="none",
            )
        ax.plot(r1, r2, marker=marker, ms=9, color=c, mec="black", mew=0.6, ls="none", zorder=5)
        if m.get("point") is None:
            ax.annotate(m.get("model", method), (r1, r2), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.plot([], [], "*", color="grey", mec="black", ms=12, label="constraint point (b₁, b₂); shaded: feasible")
    for method, marker in METHOD_MARKERS.items():
        if any(m.get("method") == method for m in models):
            ls = "--" if method == "MM" else "-"
            ax.plot([], [], marker=marker, color="grey", mec="black", ls=ls, label=f"{method} (joined to its point)")
    if any(m.get("point") is None for m in models):
        ax.plot([], [], "X", color="black", label="unconstrained model")
    ax.set(
        xlim=(x0, x1),
        ylim=(y0, y1),
        xlabel=f"mean {axes[0]} reward",
        ylabel=f"mean {axes[1]} reward",
        title="Held-out mean rewards against the constraint points"
        + (f"\n({results['spread']})" if results.get("spread") else ""),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")  # away from the points: the unconstrained model sits bottom left

    # task log-perplexity: one group per point, one marker per method
    methods = [k for k in METHOD_MARKERS if any(m.get("method") == k for m in models)]
    methods += sorted({m.get("method", "?") for m in models if m.get("point") is not None} - set(methods))
    width = 0.6 / max(len(methods), 1)
    for j, method in enumerate(methods):
        for i, p in enumerate(points):
            for m in models:
                if m.get("method") == method and m.get("point") == p["name"] and m.get("task_logppl"):
                    x = i + (j - (len(methods) - 1) / 2) * width
                    mean, spread = m["task_logppl"]["mean"], m["task_logppl"].get("std", 0.0)
                    if "range" in m["task_logppl"]:
                        lo, hi = m["task_logppl"]["range"]
                        spread = [[mean - lo], [hi - mean]]
                    ax2.errorbar(
                        x,
                        mean,
                        yerr=spread,
                        marker=METHOD_MARKERS.get(method, "D"),
                        color=color[p["name"]],
                        mec="black",
                        capsize=4,
                        ls="none",
                    )
                    left = j == 0 and len(methods) > 1  # the first method's label on its left: clear of its neighbour
                    ax2.annotate(
                        f"{mean:.3f}",
                        (x, mean),
                        textcoords="offset points",
                        xytext=(-6 if left else 6, 0),
                        ha="right" if left else "left",
                        va="center",
                        fontsize=8,
                    )
    for m in models:
        if m.get("point") is None and m.get("task_logppl") and math.isfinite(m["task_logppl"]["mean"]):
            ax2.axhline(
                m["task_logppl"]["mean"],
                color="black",
                ls=FREE_LINES[free.index(m.get("model")) % len(FREE_LINES)],
                lw=1,
                label=f"{m.get('model', 'unconstrained')}: {m['task_logppl']['mean']:.3f}",
            )
    for method in methods:
        ax2.plot([], [], marker=METHOD_MARKERS.get(method, "D"), color="grey", mec="black", ls="none", label=method)
    # where both methods kept their per-reference values: L3M - MM paired over the same references, with its
    # standard error (the std bars are the spread over references, far wider than the uncertainty of a difference)
    from l3m.evaluation import paired_difference

    # the paired differences go under each point's tick label, clear of the bars and the legend
    labels, paired = [], False
    for p in points:
        per = {
            m.get("method"): m.get("task_logppl_per_example")
            for m in models
            if m.get("point") == p["name"] and m.get("method") in ("L3M", "MM")
        }
        note = (results.get("point_notes") or {}).get(p["name"])
        d = None if note else paired_difference(per.get("L3M"), per.get("MM"))
        paired = paired or bool(d)
        if note:
            labels.append(f"{p['name']}\n{note}")
        else:
            labels.append(f"{p['name']}\nL3M − MM:\n{d['mean']:+.3f} ± {d['se']:.3f}" if d else p["name"])
    ax2.set_xticks(range(len(points)), labels)
    for tick, p in zip(ax2.get_xticklabels(), points):
        tick.set_color(color[p["name"]])
    ax2.set_xlim(-0.6, len(points) - 0.4)
    ax2.set(
        xlabel="constraint point",
        ylabel="task log-perplexity (nats per response token)",
        title=(
            f"Task log-perplexity\n({results['spread']})"
            if results.get("spread")
            else "Task log-perplexity (mean ± std over held-out examples)"
        )
        + ("\nunder each point: paired L3M − MM ± s.e." if paired else ""),
    )
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{axes[0].capitalize()}-and-{axes[1]} constraints: L3M vs minimax (paper Figure 3)")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_reward_table(results: Mapping[str, Any]) -> str:
    """One row per model: its point, rewards (with intervals and verdicts) and task log-perplexity."""
    axes, points, models = _check(results)
    bpos = {p["name"]: p["b"] for p in points}
    head = ["model", "method", "point (b₁, b₂)"]
    head += [f"{a} reward [95% CI] → verdict" for a in axes] + ["task log-ppl (mean ± std)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        b = bpos.get(m.get("point"))
        row = [m.get("model", "?"), m.get("method", "?"), f"{m['point']} ({b[0]:.3g}, {b[1]:.3g})" if b else "—"]
        for i in range(2):
            cell = f"{m['rewards'][i]:.3f}"
            ci = m.get("rewards_ci95")
            if ci:
                cell += f" [{ci[i][0]:.3f}, {ci[i][1]:.3f}]"
            v = (m.get("verdicts") or [None, None])[i]
            if v and b:
                cell += f" → {v}"
            row.append(cell)
        ppl = m.get("task_logppl")
        row.append(f"{ppl['mean']:.3f} ± {ppl.get('std', 0.0):.3f}" if ppl else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
