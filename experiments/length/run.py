"""The paper's Figure 2 at this project's scale: length-constrained L3Ms against an SFT model, on real data.

One command trains and evaluates every model over three training seeds and writes ``experiments/length/results/``
(checkpoints and the split data files go to ``runs/length/``, which git ignores):

    .venv/bin/python experiments/length/run.py                      # 6 models x seeds 0 1 2, scored on the test split
    .venv/bin/python experiments/length/run.py --jobs 2             # two trainings side by side
    .venv/bin/python experiments/length/run.py --split selection    # the same models scored on the selection split
    .venv/bin/python experiments/length/run.py --smoke              # a few steps, a handful of prompts: the pipeline
    .venv/bin/python experiments/length/run.py --dry-run            # write the splits and configs, train nothing

Data: ``../shared/data/sft/instruction_data_short.json`` (1,100 instruction/answer pairs), split once with a fixed
split seed, independent of the training seed, into 800 training, 150 selection and 150 test records; records that
share a prompt stay in one split. The selection split is for choices; the test split is scored once, for the table.

Models, all trained by ``l3m train`` from the same initial model with the core's defaults and the same data, steps
and optimiser, differing only in their constraints: ``initial`` (not trained), ``sft`` (no constraints),
``l3m_short``, ``l3m_medium``, ``l3m_long`` (one mean-length range each) and ``l3m_long_truncated`` (long's range
and at most 5% of responses cut off at ``max_new_tokens``). Each is evaluated with ``l3m evaluate``: the task
log-perplexity of the split's references and ``k`` sampled responses per prompt, checked against every range.

An interrupted run resumes where it stopped: finished evaluations are kept, finished models are only evaluated,
and a training with a checkpoint continues from it (``training.resume_from_checkpoint=true``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from l3m.data import load_examples, split_by_key
from l3m.evaluation import paired_difference
from l3m.quality import t_interval

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data" / "sft" / "instruction_data_short.json"

SPLIT_SEED = 0  # fixed: the splits do not move with the training seed
SPLIT_SIZES = {"train": 800, "selection": 150, "test": 150}
# Mean-length ranges [l_min, l_max] in tokens. The initial model's answers run long (many reach the 64-token cap);
# this data set's reference answers are short (median about 10 tokens), so SFT brings the length down: "short" lies
# around and below the SFT model's length, "medium" and "long" above it.
RANGES = {"short": (3, 10), "medium": (20, 30), "long": (35, 50)}
SCALE = 10.0  # c = (l_min - len) / 10 and (len - l_max) / 10: constraint values in units of 10 tokens
TRUNCATED_AT_MOST = 0.05
MODELS = ["initial", "sft", "l3m_short", "l3m_medium", "l3m_long", "l3m_long_truncated"]
# Ordinary training settings, the same for every trained model; every L3M setting stays at the core's default.
TRAINING = {
    "max_steps": 60,
    "per_device_train_batch_size": 8,  # prompts per step (each sampled num_generations times, the default 4)
    "learning_rate": 5.0e-5,
    "save_steps": 20,  # checkpoints to resume from; deleted once the model is saved
    "save_total_limit": 1,
    "disable_tqdm": True,
}
# Evaluation: the sampling settings of training (the core's defaults), 2 samples per prompt, a fixed sampling seed.
EVAL = {"k": 2, "max_new_tokens": 64, "temperature": 1.0, "seed": 1, "batch_size": 25}
SMOKE = {
    "n_train": 16,
    "n_eval": 4,
    "training": {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_new_tokens": 16,
        "save_strategy": "no",  # a checkpoint of the 135M model and its optimiser takes longer than the 2 steps
    },
    "eval": {"k": 2, "max_new_tokens": 16, "batch_size": 4},
}
# Relative training cost (longer samples cost more): the most expensive jobs start first.
COST = {"initial": 0.0, "sft": 1.0, "l3m_short": 3.0, "l3m_medium": 3.5, "l3m_long": 4.5, "l3m_long_truncated": 4.5}


# ----------------------------------------------------------------------------------------------
# splits and configs


def train_constraints(model: str) -> list[dict] | None:
    """The constraints an L3M is trained with (None for SFT): its range, and for ``*_truncated`` the cut-off share."""
    if model == "sft":
        return None
    name = model.removeprefix("l3m_").removesuffix("_truncated")
    lo, hi = RANGES[name]
    cons = [{"kind": "length", "min": lo, "max": hi, "name": "length", "scale": SCALE}]
    if model.endswith("_truncated"):
        cons.append({"kind": "truncated", "at_most": TRUNCATED_AT_MOST, "name": "truncated"})
    return cons


def model_range(model: str) -> tuple[float, float] | None:
    if not model.startswith("l3m_"):
        return None
    return RANGES[model.removeprefix("l3m_").removesuffix("_truncated")]


def eval_constraints() -> list[dict]:
    """What every model is checked against: each range's two bounds (``short_min``, ...) and the cut-off share."""
    cons = [{"kind": "length", "min": lo, "max": hi, "name": n} for n, (lo, hi) in RANGES.items()]
    return cons + [{"kind": "truncated", "at_most": TRUNCATED_AT_MOST, "name": "truncated"}]


