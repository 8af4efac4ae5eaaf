"""The paper's Figure 2 at this project's scale: length-constrained L3Ms against an SFT model, on real data.

One command re-creates everything in ``experiments/length/results/`` (checkpoints go to ``runs/length/``,
which git ignores):

    .venv/bin/python experiments/length/run.py            # the full run: 2 processes side by side (--jobs)
    .venv/bin/python experiments/length/run.py --steps 6 --results /tmp/length6   # a shorter spot check
    .venv/bin/python experiments/length/run.py --smoke    # 2 steps per model, 8 prompts: checks the pipeline
    .venv/bin/python experiments/length/run.py --only l3m_medium --set num_generations=8 --results DIR  # an ablation

Every model starts from SmolLM2-135M-Instruct and is trained by the same ``L3MTrainer`` with the same data,
seed, optimiser and number of steps; the SFT model has no constraints, each L3M has one length range
``[l_min, l_max]`` (two constraints). Task data: ``../shared/data/sft/instruction_data_short.json``, split
once into train and held-out parts with a fixed seed. Each model is then evaluated on held-out prompts it
never saw: task log-perplexity of the reference responses, and ``k`` sampled responses per prompt whose
mean length is checked against every range with a 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data" / "sft" / "instruction_data_short.json"

# The length ranges [l_min, l_max] (tokens) of the L3Ms. The base model's responses average ~45 tokens at
# temperature 0.8 (many cut at 64); SFT on this data set's short answers (median ~10 tokens) brings that down
# to the low teens, so "short" lies below the SFT model's mean, "medium" and "long" above it. Ranges are at
# least 7 tokens wide and wider where responses are longer: the per-step estimate of the mean length from
# 4 prompts x 4 samples had a standard deviation of several tokens (measured per model: `step_noise` in
# results.json), and a range narrower than that noise flips in and out of feasibility from step to step.
RANGES = {"short": (3, 10), "medium": (20, 30), "long": (35, 50)}
# Each range's length gradient estimator (ours; see the README, "Which estimator for which range"): `shift` where
# the range lies above the length the model has on its own (medium, long: lengthening, which moving the stop
# decision does cheaply), the method's `sequence` where it lies below (short: a shorter answer needs other text).
# Until stop 22 every range used `sequence` (results_sequence/); `--gradient X` sets one estimator for all.
GRADIENTS = {"short": "sequence", "medium": "shift", "long": "shift"}
# Training settings of one range alone, on top of BASE_CONFIG's (ours; README, "Stop 28" and "Stop 29"): the ranges
# trained with `shift` push harder against stopping once past a likely end (shift_passed_end_weight 4). Paired against
# the same range and seed without it (nats): long seeds 0-2 -0.020 +- 0.008, -0.024 +- 0.008, -0.008 +- 0.009 (stop
# 28); medium seeds 0-2 -0.021 +- 0.005, -0.008 +- 0.002, -0.006 +- 0.005 (stop 29). Short's `sequence` estimator
# does not read it. The committed runs before: results_stop27/ (both without it), then long alone (stop 28).
# Long also clips its task and constraint gradients apart (clip_each_part; README, "Stop 30"): paired against the
# same seed without it -0.022 +- 0.007, -0.013 +- 0.008, -0.005 +- 0.011, -0.025 +- 0.005 nats (seeds 0-3), and
# 0.012-0.017 nats cheaper beyond the stop-or-never yardstick at its own length in each. The committed long before:
# results_stop29/. Medium with it once (seed 0): -0.005 +- 0.005, not adopted on one seed.
RANGE_TRAINING = {
    "medium": {"shift_passed_end_weight": 4},
    "long": {"shift_passed_end_weight": 4, "clip_each_part": True},
}

BASE_CONFIG = {
    "model": "default",
    "data": {"train": os.path.relpath(DATA, REPO), "heldout_fraction": 0.2},
    "training": {
        # 60 steps: at 30 (results_30_steps/) the L3Ms had made only ~60% of SFT's gain in task log-perplexity
        "max_steps": 60,
        # 8 prompts x 4 samples per step: with 4 prompts (results_batch4/) the per-step estimate of the mean length
        # was twice as noisy, the medium L3M ended below its l_min and every L3M's log-perplexity was higher
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_new_tokens": 64,
        "temperature": 0.8,
        # the samples' score-function log-probabilities at temperature 0.8 too, the distribution they are drawn from
        # (the default). Runs before stop 12 scored them at temperature 1, a biased estimate of grad C_i: they are
        # results_batch4/ and results_T1_scores/ (the previous committed run)
        "score_temperature": True,
        "learning_rate": 5.0e-5,
        # Adam's first moment at 0.5 (transformers' default 0.9), for SFT and the L3Ms alike: in three seeds the
        # medium L3M cost +9.1% against its own SFT model with 0.5 and +10.6% with 0.9, short +7.6% against +10.3%
        # (results_beta1_0.5*/, README). The committed run before stop 24 used 0.9: results_beta1_0.9/
        "adam_beta1": 0.5,
        "lr_scheduler_type": "linear",
        # (ours, an option; the paper: 2) the barrier's relaxation point s = mu**1, not mu**2, for the L3Ms (SFT has no
        # constraint): a violated constraint's lambda_i is then at most 1/m = 0.5 instead of 1/(m mu), which reaches 50.
        # With mu**2 a violated step's gradient was 90-360 before clipping against the task's 9, so its clipped update
        # was the constraint's alone; with mu it is 25-31 and the task keeps a share. Over seeds medium cost +8.0% and
        # +8.0% with it against +15.9% and +11.7% (stop 25, README). The committed run before: results_s_mu2/
        "barrier_s_power": 1,
        # (ours, an option; default "logodds") the direction of the `shift` estimator (medium, long; no other model
        # reads it): every P(stop) scaled alike rather than every stop log-odds moved alike, which left P(stop) at the
        # references' ends uneven. Cheaper in all 5 paired runs (medium seeds 0-2, long seeds 0-1; stop 27, README).
        # The committed run before: results_logodds/
        "shift_direction": "stop_prob",
        "max_length": 256,
        # (ours, documented in the README): an EMA over steps lowers the variance of the plug-in estimate of
        # C_i that sets lambda_i; with 16 samples per step the raw estimate is too noisy near a bound.
        "constraint_ema": 0.5,
        # (ours, documented in the README): save the mean of the weights over the last third of the steps. Near an
        # active bound the iterates oscillate around it (lambda jumps with each step's 16-sample estimate), and at
        # 60 steps the last iterate of "long" ended below its l_min (results_last_iterate/) while the training
        # samples of its last 20 steps averaged inside the range.
        "average_tail": 0.33,
        # mu decays to the default mu_min 0.01; results_mu_min_0.1/ holds the same run with "mu_min": 0.1 (the
        # three L3Ms; SFT has no constraint and is shared): not better (see the README)
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
    },
}
# A second source the models never trained on: Alpaca-GPT4 prompts (longer, open-ended answers). The ranges
# are checked there too, and its reference answers give a second task log-perplexity.
OTHER = REPO.parent / "shared" / "data" / "sft" / "alpaca_gpt4_en_demo.json"
N_OTHER = 60
EVAL = {"k": 2, "n_prompts": 150, "max_new_tokens": 64, "temperature": 0.8, "batch_size": 25, "seed": 1}
SCALE = 10.0  # c = (l_min - len) / 10 and (len - l_max) / 10: C in units of 10 tokens, as in the demo config


def model_configs(gradient: str | None = None, gradient_min: str | None = None) -> dict[str, dict]:
    """Every model's config. ``gradient`` is the estimator of every range's length constraints (see
    ``--gradient``; default: each range's own, ``GRADIENTS``), and ``gradient_min``, where given and different,
    that of each range's lower bound alone (``--gradient-min``)."""
    out = {"sft": {**BASE_CONFIG, "constraints": None}}
    for name, (lo, hi) in RANGES.items():
        est = gradient or GRADIENTS[name]
        if gradient_min in (None, est):
            cons = [{"kind": "length", "min": lo, "max": hi, "name": "length", "scale": SCALE}]
            if est != "sequence":
                cons[0]["gradient"] = est
        else:  # one entry per bound, named as the two-bound entry names its constraints
            cons = [
                {"kind": "length", "min": lo, "name": "length_min", "scale": SCALE, "gradient": gradient_min},
                {"kind": "length", "max": hi, "name": "length_max", "scale": SCALE, "gradient": est},
            ]
        training = {**BASE_CONFIG["training"], **RANGE_TRAINING.get(name, {})}
        out[f"l3m_{name}"] = {**BASE_CONFIG, "training": training, "constraints": cons}
    return out


def all_constraints():
    """Every range as constraints, so each model's samples are checked against each range."""
    from l3m.constraints import LengthConstraint

    cons = []
    for name, (lo, hi) in RANGES.items():
        cons += [LengthConstraint(lo, "min", name=f"{name}_min"), LengthConstraint(hi, "max", name=f"{name}_max")]
    return cons


def step_noise(result: dict, prompts_per_step: int, k: int) -> dict:
    """The standard deviation of a training step's estimate of the mean length, from held-out samples.

    Between-prompt and within-prompt variances come from the evaluation's ``k`` samples per prompt; a step
    with B prompts and k samples each estimates the mean with variance var_between / B + var_within / (B k).
    """
    import torch

    x = torch.tensor(result["lengths"]["values"], dtype=torch.float64).reshape(-1, result["k"])
    within = float(x.var(dim=1, unbiased=True).mean())
    between = max(float(x.mean(1).var()) - within / result["k"], 0.0)
    sd = (between / prompts_per_step + within / (prompts_per_step * k)) ** 0.5
    return {
        "var_between_prompts": between,
        "var_within_prompt": within,
        "step_sd_tokens": sd,
        "prompts_per_step": prompts_per_step,
        "samples_per_prompt": k,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="2 steps per model, 8 held-out prompts (pipeline check)")
    p.add_argument("--results", default=None, help="results folder (default experiments/length/results)")
    p.add_argument("--runs", default=None, help="checkpoint folder (default runs/length)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per model (default 60)")
    p.add_argument("--seed", type=int, default=None, help="training seed of every model (default 0)")
    p.add_argument(
        "--heldout-seed", type=int, default=None, help="seed of the train/held-out split (data.heldout_seed; default 0)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting of every model, e.g. --set num_generations=8 (repeatable; for ablations)",
    )
    p.add_argument(
        "--gradient",
        choices=["sequence", "stop", "shift"],
        default=None,
        help="one gradient estimator for every range's length constraints: the score function of the whole "
        "response (sequence, the method's), of its stop decisions only (stop), or that projected on a uniform "
        "shift of the stop log-odds (shift). Default: each range's own (shift for medium and long, which lie above "
        "the model's length; sequence for short); see the README",
    )
    p.add_argument(
        "--gradient-min",
        choices=["sequence", "stop", "shift"],
        default=None,
        help="the estimator of each range's lower bound alone (default: the range's own), e.g. --gradient-min shift: "
        "shift lengthens cheaply, while shortening needs other text (see the README)",
    )
    p.add_argument("--only", nargs="*", help="train/evaluate only these models (e.g. sft l3m_short)")
    p.add_argument("--report-only", action="store_true", help="redo the report from the saved results")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="models trained side by side, each in its own process (default: 2 where there are 2 cores)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: the cores divided by --jobs)"
    )
    ns = p.parse_args(argv)
    if ns.jobs < 1:
        p.error(f"--jobs must be at least 1, got {ns.jobs}")
    threads = ns.threads or max(1, (os.cpu_count() or 1) // ns.jobs)
    models = [n for n in model_configs() if not ns.only or n in ns.only]
    if ns.jobs > 1 and not ns.report_only and len(models) > 1:
        if not DATA.is_file():
            print(f"the data set {DATA} is missing (see ../shared/data/README.md)", file=sys.stderr)
            return 1
        return run_in_parallel(ns, models, threads)

    import torch

    # one thread per process by default: two processes side by side use the 2 cores better than one process with
    # two threads (the model is small, and sampling is many small matrix products)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(REPO)
    import yaml

    from l3m.evaluation import evaluate_model, training_warnings
    from l3m.report import make_report

    results_dir = Path(ns.results or ("/tmp/l3m_length_smoke" if ns.smoke else HERE / "results"))
    runs_dir = Path(ns.runs or (REPO / "runs" / ("length_smoke" if ns.smoke else "length")))
    results_file = results_dir / "results.json"
    if ns.report_only:
        res = json.loads(results_file.read_text())
        runs = results_dir / "runs"  # per-run metrics; absent from results committed before stop 17 (see README)
        order = list(model_configs())  # the models in the order the full run reports them
        make_report(
            sorted(runs.iterdir(), key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
            if runs.is_dir()
            else [],
            res["evaluations"],
            results_dir,
            res["ranges"],
            title="Length-constrained L3Ms (paper Figure 2) on instruction_data_short",
            barrier_s_power=_barrier_s_power(results_dir),
        )
        return 0
    if not DATA.is_file():
        print(f"the data set {DATA} is missing (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    from l3m.cli import run_train

    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "configs").mkdir(exist_ok=True)
    t_start = time.time()
    previous = json.loads(results_file.read_text()) if results_file.is_file() and ns.only else {}
    evaluations = {e["model"]: e for e in previous.get("evaluations", [])}
    timings = previous.get("timings", {})
    cons = all_constraints()
    n_eval = 8 if ns.smoke else EVAL["n_prompts"]
    for name, cfg in model_configs(ns.gradient, ns.gradient_min).items():
        if ns.only and name not in ns.only:
            continue
        cfg = json.loads(json.dumps(cfg))
        cfg["training"]["output_dir"] = (
            str((runs_dir / name).relative_to(REPO)) if runs_dir.is_relative_to(REPO) else str(runs_dir / name)
        )
        if ns.steps:
            cfg["training"]["max_steps"] = ns.steps
        if ns.smoke:
            cfg["training"]["max_steps"] = 2
        if ns.seed is not None:
            cfg["training"]["seed"] = ns.seed
        if ns.heldout_seed is not None:
            cfg["data"]["heldout_seed"] = ns.heldout_seed
        for item in ns.set:
            key, _, value = item.partition("=")
            cfg["training"][key] = yaml.safe_load(value)
        cfg_path = results_dir / "configs" / f"{name}.yaml"
        cfg_path.write_text(
            f"# {name}: written by experiments/length/run.py; `l3m train` this from the repo root\n"
            + yaml.safe_dump(cfg, sort_keys=False)
        )
        out = Path(cfg["training"]["output_dir"])
        if out.exists():
            shutil.rmtree(out)  # a fresh run: metrics.jsonl is appended to
        print(f"== training {name} ({cfg['training']['max_steps']} steps) ==", flush=True)
        t0 = time.time()
        summary = run_train(str(cfg_path), [], quiet=True)
        t_train = time.time() - t0
        trainer = summary["_trainer"]
        heldout = summary["_heldout"][:n_eval]
        model = trainer.accelerator.unwrap_model(trainer.model)
        print(f"== evaluating {name} on {len(heldout)} held-out prompts x {EVAL['k']} ==", flush=True)
        t0 = time.time()
        ev = evaluate_model(
            model,
            trainer.processing_class,
            cons,
            heldout,
            k=EVAL["k"],
            max_new_tokens=EVAL["max_new_tokens"],
            temperature=EVAL["temperature"],
            batch_size=EVAL["batch_size"],
            seed=EVAL["seed"],
            max_length=256,
            progress=False,
            name=name,
            warned=training_warnings(out),
        )
        if OTHER.is_file():
            from l3m.data import load_examples

            other = load_examples(str(OTHER))[: (4 if ns.smoke else N_OTHER)]
            ev["other_source"] = evaluate_model(
                model,
                trainer.processing_class,
                cons,
                other,
                k=EVAL["k"],
                max_new_tokens=EVAL["max_new_tokens"],
                temperature=EVAL["temperature"],
                batch_size=EVAL["batch_size"],
                seed=EVAL["seed"],
                max_length=384,
                progress=False,
                name=f"{name} on {OTHER.name}",
            )
        t_eval = time.time() - t0
        tr = cfg["training"]
        prompts_per_step = tr.get("prompt_batch_size") or tr["per_device_train_batch_size"]
        ev["step_noise"] = step_noise(
            ev, prompts_per_step * tr.get("gradient_accumulation_steps", 1), tr["num_generations"]
        )
        ev["range"] = list(RANGES[name[4:]]) if name.startswith("l3m_") else None
        evaluations[name] = ev
        timings[name] = {"train_s": t_train, "eval_s": t_eval, "steps": summary["steps"]}
        dst = results_dir / "runs" / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("metrics.jsonl", "summary.json"):
            if (out / f).is_file():
                shutil.copy(out / f, dst / f)
        del trainer, model, summary
        print(
            f"   {name}: train {t_train:.0f} s, eval {t_eval:.0f} s, mean length {ev['lengths']['mean']:.1f}, "
            f"log-ppl {ev['task_logppl']['mean']:.3f} ± {ev['task_logppl']['std']:.3f}",
            flush=True,
        )
        evs = [evaluations[n] for n in model_configs() if n in evaluations]
        _save(results_file, evs, timings, t_start, previous, ns.smoke)
    evs = [evaluations[n] for n in model_configs() if n in evaluations]
    res = _save(results_file, evs, timings, t_start, previous, ns.smoke)
    _finish(results_dir, res)
    return 0


def _barrier_s_power(results_dir: Path) -> float:
    """The ``barrier_s_power`` the L3Ms of a results folder were trained with (their configs; default 2)."""
    import yaml

    powers = {
        yaml.safe_load(f.read_text())["training"].get("barrier_s_power", 2.0)
        for f in sorted((results_dir / "configs").glob("l3m_*.yaml"))
    }
    return powers.pop() if len(powers) == 1 else 2.0


def _finish(results_dir: Path, res: dict) -> None:
    """Write results.md, the terminal table and the report's figures from a results dict."""
    from l3m.evaluation import markdown_table, print_rich
    from l3m.report import make_report

    evs = res["evaluations"]
    (results_dir / "results.md").write_text(_summary_md(res) + "\n## All numbers\n\n" + markdown_table(evs))
    print_rich(evs)
    make_report(
        [results_dir / "runs" / n for n in model_configs() if (results_dir / "runs" / n).is_dir()],
        evs,
        results_dir,
        RANGES,
        title="Length-constrained L3Ms (paper Figure 2) on instruction_data_short",
        barrier_s_power=_barrier_s_power(results_dir),
    )
    print(f"results in {results_dir}; wall clock {res['wall_clock_s'] / 60:.1f} min")


# Relative cost of each model (training samples longer responses costs more), to balance the parallel processes.
COST = {"sft": 1.0, "l3m_short": 3.0, "l3m_medium": 3.5, "l3m_long": 4.5}


def split_jobs(models: list[str], jobs: int) -> list[list[str]]:
    """Deal the models to ``jobs`` processes, the most expensive first, each to the least loaded process."""
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(models)))]
    load = [0.0] * len(groups)
    for m in sorted(models, key=lambda m: -COST.get(m, 3.0)):
        i = load.index(min(load))
        groups[i].append(m)
        load[i] += COST.get(m, 3.0)
    return groups


