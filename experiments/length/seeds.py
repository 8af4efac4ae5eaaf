"""The length experiment's L3Ms over training seeds: each L3M against the SFT model trained with the same seed.

One run per seed says little about a ratio that sits near the 10% line: with seed 1 the short L3M was at +7.6%,
with seed 0 at +11.3%. This collects every results folder that holds an SFT model and L3Ms trained with the
same seed, on the same held-out split and evaluation prompts, and reports per seed and averaged over seeds:

    .venv/bin/python experiments/length/seeds.py            # prints the table, writes results/seeds.{json,md}

The folders and their seeds are listed in SEED_RUNS (each made by ``run.py --seed S --only ...``; see the README).
A folder without an SFT model is compared with the SFT model of another folder with the same seed; a folder
trained with other optimiser settings (SETTINGS_OF) with the SFT model in it, trained with the same settings.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# folder -> the training seed its models were made with (held-out split seed 0 and evaluation seed 1 in all)
SEED_RUNS = {
    # the committed run since stop 27: adam_beta1 0.5 for every model, barrier_s_power 1 for the L3Ms, shift_direction
    # stop_prob for medium and long, and shift_passed_end_weight 4 for long (since stop 28) and medium (stop 29)
    "results": 0,
    "results_stop29": 0,  # the committed run of stop 29 (long without clip_each_part)
    "results_stop27": 0,  # the committed run of stop 27 (medium and long without shift_passed_end_weight)
    "results_logodds": 0,  # the committed run of stops 25-26 (shift_direction logodds)
    "results_s_mu2": 0,  # the committed run of stop 24: adam_beta1 0.5, the paper's s = mu**2
    "results_beta1_0.9": 0,  # the committed run of stops 22 and 23: adam_beta1 0.9 (transformers' default)
    "results_sequence": 0,  # the committed run until stop 22: every range with the sequence estimator
    "results_seed1_short": 1,
    "results_seed1_medium": 1,
    "results_seed2": 2,
    "results_stop_gradient": 0,
    "results_stop_seed1_medium": 1,
    "results_stop_seed2_medium": 2,
    "results_stop_seed1_short": 1,
    "results_stop_seed2_short": 2,
    "results_p16_stop": 0,
    "results_p16_stop_seed2_medium": 2,
    "results_shift_all": 0,
    "results_shift_all_seed1_medium": 1,
    "results_shift_all_seed2_medium": 2,
    "results_shift_floor": 0,
    "results_shift_floor_seed1_medium": 1,
    "results_shift_floor_seed2_medium": 2,
    "results_shift_f1e-3": 0,
    "results_shift_f1e-3_seed1_medium": 1,
    "results_shift_f1e-3_seed2_medium": 2,
    "results_gm_shift": 0,
    "results_seed3": 3,  # SFT and short of seed 3 (stop 23; its medium run was stopped for the runs below)
    "results_beta1_0.5": 0,
    "results_beta1_0.5_seed1": 1,
    "results_beta1_0.5_seed2": 2,
    "results_beta1_0.5_seed3": 3,
    "results_beta1_0.5_seed4": 4,
    # stop 25: medium with barrier_s_power 1 (lambda_i at most 1/m), each folder holding its seed's beta1-0.5 SFT
    "results_s_mu_seed1": 1,
    "results_s_mu_seed2": 2,
    "results_s_mu_seed3": 3,
    "results_s_mu_seed4": 4,
    # stop 27: medium and long with shift_direction stop_prob (every P(stop) scaled alike), beside the SFT model of
    # their seed
    "results_stop_prob_seed1": 1,
    "results_stop_prob_seed2": 2,
    # stop 28: long with shift_passed_end_weight 4 (and 12, seed 0) on top of stop_prob, beside its seed's SFT model
    "results_passed_end12": 0,
    "results_passed_end4_seed1": 1,
    "results_passed_end4_seed2": 2,
    "results_passed_end4_seed3": 3,  # stop 29: long, committed settings, seed 3
    # stop 29: medium with shift_passed_end_weight 4, seeds 1 and 2 (seed 0's, stop 28, is results/'s medium)
    "results_passed_end4_medium_seed1": 1,
    "results_passed_end4_medium_seed2": 2,
    "results_steps90": 0,  # stop 29: SFT and long (committed settings) with 90 optimiser steps instead of 60
    # stop 30: long (seeds 1-3) and medium (seed 0) with clip_each_part, each beside its seed's SFT model (seed 0's
    # long is results/'s)
    "results_clip_parts_seed1": 1,
    "results_clip_parts_seed2": 2,
    "results_clip_parts_seed3": 3,
    "results_clip_parts_medium": 0,
}
# folders whose L3Ms used another gradient estimator for their length constraints (run.py --gradient): one for the
# folder, or one per model; the rest: "sequence", the method's. Each estimator is summarised on its own.
GRADIENT_OF: dict[str, str | dict[str, str]] = {
    # the committed run since stop 22: each range its own estimator (run.py's GRADIENTS)
    "results": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_stop27": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_s_mu2": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_beta1_0.9": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_gm_shift": "shift (l_min) + sequence (l_max)",
    "results_stop_gradient": "stop",
    "results_stop_seed1_medium": "stop",
    "results_stop_seed2_medium": "stop",
    "results_stop_seed1_short": "stop",
    "results_stop_seed2_short": "stop",
    "results_p16_stop": "stop",
    "results_p16_stop_seed2_medium": "stop",
    "results_shift_all": "shift, every decision",
    "results_shift_all_seed1_medium": "shift, every decision",
    "results_shift_all_seed2_medium": "shift, every decision",
    "results_shift_floor": "shift",
    "results_shift_floor_seed1_medium": "shift",
    "results_shift_floor_seed2_medium": "shift",
    "results_shift_f1e-3": "shift, floor 1e-3",
    "results_shift_f1e-3_seed1_medium": "shift, floor 1e-3",
    "results_shift_f1e-3_seed2_medium": "shift, floor 1e-3",
    "results_beta1_0.5": {"l3m_medium": "shift"},
    "results_beta1_0.5_seed1": {"l3m_medium": "shift"},
    "results_beta1_0.5_seed2": {"l3m_medium": "shift"},
    "results_beta1_0.5_seed3": {"l3m_medium": "shift"},
    "results_beta1_0.5_seed4": {"l3m_medium": "shift"},
    "results_s_mu_seed1": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_s_mu_seed2": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_s_mu_seed3": {"l3m_medium": "shift"},
    "results_s_mu_seed4": {"l3m_medium": "shift"},
    "results_logodds": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_stop_prob_seed1": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_stop_prob_seed2": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_passed_end12": {"l3m_long": "shift"},
    "results_passed_end4_seed1": {"l3m_long": "shift"},
    "results_passed_end4_seed2": {"l3m_long": "shift"},
    "results_passed_end4_seed3": {"l3m_long": "shift"},
    "results_passed_end4_medium_seed1": {"l3m_medium": "shift"},
    "results_passed_end4_medium_seed2": {"l3m_medium": "shift"},
    "results_steps90": {"l3m_long": "shift"},
    "results_stop29": {"l3m_medium": "shift", "l3m_long": "shift"},
    "results_clip_parts_seed1": {"l3m_long": "shift"},
    "results_clip_parts_seed2": {"l3m_long": "shift"},
    "results_clip_parts_seed3": {"l3m_long": "shift"},
    "results_clip_parts_medium": {"l3m_medium": "shift"},
}
# folders trained with other optimiser settings (run.py --set KEY=VALUE), for their SFT model as for their L3Ms: each
# L3M there is compared with the SFT model of its own folder, trained with the same settings
_STOP_PROB = "adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob"
SETTINGS_OF: dict[str, str | dict[str, str]] = {
    "results": {
        "l3m_short": "adam_beta1 0.5; barrier_s_power 1",  # shift_direction enters only a `shift` constraint
        "l3m_medium": _STOP_PROB + "; shift_passed_end_weight 4",
        "l3m_long": _STOP_PROB + "; shift_passed_end_weight 4; clip_each_part",
    },
    "results_stop29": {
        "l3m_short": "adam_beta1 0.5; barrier_s_power 1",
        "l3m_medium": _STOP_PROB + "; shift_passed_end_weight 4",
        "l3m_long": _STOP_PROB + "; shift_passed_end_weight 4",
    },
    "results_stop27": {
        "l3m_short": "adam_beta1 0.5; barrier_s_power 1",
        "l3m_medium": _STOP_PROB,
        "l3m_long": _STOP_PROB,
    },
    "results_logodds": "adam_beta1 0.5; barrier_s_power 1",
    "results_s_mu2": "adam_beta1 0.5",
    "results_beta1_0.5": "adam_beta1 0.5",
    "results_beta1_0.5_seed1": "adam_beta1 0.5",
    "results_beta1_0.5_seed2": "adam_beta1 0.5",
    "results_beta1_0.5_seed3": "adam_beta1 0.5",
    "results_beta1_0.5_seed4": "adam_beta1 0.5",
    "results_s_mu_seed1": "adam_beta1 0.5; barrier_s_power 1",
    "results_s_mu_seed2": "adam_beta1 0.5; barrier_s_power 1",
    "results_s_mu_seed3": "adam_beta1 0.5; barrier_s_power 1",
    "results_s_mu_seed4": "adam_beta1 0.5; barrier_s_power 1",
    "results_stop_prob_seed1": "adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob",
    "results_stop_prob_seed2": "adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob",
    "results_passed_end12": _STOP_PROB + "; shift_passed_end_weight 12",
    "results_passed_end4_seed1": _STOP_PROB + "; shift_passed_end_weight 4",
    "results_passed_end4_seed2": _STOP_PROB + "; shift_passed_end_weight 4",
    "results_passed_end4_seed3": _STOP_PROB + "; shift_passed_end_weight 4",
    "results_passed_end4_medium_seed1": _STOP_PROB + "; shift_passed_end_weight 4",
    "results_passed_end4_medium_seed2": _STOP_PROB + "; shift_passed_end_weight 4",
    "results_steps90": _STOP_PROB + "; shift_passed_end_weight 4; 90 steps",
    "results_clip_parts_seed1": _STOP_PROB + "; shift_passed_end_weight 4; clip_each_part",
    "results_clip_parts_seed2": _STOP_PROB + "; shift_passed_end_weight 4; clip_each_part",
    "results_clip_parts_seed3": _STOP_PROB + "; shift_passed_end_weight 4; clip_each_part",
    "results_clip_parts_medium": _STOP_PROB + "; shift_passed_end_weight 4; clip_each_part",
}
# folders whose L3Ms sampled more prompts per step than the task batch (run.py --set prompt_batch_size=N)
PROMPTS_OF = {"results_p16_stop": 16, "results_p16_stop_seed2_medium": 16}
L3MS = ("l3m_short", "l3m_medium", "l3m_long")
# (variant, against): compared seed by seed, paired on the same references
COMPARE = [
    ("l3m_medium (gradient: stop; 16 prompts per step)", "l3m_medium (gradient: stop)"),
    ("l3m_medium (gradient: shift)", "l3m_medium (gradient: stop)"),
    ("l3m_medium (gradient: shift)", "l3m_medium"),
    ("l3m_medium (gradient: shift, floor 1e-3)", "l3m_medium (gradient: shift)"),
    ("l3m_medium (gradient: shift, floor 1e-3)", "l3m_medium"),
    ("l3m_short (gradient: shift)", "l3m_short"),
    ("l3m_short (gradient: shift)", "l3m_short (gradient: stop)"),
    ("l3m_long (gradient: shift)", "l3m_long"),
    ("l3m_long (gradient: shift)", "l3m_long (gradient: stop)"),
    ("l3m_medium (gradient: shift (l_min) + sequence (l_max))", "l3m_medium (gradient: shift)"),
    ("l3m_long (gradient: shift (l_min) + sequence (l_max))", "l3m_long (gradient: shift)"),
    ("l3m_medium (gradient: shift; adam_beta1 0.5)", "l3m_medium (gradient: shift)"),
    ("l3m_short (adam_beta1 0.5)", "l3m_short"),
    ("l3m_long (gradient: shift; adam_beta1 0.5)", "l3m_long (gradient: shift)"),
    ("l3m_medium (gradient: shift; adam_beta1 0.5; barrier_s_power 1)", "l3m_medium (gradient: shift; adam_beta1 0.5)"),
    ("l3m_short (adam_beta1 0.5; barrier_s_power 1)", "l3m_short (adam_beta1 0.5)"),
    ("l3m_long (gradient: shift; adam_beta1 0.5; barrier_s_power 1)", "l3m_long (gradient: shift; adam_beta1 0.5)"),
    (
        "l3m_medium (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob)",
        "l3m_medium (gradient: shift; adam_beta1 0.5; barrier_s_power 1)",
    ),
    (
        "l3m_long (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob)",
        "l3m_long (gradient: shift; adam_beta1 0.5; barrier_s_power 1)",
    ),
    (
        "l3m_long (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob; "
        "shift_passed_end_weight 4)",
        "l3m_long (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob)",
    ),
    (
        "l3m_medium (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob; "
        "shift_passed_end_weight 4)",
        "l3m_medium (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob)",
    ),
    (
        "l3m_long (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob; "
        "shift_passed_end_weight 4; clip_each_part)",
        "l3m_long (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob; "
        "shift_passed_end_weight 4)",
    ),
    (
        "l3m_medium (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob; "
        "shift_passed_end_weight 4; clip_each_part)",
        "l3m_medium (gradient: shift; adam_beta1 0.5; barrier_s_power 1; shift_direction stop_prob; "
        "shift_passed_end_weight 4)",
    ),
]


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [x - y for x, y in zip(a, b, strict=True)]
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def collect(root: Path = HERE) -> dict:
    evals = {}  # folder -> {model: evaluation}
    sft_of_seed = {}  # seed -> the SFT model's task log-perplexity (from whichever folder holds that seed's SFT)
    for folder, seed in SEED_RUNS.items():
        path = root / folder / "results.json"
        if path.is_file():
            evals[folder] = {e["model"]: e for e in json.loads(path.read_text())["evaluations"]}
            if "sft" in evals[folder] and folder not in SETTINGS_OF:
                sft_of_seed.setdefault(seed, evals[folder]["sft"]["task_logppl"])
    rows = []
    for folder, ev in evals.items():
        seed = SEED_RUNS[folder]
        if folder in SETTINGS_OF:
            if "sft" not in ev:
                continue
            sft = ev["sft"]["task_logppl"]
        elif seed in sft_of_seed:
            sft = sft_of_seed[seed]
        else:
            continue
        for name in L3MS:
            if name not in ev:
                continue
            e = ev[name]
            d, se = _paired(e["task_logppl"]["per_example"], sft["per_example"])
            verdicts = [c["verdict"] for c in e["constraints"] if c["name"].startswith(name.split("_", 1)[1] + "_")]
            gradient = GRADIENT_OF.get(folder, "sequence")
            if isinstance(gradient, dict):
                gradient = gradient.get(name, "sequence")
            prompts = PROMPTS_OF.get(folder, 8)
            settings = SETTINGS_OF.get(folder)
            if isinstance(settings, dict):
                settings = settings[name]
            notes = (
                ([f"gradient: {gradient}"] if gradient != "sequence" else [])
                + ([f"{prompts} prompts per step"] if prompts != 8 else [])
                + ([settings] if settings else [])
            )
            rows.append(
                {
                    "model": name,
                    "gradient": gradient,
                    "prompts_per_step": prompts,
                    "settings": settings,
                    "label": f"{name} ({'; '.join(notes)})" if notes else name,
                    "seed": seed,
                    "folder": folder,
                    "range": e.get("range"),
                    "mean_length": e["lengths"]["mean"],
                    "verdicts": verdicts,
                    "sft_logppl": sft["mean"],
                    "logppl": e["task_logppl"]["mean"],
                    "ratio_to_sft": e["task_logppl"]["mean"] / sft["mean"],
                    "paired_minus_sft": d,
                    "paired_se": se,
                    "_per_example": e["task_logppl"]["per_example"],
                }
            )
    # the same model, seed and settings in two folders (a committed run and the runs it was assembled from): the
    # first folder of SEED_RUNS counts, the others are kept as repeats with their paired difference from it
    kept: dict[tuple[str, int], dict] = {}
    for r in rows:
        first = kept.setdefault((r["label"], r["seed"]), r)
        if first is not r:
            d, se = _paired(r["_per_example"], first["_per_example"])
            first.setdefault("repeats", []).append({"folder": r["folder"], "paired_difference": d, "se": se})
    rows = list(kept.values())
    summary = {}
    for label in dict.fromkeys(
        r["label"]
        for r in sorted(rows, key=lambda r: (r["gradient"] != "sequence", r["prompts_per_step"], bool(r["settings"])))
    ):
        rs = [r for r in rows if r["label"] == label]
        n = len(rs)
        summary[label] = {
            "seeds": [r["seed"] for r in rs],
            "mean_ratio_to_sft": sum(r["ratio_to_sft"] for r in rs) / n,
            "mean_paired_minus_sft": sum(r["paired_minus_sft"] for r in rs) / n,
            # the seeds' runs are independent: the standard error of their mean from the per-run standard errors
            "se_of_mean": math.sqrt(sum(r["paired_se"] ** 2 for r in rs)) / n,
            "mean_sft_logppl": sum(r["sft_logppl"] for r in rs) / n,
            "mean_length": sum(r["mean_length"] for r in rs) / n,
            "no_verdict_violated": all("violated" not in r["verdicts"] for r in rs),
        }
        s = summary[label]
        s["mean_paired_ratio"] = 1 + s["mean_paired_minus_sft"] / s["mean_sft_logppl"]
    # a variant against another on the same seed (the same SFT model and held-out references): paired differences
    variants = []
    for new_label, old_label in COMPARE:
        for r in rows:
            if r["label"] != new_label:
                continue
            base = [b for b in rows if b["label"] == old_label and b["seed"] == r["seed"]]
            if base:
                d, se = _paired(r["_per_example"], base[0]["_per_example"])
                variants.append(
                    {"label": new_label, "against": old_label, "seed": r["seed"], "paired_difference": d, "se": se}
                )
    for r in rows:
        del r["_per_example"]
    return {"runs": rows, "summary": summary, "variants": variants}


def markdown(out: dict) -> str:
    lines = [
        "| L3M | seed | range | mean length | verdicts (l_min, l_max) | its SFT log-ppl | L3M log-ppl | vs SFT | "
        "paired L3M − SFT (± s.e.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        lines.append(
            f"| {r['label']} | {r['seed']} | {r['range']} | {r['mean_length']:.1f} | {', '.join(r['verdicts'])} | "
            f"{r['sft_logppl']:.3f} | {r['logppl']:.3f} | {100 * (r['ratio_to_sft'] - 1):+.1f}% | "
            f"{r['paired_minus_sft']:+.3f} ± {r['paired_se']:.3f} |"
        )
    lines += ["", "| L3M | seeds | mean length | mean vs SFT | mean paired L3M − SFT (± s.e.) | no verdict violated |"]
    lines.append("|---|---|---|---|---|---|")
    for name, s in out["summary"].items():
        lines.append(
            f"| {name} | {', '.join(map(str, s['seeds']))} | {s['mean_length']:.1f} | "
            f"{100 * (s['mean_ratio_to_sft'] - 1):+.1f}% | {s['mean_paired_minus_sft']:+.3f} ± {s['se_of_mean']:.3f} | "
            f"{s['no_verdict_violated']} |"
        )
    if out.get("variants"):
        lines += ["", "| variant | against | seed | paired difference in log-ppl (± s.e.) |", "|---|---|---|---|"]
        for v in out["variants"]:
            lines.append(
                f"| {v['label']} | {v['against']} | {v['seed']} | {v['paired_difference']:+.3f} ± {v['se']:.3f} |"
            )
    repeats = [(r, x) for r in out["runs"] for x in r.get("repeats", [])]
    if repeats:
        lines += ["", "| model, counted from | repeated in | seed | paired difference in log-ppl (± s.e.) |"]
        lines.append("|---|---|---|---|")
        for r, x in repeats:
            lines.append(
                f"| {r['label']}, {r['folder']}/ | {x['folder']}/ | {r['seed']} | "
                f"{x['paired_difference']:+.4f} ± {x['se']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    out = collect()
    if not out["runs"]:
        print("no results folders with an SFT model and L3Ms found", file=sys.stderr)
        return 1
    md = markdown(out)
    (HERE / "results" / "seeds.json").write_text(json.dumps(out, indent=1))
    (HERE / "results" / "seeds.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