def own_bounds(model: str) -> list[str]:
    """The names (in ``eval_constraints``) of the bounds a model was trained to meet."""
    if not model.startswith("l3m_"):
        return []
    name = model.removeprefix("l3m_").removesuffix("_truncated")
    return [f"{name}_min", f"{name}_max"] + (["truncated"] if model.endswith("_truncated") else [])


def training_settings(smoke: bool, overrides: dict | None = None) -> dict:
    """The training settings every model shares: ``TRAINING``, the smoke sizes, then ``--set`` overrides."""
    return {**TRAINING, **(SMOKE["training"] if smoke else {}), **(overrides or {})}


def model_config(
    model: str, seed: int, train_file: str, output_dir: str, base_model: str, smoke: bool, overrides: dict | None = None
) -> dict:
    training = {**training_settings(smoke, overrides), "seed": seed, "output_dir": output_dir}
    return {
        "model": base_model,
        "data": {"train": train_file},
        "constraints": train_constraints(model),
        "training": training,
    }


def rel(path: Path) -> str:
    """A path relative to the repository root where it lies inside it (configs stay portable), else absolute."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


# ----------------------------------------------------------------------------------------------
# the table


def _find(ev: dict, *names: str):
    """The first of ``names`` found in the evaluation's ``quality`` block, at its top level or in ``lengths``."""
    for where in (ev.get("quality") or {}, ev, ev.get("lengths") or {}):
        for n in names:
            v = where.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    return None