def run_in_parallel(ns: argparse.Namespace, models: list[str], threads: int) -> int:
    """Run the models in ``ns.jobs`` processes of this script (``--only``, ``--jobs 1``), then merge their results.

    Each process writes its own results folder under ``RESULTS/parts/``; the merged results.json counts the wall
    clock of the whole invocation, and every model's own training and evaluation time as before.
    """
    import subprocess

    results_dir = Path(ns.results or ("/tmp/l3m_length_smoke" if ns.smoke else HERE / "results"))
    parts = results_dir / "parts"
    if parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    # the child processes get every option of this one but the models, the results folder and the process layout
    rest = (["--smoke"] if ns.smoke else []) + (["--gradient", ns.gradient] if ns.gradient else [])
    if ns.gradient_min:
        rest += ["--gradient-min", ns.gradient_min]
    for flag, value in (
        ("--runs", ns.runs),
        ("--steps", ns.steps),
        ("--seed", ns.seed),
        ("--heldout-seed", ns.heldout_seed),
    ):
        if value is not None:
            rest += [flag, str(value)]
    for item in ns.set:
        rest += ["--set", item]
    groups = split_jobs(models, ns.jobs)
    previous = (
        json.loads((results_dir / "results.json").read_text())
        if ns.only and (results_dir / "results.json").is_file()
        else {}
    )
    t_start = time.time()
    procs = []
    for i, group in enumerate(groups):
        out = parts / f"job{i}"
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--only", *group]
        cmd += ["--results", str(out), "--jobs", "1", "--threads", str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        log = open(parts / f"job{i}.log", "w")
        print(f"== process {i}: {' '.join(group)} (log {log.name}) ==", flush=True)
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, group))
    failed = []
    for proc, log, group in procs:
        rc = proc.wait()
        log.close()
        print(f"== process for {' '.join(group)} finished (exit {rc}) ==", flush=True)
        if rc != 0:
            failed.append(f"{' '.join(group)} (exit {rc}; see {log.name})")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    evaluations = {e["model"]: e for e in previous.get("evaluations", [])}
    timings = dict(previous.get("timings", {}))
    for i in range(len(groups)):
        part = parts / f"job{i}"
        r = json.loads((part / "results.json").read_text())
        evaluations.update({e["model"]: e for e in r["evaluations"]})
        timings.update(r["timings"])
        for sub in ("runs", "configs"):
            for src in (part / sub).iterdir():
                dst = results_dir / sub / src.name
                if src.is_dir():
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, dst)
    evs = [evaluations[n] for n in model_configs() if n in evaluations]
    res = _save(results_dir / "results.json", evs, timings, t_start, {}, ns.smoke)
    res["processes"] = {"jobs": len(groups), "threads_each": threads, "models": groups}
    res["process_time_sum_s"] = sum(t["train_s"] + t["eval_s"] for t in timings.values())
    if previous:  # models merged from an earlier invocation: the wall clock of this one alone would understate it
        res["wall_clock_s"] = res["process_time_sum_s"]
    (results_dir / "results.json").write_text(json.dumps(res, indent=1))
    shutil.rmtree(parts)
    _finish(results_dir, res)
    return 0


