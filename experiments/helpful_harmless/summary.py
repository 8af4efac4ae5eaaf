"""The helpful-and-harmless experiment's tables and Figure 3, over training seeds, from its saved records.

``run.py`` saves one record per evaluation under ``results/evals/`` (``test/initial.json``,
``test/seed<S>/<sft|l3m_P<i>|mm_P<i>>.json``: the ``l3m.evaluation.evaluate_model`` result, samples included)
and one per training in ``results/stages.json``. :func:`summarise` turns them into one row per model over seeds;
:func:`markdown` and :func:`figure` draw them.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from l3m.evaluation import paired_difference
from l3m.quality import t_interval
from l3m.report_rewards import model_entry, plot_reward_plane

ABBR = {"holds": "H", "undecided": "U", "violated": "V"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def labels(points: list[dict]) -> list[tuple[str, str, str | None, str]]:
    """(label, method, point, record stem) per model, in table order."""
    out = [("initial", "initial", None, "initial"), ("SFT", "SFT", None, "sft")]
    for pt in points:
        n = pt["name"]
        out += [(f"L3M@{n}", "L3M", n, f"l3m_{n}"), (f"MM@{n}", "MM", n, f"mm_{n}")]
    return out


def _sampling_s_per_step(results: Path, name: str) -> float | None:
    f = results / "runs" / name / "metrics.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    gen = [r["time/generation_s"] for r in rows if "time/generation_s" in r]
    return statistics.fmean(gen) if gen else None


def _paired_over_seeds(recs: dict, others: dict) -> tuple[dict, dict | None]:
    """Per seed, the log-perplexity of ``recs[seed]`` minus that of ``others[seed]`` (evaluations) paired over the
    same references; and their mean over seeds with a t-interval."""
    d = {}
    for s, ev in recs.items():
        if others.get(s):
            d[s] = paired_difference(ev["task_logppl"]["per_example"], others[s]["task_logppl"]["per_example"])
    d = {s: x for s, x in d.items() if x}
    return d, t_interval([x["mean"] for x in d.values()])


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def summarise(results: Path, out: dict) -> dict:
    """``{"models": [row per model], "efficiency": {point: ...}}`` from the records of ``out["seeds"]``."""
    seeds, axes, stages = out["seeds"], out["axes"], _load(results / "stages.json") or {}
    loaded = {f: _load(f) for f in (results / "evals").rglob("*.json")}  # every saved evaluation, each read once
    evals = results / "evals" / "test"
    saved = {}  # record stem -> {seed: evaluation}; the initial model: one evaluation, paired with each seed's SFT
    for *_, stem in labels(out["points"]):
        by_seed = {
            s: loaded.get(evals / ("initial.json" if stem == "initial" else f"seed{s}/{stem}.json")) for s in seeds
        }
        saved[stem] = {s: r["evaluation"] for s, r in by_seed.items() if r}
    rows = []
    for label, method, point, stem in labels(out["points"]):
        recs = saved[stem]
        if not recs:
            continue
        per_axis = []
        for a in axes:
            per_axis.append(
                {s: next(c["mean_raw"] for c in ev["constraints"] if c["name"] == a) for s, ev in recs.items()}
            )
        ppl = [ev["task_logppl"]["mean"] for ev in recs.values()]
        row = {
            "model": label,
            "method": method,
            "point": point,
            "seeds": sorted(recs) if method != "initial" else None,
            # the fields l3m.report_rewards.plot_reward_plane draws (`l3m report --eval results.json` too)
            "rewards": [statistics.fmean(p.values()) for p in per_axis],
            "rewards_range": [[min(p.values()), max(p.values())] for p in per_axis],
            "rewards_per_seed": {s: [p[s] for p in per_axis] for s in recs} if method != "initial" else None,
            "rewards_ci95_per_seed": {
                s: model_entry(ev, method, point, axes)["rewards_ci95"] for s, ev in recs.items()
            },
            "task_logppl": {"mean": statistics.fmean(ppl), "range": [min(ppl), max(ppl)]},
            "mean_length": _mean(ev["lengths"]["mean"] for ev in recs.values()),
            "median_length": _mean(ev["quality"]["median_length"] for ev in recs.values()),
            "truncated_share": _mean(ev["quality"]["truncated_share"] for ev in recs.values()),
            "repetition_rate": _mean(ev["quality"]["repetition_rate"] for ev in recs.values()),
            "distinct_2": _mean(ev["quality"]["distinct_2"] for ev in recs.values()),
        }
        if point is not None:
            row["verdicts_per_seed"] = {
                s: [c["verdict"] for a in axes for c in ev["constraints"] if c["name"] == a] for s, ev in recs.items()
            }
            row["seeds_meeting_point"] = sum(all(v == "holds" for v in vs) for vs in row["verdicts_per_seed"].values())
            row["seeds_violating"] = sum(any(v == "violated" for v in vs) for vs in row["verdicts_per_seed"].values())
        if method != "SFT":
            row["minus_sft_per_seed"], row["minus_sft"] = _paired_over_seeds(recs, saved["sft"])
        if method == "L3M":
            row["minus_mm_per_seed"], row["minus_mm"] = _paired_over_seeds(recs, saved[f"mm_{point}"])
        if method in ("SFT", "L3M", "MM"):
            st = [stages.get(f"seed{s}/{stem}") for s in recs]
            st = [x for x in st if x]
            row["train_min"] = _mean(x["wall_s"] / 60 for x in st)
            row["peak_rss_mb"] = _mean(x.get("peak_rss_mb") for x in st)
            row["cuda_peak_mb"] = _mean(x.get("cuda_peak_mb") for x in st)
            row["sampling_s_per_step"] = _mean(_sampling_s_per_step(results, f"seed{s}/{stem}") for s in recs)
        rows.append(row)
    by = {r["model"]: r for r in rows}
    eff = {}
    for pt in out["points"]:
        l3m, mm, sft_row = by.get(f"L3M@{pt['name']}"), by.get(f"MM@{pt['name']}"), by.get("SFT")
        if l3m and mm and sft_row and l3m.get("train_min") and mm.get("train_min"):
            mm_total = mm["train_min"] + (sft_row.get("train_min") or 0.0)
            eff[pt["name"]] = {
                "l3m_min": l3m["train_min"],
                "mm_min": mm["train_min"],
                "mm_plus_sft_min": mm_total,
                "ratio": l3m["train_min"] / mm_total,
                "l3m_mem_gib": _gib(l3m),
                "mm_mem_gib": _gib(mm),
            }
    # the run's cost: every stage's wall clock added up (what one job takes; with --jobs N, about 1/N of it)
    train_s = sum(x["wall_s"] for x in stages.values())
    eval_s = sum(r.get("eval_s") or 0.0 for r in loaded.values())
    notes = {
        r["point"]: "L3M − MM:\n" + _interval(r["minus_mm"]).replace(" [", "\n[") for r in rows if r.get("minus_mm")
    }
    spread = f"seed means over {len(seeds)} seed(s); bars: range over seeds"
    cost = {"trainings_min": train_s / 60, "evaluations_min": eval_s / 60, "total_min": (train_s + eval_s) / 60}
    return {"models": rows, "efficiency": eff, "point_notes": notes, "spread": spread, "stages_wall_clock": cost}


def _gib(row: dict) -> float | None:
    mb = row.get("cuda_peak_mb") or row.get("peak_rss_mb")
    return mb / 1024 if mb else None


def _f(x, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _cost(out: dict) -> str:
    c = out.get("stages_wall_clock")
    if not c:
        return "—"
    return (
        f"every stage added up {c['total_min']:.0f} min ({c['trainings_min']:.0f} training, "
        f"{c['evaluations_min']:.0f} evaluating)"
    )


def _pm(d: dict | None) -> str:
    return f"{d['mean']:+.3f} ± {d['se']:.3f}" if d else "—"


def _interval(t: dict | None) -> str:
    if not t:
        return "—"
    if t.get("ci95") is None:
        return f"{t['mean']:+.3f} (one seed)"
    lo, hi = t["ci95"]
    return f"{t['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(out: dict) -> str:
    axes, rows = out["axes"], out["models"]
    s = out["settings"]
    lines = ["# Helpful-and-harmless L3Ms vs minimax, over training seeds", ""]
    if out.get("smoke"):
        lines += ["**Smoke run: a few steps per stage; these numbers are not results.**", ""]
    lines += [
        f"Device: {out['device']}; seeds {', '.join(map(str, out['seeds']))}; {s['steps']} optimiser steps per SFT, "
        f"L3M and MM run. Wall clock: {_cost(out)}; this command ({out['jobs']} job(s) side by side) "
        f"{out['wall_clock_s'] / 60:.1f} min, without the stages it found done.",
        "",
        "| reward model | held-out pairs | pairwise accuracy [95% CI] | reward std (= constraint scale) |",
        "|---|---|---|---|",
    ]
    for a in axes:
        h, rm = out["reward_models"][a]["heldout"], out["reward_models"][a]
        lines.append(
            f"| {a} | {h['n_pairs']} | {h['accuracy']:.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}] | "
            f"{rm['scale']:.3f} |"
        )
    sel = out["sft_selection_rewards"]
    lines += [
        "",
        f"SFT mean rewards on the selection prompts (mean over seeds): {axes[0]} {sel['mean'][0]:.3f}, "
        f"{axes[1]} {sel['mean'][1]:.3f}. Constraint points (b₁, b₂) = those + Δ × reward std:",
        "",
    ]
    lines += [
        f"- {p['name']}: ({p['b'][0]:.3f}, {p['b'][1]:.3f})"
        + (f", Δ = {tuple(p['delta_in_std'])}" if p.get("delta_in_std") else "")
        for p in out["points"]
    ]
    lines += [
        "",
        "Test prompts. Rewards: mean over seeds [min, max over seeds]. Verdicts per seed against the model's own point "
        "(helpful·harmless; H holds, U undecided, V violated: the 95% bootstrap interval over prompts above b, across "
        "it, below it). Δ: task log-perplexity of the test references minus that of the SFT model of the same seed "
        "(L3M − MM: minus the MM of the same seed and point), paired over references, mean over seeds [95% t-interval "
        "over seeds].",
        "",
        f"| model | {axes[0]} reward | {axes[1]} reward | verdicts per seed | mean length | cut off | repetition | "
        "log-ppl | Δ vs SFT (nats) | L3M − MM (nats) | training (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        several = len(r.get("rewards_per_seed") or {}) > 1
        rw = [
            f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if several else f"{m:.3f}"
            for m, (lo, hi) in zip(r["rewards"], r["rewards_range"])
        ]
        verd = ", ".join("·".join(ABBR.get(v, "?") for v in vs) for vs in (r.get("verdicts_per_seed") or {}).values())
        lines.append(
            f"| {r['model']} | {rw[0]} | {rw[1]} | {verd or '—'} | {_f(r['mean_length'], '.1f')} | "
            f"{_f(r['truncated_share'] * 100 if r['truncated_share'] is not None else None, '.0f')}% | "
            f"{_f(r['repetition_rate'] * 100 if r['repetition_rate'] is not None else None, '.0f')}% | "
            f"{r['task_logppl']['mean']:.3f} | {_interval(r.get('minus_sft'))} | {_interval(r.get('minus_mm'))} | "
            f"{_f(r.get('train_min'), '.1f')} |"
        )
    lines += [
        "",
        "Per seed (rewards with their 95% bootstrap interval over prompts; Δ paired ± s.e.):",
        "",
        f"| model | seed | {axes[0]} | {axes[1]} | L3M − MM | Δ vs SFT |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] not in ("L3M", "MM"):
            continue
        for s, vs in r["verdicts_per_seed"].items():
            cis = r["rewards_ci95_per_seed"][s]
            cells = [
                f"{x:.3f} [{lo:.3f}, {hi:.3f}] → {ABBR[v]}" for x, (lo, hi), v in zip(r["rewards_per_seed"][s], cis, vs)
            ]
            mm = (r.get("minus_mm_per_seed") or {}).get(s)
            sf = (r.get("minus_sft_per_seed") or {}).get(s)
            lines.append(f"| {r['model']} | {s} | {cells[0]} | {cells[1]} | {_pm(mm)} | {_pm(sf)} |")
    if out.get("efficiency"):
        mem = "GPU max allocated" if any(r.get("cuda_peak_mb") for r in rows) else "peak RSS"
        lines += [
            "",
            f"Training wall clock and memory, means over seeds ({mem}, GiB):",
            "",
            "| point | L3M (min) | MM (min) | MM + SFT (min) | L3M / (MM + SFT) | L3M memory | MM memory |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, e in out["efficiency"].items():
            lines.append(
                f"| {n} | {e['l3m_min']:.1f} | {e['mm_min']:.1f} | {e['mm_plus_sft_min']:.1f} | {e['ratio']:.2f} | "
                f"{_f(e.get('l3m_mem_gib'), '.2f')} | {_f(e.get('mm_mem_gib'), '.2f')} |"
            )
    lines += ["", "![reward plane and task log-perplexity](figure3.png)", ""]
    return "\n".join(lines)


def figure(out: dict, path: Path) -> Path:
    """Figure 3: every model's seed-mean rewards (each seed faint, bars the range over seeds) against the points,
    and the task log-perplexity per point with the L3M − MM difference under each."""
    return plot_reward_plane(out, path)