def quality(ev: dict) -> dict:
    """Median length, cut-off share, repetition rate and distinct-2 of one evaluation's samples.

    ``l3m evaluate`` reports them; where a key is missing, the lengths give the median and the cut-off share
    (a response cut off at ``max_new_tokens`` has exactly that many tokens); repetition and distinct-2 need the
    responses' tokens and stay None.
    """
    values = (ev.get("lengths") or {}).get("values") or []
    cap = ev.get("max_new_tokens")
    median = _find(ev, "median_length", "median")
    if median is None and values:
        median = float(statistics.median(values))
    cut = _find(ev, "truncated_share", "clipped_ratio")
    if cut is None and values and cap:
        cut = sum(v >= cap for v in values) / len(values)
    return {
        "median_length": median,
        "truncated_share": cut,
        "repetition_rate": _find(ev, "repetition_rate"),
        "distinct_2": _find(ev, "distinct_2"),
    }


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarise(records: dict[int, dict[str, dict]], initial: dict | None = None) -> dict:
    """Per model, over seeds: lengths, verdicts on its own bounds, quality, log-perplexity, the paired difference to
    the SFT model of the same seed (per seed, and its mean over seeds) and training time.

    ``records[seed][model]`` is what ``run.py`` saves per evaluation: ``{"evaluation": <l3m evaluate result>,
    "train_s": seconds or None}``; ``initial`` is the initial model's record (one for every seed).
    """
    seeds = sorted(records)
    rows = {}
    for model in MODELS:
        per_seed = {s: initial if model == "initial" else records[s].get(model) for s in seeds}
        per_seed = {s: r for s, r in per_seed.items() if r}
        if not per_seed:
            continue
        evs = {s: r["evaluation"] for s, r in per_seed.items()}
        diffs = {}
        for s, ev in evs.items():
            sft = (records[s].get("sft") or {}).get("evaluation")
            if model != "sft" and sft:
                diffs[s] = paired_difference(
                    ev["task_logppl"].get("per_example"), sft["task_logppl"].get("per_example")
                )
        diffs = {s: d for s, d in diffs.items() if d}
        means = [d["mean"] for d in diffs.values()]
        if len(means) >= 2:  # the spread over seeds: training noise and the references' noise together
            delta = t_interval(means)
        elif means:
            delta = {"mean": means[0], "se": next(iter(diffs.values()))["se"]}
        else:
            delta = None
        q = {s: quality(ev) for s, ev in evs.items()}
        verdicts = {
            s: {c["name"]: c["verdict"] for c in ev.get("constraints") or [] if c["name"] in own_bounds(model)}
            for s, ev in evs.items()
        }
        rows[model] = {
            "seeds": sorted(evs),
            "range": model_range(model),
            "bounds": own_bounds(model),
            "mean_length": _mean([ev["lengths"]["mean"] for ev in evs.values()]),
            "median_length": _mean([x["median_length"] for x in q.values()]),
            "truncated_share": _mean([x["truncated_share"] for x in q.values()]),
            "repetition_rate": _mean([x["repetition_rate"] for x in q.values()]),
            "distinct_2": _mean([x["distinct_2"] for x in q.values()]),
            "logppl": _mean([ev["task_logppl"]["mean"] for ev in evs.values()]),
            "logppl_std": _mean([ev["task_logppl"]["std"] for ev in evs.values()]),
            "minus_sft": delta,
            "minus_sft_per_seed": {str(s): d for s, d in diffs.items()},
            "verdicts_per_seed": {str(s): v for s, v in verdicts.items()},
            "mean_length_per_seed": {str(s): ev["lengths"]["mean"] for s, ev in evs.items()},
            "train_min": _mean([r["train_s"] / 60 if r.get("train_s") else None for r in per_seed.values()]),
        }
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


_V = {"holds": "H", "undecided": "U", "violated": "V"}