def _save(path: Path, evs: list[dict], timings: dict, t_start: float, previous: dict, smoke: bool) -> dict:
    res = {
        "experiment": "length-constrained L3Ms vs SFT (paper Figure 2)",
        "data": str(DATA.relative_to(REPO.parent)),
        "smoke": smoke,
        "ranges": RANGES,
        "config": BASE_CONFIG,
        "eval": EVAL,
        "timings": timings,
        # with --only, models come from several invocations: the sum of every model's training and evaluation
        # time is what one full invocation takes (model loading aside)
        "wall_clock_s": (time.time() - t_start)
        if not previous
        else sum(t["train_s"] + t["eval_s"] for t in timings.values()),
        "evaluations": evs,
    }
    res["targets"] = check_targets(evs)
    path.write_text(json.dumps(res, indent=1))
    return res


def check_targets(evs: list[dict]) -> dict:
    """The issue's targets, checked on the numbers."""
    from l3m.evaluation import paired_difference

    by = {e["model"]: e for e in evs}
    out: dict = {}
    sft = by.get("sft")
    for name, (lo, hi) in RANGES.items():
        e = by.get(f"l3m_{name}")
        if not e:
            continue
        verdicts = {c["name"]: c["verdict"] for c in e["constraints"]}
        v = [verdicts[f"{name}_min"], verdicts[f"{name}_max"]]
        t = {
            "range": [lo, hi],
            "mean_length": e["lengths"]["mean"],
            "verdicts": v,
            # the test: no verdict violated ("holds, or at worst undecided")
            "inside": "violated" not in v,
            # stricter: the held-out mean itself lies in [l_min, l_max] (an undecided mean may sit just outside)
            "mean_inside": lo <= e["lengths"]["mean"] <= hi,
            "certified": v == ["holds", "holds"],
        }
        if sft:
            ratio = e["task_logppl"]["mean"] / sft["task_logppl"]["mean"]
            t["logppl_ratio_to_sft"] = ratio
            t["logppl_within_10pct"] = abs(ratio - 1) <= 0.10
            # the same held-out references scored by both models: the paired difference has a far smaller error
            t["logppl_minus_sft_paired"] = paired_difference(
                e["task_logppl"].get("per_example"), sft["task_logppl"].get("per_example")
            )
            if e.get("task_logppl_split") and sft.get("task_logppl_split"):
                b, bs = e["task_logppl_split"], sft["task_logppl_split"]
                t["body_ratio_to_sft"] = b["without_end_token"]["mean"] / bs["without_end_token"]["mean"]
                t["end_token_nll"] = b["end_token_nll"]["mean"]
        out[f"l3m_{name}"] = t
    if sft:
        m = sft["lengths"]["mean"]
        outside = [n for n, (lo, hi) in RANGES.items() if not lo <= m <= hi]
        out["sft"] = {
            "mean_length": m,
            "outside_ranges": outside,
            "outside_at_least_two": len(outside) >= 2,
            "ranges_below": [n for n, (lo, hi) in RANGES.items() if hi < m],
            "ranges_above": [n for n, (lo, hi) in RANGES.items() if lo > m],
        }
    return out