def markdown(rows: dict, split: str, n_prompts: int | None, k: int | None) -> str:
    """The results table, one row per model, and the paired differences of every seed."""
    lines = [
        f"Split: {split} ({n_prompts} prompts × {k} samples; log-perplexity of the {n_prompts} references). "
        "Verdicts per seed on the model's own bounds (min, max[, cut-off share]): H holds, U undecided, V violated "
        "(95% bootstrap interval over prompts). Δ: log-perplexity minus that of the SFT model of the same seed, "
        "paired over the references; mean over seeds ± its standard error over seeds (one seed: ± the paired s.e.).",
        "",
        "| model | range | seeds | mean length | median | verdicts per seed | cut-off share | repetition | "
        "distinct-2 | log-ppl (mean ± std) | Δ vs SFT (nats) | training (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in rows.items():
        rng = f"[{r['range'][0]}, {r['range'][1]}]" if r["range"] else "—"
        v = ", ".join("·".join(_V.get(vs.get(b), "?") for b in r["bounds"]) for vs in r["verdicts_per_seed"].values())
        v = v if r["bounds"] else ""
        d = r["minus_sft"]
        delta = f"{d['mean']:+.3f} ± {d['se']:.3f}" if d else "—"
        n = "—" if model == "initial" else len(r["seeds"])  # the initial model is not trained: one evaluation
        lines.append(
            f"| {model} | {rng} | {n} | {_f(r['mean_length'], '.1f')} | {_f(r['median_length'], '.1f')} "
            f"| {v or '—'} | {_f(r['truncated_share'], '.1%')} | {_f(r['repetition_rate'], '.1%')} | "
            f"{_f(r['distinct_2'], '.3f')} | {_f(r['logppl'], '.3f')} ± {_f(r['logppl_std'], '.3f')} | {delta} | "
            f"{_f(r['train_min'], '.1f')} |"
        )
    lines += ["", "| model | seed | mean length | Δ vs SFT, paired (± s.e.) |", "|---|---|---|---|"]
    for model, r in rows.items():
        for s, d in r["minus_sft_per_seed"].items():
            lines.append(f"| {model} | {s} | {r['mean_length_per_seed'][s]:.1f} | {d['mean']:+.3f} ± {d['se']:.3f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# figures


def figures(records: dict[int, dict[str, dict]], initial: dict | None, out_dir: Path) -> list[Path]:
    """``figure2.png`` (lengths as box plots with each model's range; log-perplexity mean ± std) and
    ``length_histograms.png`` (lengths per model with the range and the sampling cap), seeds pooled;
    ``figure1.png`` (the relaxed barrier) and ``training_curves.png`` (the first seed's training curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from l3m.report import length_boxes, plot_barrier, plot_length_histograms, plot_training, read_metrics

    evs: dict[str, list[dict]] = {}
    for model in MODELS:
        got = [initial] if model == "initial" else [records[s].get(model) for s in sorted(records)]
        got = [r["evaluation"] for r in got if r]
        if got:
            evs[model] = got
    if not evs:
        return []
    names = list(evs)
    lengths = {m: [v for ev in e for v in ev["lengths"]["values"]] for m, e in evs.items()}
    cap = next(iter(evs.values()))[0].get("max_new_tokens")
    pos = list(range(1, len(names) + 1))

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    length_boxes(ax, [lengths[m] for m in names], pos)
    labelled = False
    for p, m in zip(pos, names):
        rng = model_range(m)
        for b in rng or ():
            label = None if labelled else "range [l_min, l_max]"
            ax.hlines(b, p - 0.38, p + 0.38, colors="darkgreen", lw=2.5, label=label)
            labelled = True
    if cap:
        ax.axhline(cap, color="grey", ls=":", lw=1, label=f"sampling cap ({cap} tokens)")
    ax.plot([], [], "D", color="red", label="mean")
    ax.set_xticks(pos, names, rotation=15)
    ax.set(ylabel="response length (tokens)", title="Response lengths (seeds pooled; whiskers: min–max)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    for p, m in zip(pos, names):
        means = [ev["task_logppl"]["mean"] for ev in evs[m]]
        std = statistics.fmean(ev["task_logppl"]["std"] for ev in evs[m])
        ax2.errorbar([p], [statistics.fmean(means)], yerr=[std], fmt="o", capsize=5, color="navy")
        ax2.plot([p + 0.15] * len(means), means, ".", color="grey")
    ax2.errorbar([], [], yerr=[], fmt="o", color="navy", label="mean ± std over references (std averaged over seeds)")
    ax2.plot([], [], ".", color="grey", label="each seed's mean")
    ax2.set_xticks(pos, names, rotation=15)
    ax2.set(ylabel="task log-perplexity (nats per token)", title="Task log-perplexity of the references")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig2 = out_dir / "figure2.png"
    fig.savefig(fig2, dpi=110)
    plt.close(fig)

    hist = plot_length_histograms(
        lengths,
        out_dir / "length_histograms.png",
        cap=cap,
        ranges={m: model_range(m) for m in names if model_range(m)},
        title="Response lengths per model (seeds pooled)",
    )
    # the paper's Figure 1 (the barrier over the run's mu schedule, 1 down to 0.01) and the first seed's curves
    fig1 = plot_barrier(out_dir / "figure1.png", mus=(1.0, 0.3, 0.1, 0.03, 0.01))
    seed = min(records) if records else None
    runs = {m: out_dir / "runs" / f"seed{seed}" / m for m in MODELS[1:]}
    runs = {m: read_metrics(d) for m, d in runs.items() if (d / "metrics.jsonl").is_file()}
    if not runs:
        return [fig2, hist, fig1]
    ranges = {m: model_range(m) for m in runs if model_range(m)}
    curves = plot_training(runs, out_dir / "training_curves.png", length_ranges=ranges, title=f"seed {seed}")
    return [fig2, hist, fig1, curves]


# ----------------------------------------------------------------------------------------------
# running


class Paths:
    def __init__(self, results: Path, runs: Path, split: str):
        self.results, self.runs, self.split = results, runs, split
        self.data = runs / "data"

    def out(self, model: str, seed: int) -> Path:
        return self.runs / f"seed{seed}" / model

    def config(self, model: str, seed: int) -> Path:
        return self.results / "configs" / f"seed{seed}" / f"{model}.yaml"

    def record(self, model: str, seed: int | None) -> Path:
        return self.results / "evals" / ("initial.json" if seed is None else f"seed{seed}/{model}.json")


def l3m(*args: str) -> list[str]:
    return [sys.executable, "-m", "l3m.cli", *args]


def call(cmd: list[str], log: Path, threads: int) -> float:
    """Run ``cmd`` from the repository root, output to ``log``; its wall clock in seconds. Raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {rc}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def prepare(ns: argparse.Namespace, paths: Paths) -> None:
    """Write the splits (indices to results/splits.json, records to runs/.../data/) and every model's config."""
    import yaml

    records = json.loads(DATA.read_text())
    splits = split_by_key([e.prompt_text for e in load_examples(DATA)], SPLIT_SIZES, SPLIT_SEED)
    used = dict(splits)
    if ns.smoke:
        used = {n: v[: SMOKE["n_train"] if n == "train" else SMOKE["n_eval"]] for n, v in splits.items()}
    paths.results.mkdir(parents=True, exist_ok=True)
    paths.data.mkdir(parents=True, exist_ok=True)
    doc = {
        "data": os.path.relpath(DATA, REPO),
        "n_records": len(records),
        "split_seed": SPLIT_SEED,
        "sizes": {n: len(v) for n, v in used.items()},
        "note": "indices into the data file's JSON array; records that share a prompt are in one split",
        **used,
    }
    (paths.results / "splits.json").write_text(json.dumps(doc, indent=None) + "\n")
    for name, idx in used.items():
        (paths.data / f"{name}.json").write_text(json.dumps([records[i] for i in idx], indent=1))
    (paths.data / "eval_constraints.yaml").write_text(yaml.safe_dump(eval_constraints(), sort_keys=False))
    for seed in ns.seeds:
        for model in ns.models:
            if model == "initial":
                continue
            out = rel(paths.out(model, seed))
            cfg = model_config(model, seed, rel(paths.data / "train.json"), out, ns.model, ns.smoke, ns.overrides)
            f = paths.config(model, seed)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(
                f"# {model}, training seed {seed}: written by experiments/length/run.py. From the repository root:\n"
                f"#   l3m train {rel(f)}\n" + yaml.safe_dump(cfg, sort_keys=False)
            )


def run_job(model: str, seed: int | None, ns: argparse.Namespace, paths: Paths, threads: int) -> str:
    """Train (or resume) one model, evaluate it on the split and save its record; skip what is done."""
    record = paths.record(model, seed)
    if record.is_file():
        return f"{model} seed {seed}: done before, kept"
    train_s, steps, model_path = None, None, ns.model
    tag = "initial" if seed is None else f"seed{seed}_{model}"
    if model != "initial":
        out = paths.out(model, seed)
        timing = out / "train_time.json"
        finished = (out / "summary.json").is_file() and (out / "config.json").is_file()
        if not finished:
            checkpoints = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
            cmd = l3m("train", str(paths.config(model, seed)))
            if checkpoints:
                cmd.append("training.resume_from_checkpoint=true")
            elif out.exists():
                shutil.rmtree(out)  # a fresh start: metrics.jsonl would be appended to
            before = json.loads(timing.read_text()) if timing.is_file() else {"train_s": 0.0, "segments": 0}
            print(f"== training {model}, seed {seed}{' (resuming)' if checkpoints else ''}", flush=True)
            t = call(cmd, paths.runs / "logs" / f"{tag}_train.log", threads)
            timing.write_text(json.dumps({"train_s": before["train_s"] + t, "segments": before["segments"] + 1}))
            for c in out.glob("checkpoint-*"):  # only needed to resume; the saved model is the run's result
                shutil.rmtree(c)
        t = json.loads(timing.read_text()) if timing.is_file() else {}
        train_s = t.get("train_s")
        summary = json.loads((out / "summary.json").read_text())
        steps = summary.get("steps")
        model_path = rel(out)
        dst = paths.results / "runs" / f"seed{seed}" / model
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("metrics.jsonl", "summary.json"):
            if (out / f).is_file():
                shutil.copy(out / f, dst / f)
    ev_cfg = {**EVAL, **(SMOKE["eval"] if ns.smoke else {})}
    stem = paths.runs / "evals" / paths.split / tag
    cmd = l3m(
        "evaluate",
        "--model",
        model_path,
        "--data",
        rel(paths.data / f"{paths.split}.json"),
        "--constraints",
        rel(paths.data / "eval_constraints.yaml"),
        "--num-samples",
        str(ev_cfg["k"]),
        "--max-new-tokens",
        str(ev_cfg["max_new_tokens"]),
        "--temperature",
        str(ev_cfg["temperature"]),
        "--seed",
        str(ev_cfg["seed"]),
        "--batch-size",
        str(ev_cfg["batch_size"]),
        "--name",
        model,
        "--quiet",
        "--output",
        str(stem),
    )
    print(f"== evaluating {model}{'' if seed is None else f', seed {seed}'} on the {paths.split} split", flush=True)
    eval_s = call(cmd, paths.runs / "logs" / f"{tag}_eval_{paths.split}.log", threads)
    ev = json.loads(stem.with_suffix(".json").read_text())["results"][0]
    record.parent.mkdir(parents=True, exist_ok=True)
    rec = {"model": model, "seed": seed, "split": paths.split, "train_s": train_s, "steps": steps, "eval_s": eval_s}
    record.write_text(json.dumps({**rec, "evaluation": ev}, indent=1) + "\n")
    return f"{model} seed {seed}: mean length {ev['lengths']['mean']:.1f}, log-ppl {ev['task_logppl']['mean']:.3f}"


def load_records(paths: Paths, seeds: list[int]) -> tuple[dict[int, dict[str, dict]], dict | None]:
    records: dict[int, dict[str, dict]] = {s: {} for s in seeds}
    for s in seeds:
        for model in MODELS[1:]:
            f = paths.record(model, s)
            if f.is_file():
                records[s][model] = json.loads(f.read_text())
    f = paths.record("initial", None)
    return records, (json.loads(f.read_text()) if f.is_file() else None)


def report(paths: Paths, seeds: list[int], smoke: bool, overrides: dict | None = None) -> dict:
    """results.json, results.md and the figures, from the saved records."""
    records, initial = load_records(paths, seeds)
    rows = summarise(records, initial)
    any_ev = next((r["evaluation"] for r in [initial, *[x for s in records.values() for x in s.values()]] if r), None)
    n_prompts, k = (any_ev.get("n_prompts"), any_ev.get("k")) if any_ev else (None, None)
    out = {
        "experiment": "length-constrained L3Ms against SFT (the paper's Figure 2)",
        "smoke": smoke,
        "split": paths.split,
        "seeds": seeds,
        "ranges": RANGES,
        "truncated_at_most": TRUNCATED_AT_MOST,
        "training": training_settings(smoke, overrides),
        "eval": {**EVAL, **(SMOKE["eval"] if smoke else {})},
        "models": rows,
    }
    (paths.results / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    title = "# Length-constrained L3Ms against SFT" + (" (smoke run: not results)" if smoke else "")
    page = f"{title}\n\n{markdown(rows, paths.split, n_prompts, k)}"
    if figures(records, initial, paths.results):
        page += "\n![lengths and log-perplexity](figure2.png)\n\n![length histograms](length_histograms.png)\n"
        page += "\n![training curves](training_curves.png)\n\n![the relaxed barrier](figure1.png)\n"
    (paths.results / "results.md").write_text(page)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; smoke: 0)")
    p.add_argument("--split", choices=["test", "selection"], default="test", help="the split to score (default test)")
    p.add_argument("--jobs", type=int, default=1, help="models trained and evaluated side by side (default 1)")
    p.add_argument("--smoke", action="store_true", help="2 steps per model, 4 prompts: checks the pipeline")
    p.add_argument("--dry-run", action="store_true", help="write the splits and configs, train nothing")
    p.add_argument("--report-only", action="store_true", help="redo the table and figures from the saved records")
    p.add_argument("--only", nargs="+", choices=MODELS, default=None, help="only these models")
    p.add_argument("--model", default="default", help="the initial model (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training setting of every trained model, e.g. --set max_steps=90 (repeatable; use other --results "
        "and --runs folders for such a run)",
    )
    p.add_argument(
        "--results",
        default=None,
        help="results folder (default: experiments/length/results for the test split, "
        "runs/length/selection for the selection split, /tmp/l3m_length_smoke with --smoke)",
    )
    p.add_argument("--runs", default=None, help="checkpoints, split data and logs (default runs/length)")
    ns = p.parse_args(argv)
    if ns.jobs < 1:
        p.error(f"--jobs must be at least 1, got {ns.jobs}")
    ns.seeds = ns.seeds if ns.seeds is not None else ([0] if ns.smoke else [0, 1, 2])
    ns.overrides = {}
    for item in ns.set:
        key, eq, value = item.partition("=")
        if not eq or not key or key in ("seed", "output_dir"):
            p.error(f"--set expects KEY=VALUE with a training setting other than seed and output_dir, got {item!r}")
        import yaml

        ns.overrides[key] = yaml.safe_load(value)
    ns.models = ns.only or MODELS
    runs = Path(ns.runs or REPO / "runs" / ("length_smoke" if ns.smoke else "length")).resolve()
    default_results = (
        Path("/tmp/l3m_length_smoke") if ns.smoke else (HERE / "results" if ns.split == "test" else runs / "selection")
    )
    paths = Paths(Path(ns.results or default_results).resolve(), runs, ns.split)
    if ns.report_only:
        saved = paths.results / "results.json"
        if not ns.overrides and saved.is_file():  # the settings the saved evaluations were made with
            ns.overrides = json.loads(saved.read_text()).get("training")
        report(paths, ns.seeds, ns.smoke, ns.overrides)
        print((paths.results / "results.md").read_text())
        return 0
    if not DATA.is_file():
        print(f"the data set {DATA} is missing (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    prepare(ns, paths)
    if ns.dry_run:
        print(f"splits and configs written to {paths.results}; split data in {paths.data}")
        return 0
    jobs = [(m, None) for m in ns.models if m == "initial"]
    jobs += [(m, s) for s in ns.seeds for m in ns.models if m != "initial"]
    jobs.sort(key=lambda j: -COST[j[0]])
    # torch threads per child: the cores divided by the jobs, unless L3M_THREADS says otherwise
    threads = int(os.environ.get("L3M_THREADS") or max(1, (os.cpu_count() or 1) // ns.jobs))
    t0 = time.time()
    failed = []
    with ThreadPoolExecutor(ns.jobs) as pool:
        futures = {pool.submit(run_job, m, s, ns, paths, threads): (m, s) for m, s in jobs}
        for fut, (m, s) in futures.items():
            try:
                print("   " + fut.result(), flush=True)
            except Exception as exc:  # noqa: BLE001 (one failed model does not stop the others)
                failed.append(f"{m} seed {s}: {exc}")
    out = report(paths, ns.seeds, ns.smoke, ns.overrides)
    print((paths.results / "results.md").read_text())
    print(f"results in {paths.results}; wall clock {(time.time() - t0) / 60:.1f} min")
    if failed:
        print("failed:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0 if out["models"] else 1


if __name__ == "__main__":
    sys.exit(main())