def _summary_md(res: dict) -> str:
    lines = [
        "# Length-constrained L3Ms vs SFT: results",
        "",
        f"Data: `{res['data']}`; wall clock {res['wall_clock_s'] / 60:.1f} min on this machine's CPU.",
        "",
        "| model | range [l_min, l_max] | mean length (95% CI) | verdicts (min, max) | task log-ppl "
        "(mean ± std) | log-ppl / SFT | L3M − SFT, paired (± s.e.) | without end token / SFT | end-token NLL | "
        "train / eval time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    t = res["targets"]
    for e in res["evaluations"]:
        rng = e.get("range")
        ci = next((c["ci95"] for c in e["constraints"] if c["name"].endswith("_max")), None)
        # the CI of the mean length follows from any length constraint's CI (C = len - l_max)
        lo_hi = ""
        if ci is not None:
            c = next(c for c in e["constraints"] if c["name"].endswith("_max"))
            off = c["mean_raw"] - c["value"]
            lo_hi = f" [{ci[0] + off:.1f}, {ci[1] + off:.1f}]"
        tg = t.get(e["model"], {})
        verd = ", ".join(tg.get("verdicts", [])) or "—"
        ratio = f"{tg['logppl_ratio_to_sft']:.3f}" if "logppl_ratio_to_sft" in tg else "—"
        tm = res["timings"].get(e["model"], {})
        split = e.get("task_logppl_split", {})
        body = f"{tg['body_ratio_to_sft']:.3f}" if "body_ratio_to_sft" in tg else "—"
        end = f"{split['end_token_nll']['mean']:.2f}" if split else "—"
        pd = tg.get("logppl_minus_sft_paired")
        paired = f"{pd['mean']:+.3f} ± {pd['se']:.3f}" if pd else "—"
        lines.append(
            f"| {e['model']} | {rng if rng else '— (no constraint)'} | {e['lengths']['mean']:.1f}{lo_hi} | {verd} | "
            f"{e['task_logppl']['mean']:.3f} ± {e['task_logppl']['std']:.3f} | {ratio} | {paired} | {body} | {end} | "
            f"{tm.get('train_s', 0) / 60:.1f} / {tm.get('eval_s', 0) / 60:.1f} min |"
        )
    others = [e for e in res["evaluations"] if e.get("other_source")]
    if others:
        lines += [
            "",
            f"On {others[0]['other_source'].get('n_prompts', N_OTHER)} prompts of `{OTHER.name}`, a source no model "
            f"trained on (k = {EVAL['k']}):",
            "",
            "| model | range | mean length | verdicts (min, max) | task log-ppl of its references (mean ± std) |",
            "|---|---|---|---|---|",
        ]
        for e in others:
            o, rng = e["other_source"], e.get("range")
            name = e["model"][4:] if e["model"].startswith("l3m_") else None
            verd = {c["name"]: c["verdict"] for c in o["constraints"]}
            v = f"{verd[name + '_min']}, {verd[name + '_max']}" if name else "—"
            lines.append(
                f"| {e['model']} | {rng if rng else '—'} | {o['lengths']['mean']:.1f} | {v} | "
                f"{o['task_logppl']['mean']:.3f} ± {o['task_logppl']['std']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
