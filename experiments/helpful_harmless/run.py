"""Helpful-and-harmless L3Ms against minimax (MM) baselines (the paper's Figure 3 and its efficiency claim).

One command runs everything (checkpoints go to ``runs/helpful_harmless/``, which git ignores; the numbers,
tables, configs and plots to ``experiments/helpful_harmless/results/``):

    .venv/bin/python experiments/helpful_harmless/run.py           # the full experiment (sized for one GPU)
    .venv/bin/python experiments/helpful_harmless/run.py --quick   # a few steps of everything: checks the pipeline

Stages, each ``l3m`` training run in a child process whose wall clock and peak memory are recorded
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the child's peak resident set size):

1. two reward models (``l3m train-reward``) on the default backbone: *helpful* from
   ``shared/data/preference/helpful/`` (PandaLM + Auto-J), *harmless* from ``preference/harmless/``
   (HH-RLHF harmless-base + PKU-SafeRLHF); pairwise accuracy on a held-out split by prompt;
2. SFT of the initial model on the task data (``shared/data/sft/``), the stage only MM needs;
3. the SFT model's mean rewards on held-out prompts; constraint points ``(b1, b2)`` above them, in units of
   each reward model's held-out reward standard deviation (also the constraints' ``scale``);
4. per point: one L3M (from the initial model: task loss + both reward constraints, one stage) and one MM
   (from the SFT model: KL to it + both constraints, ``method: minimax``), the same number of steps,
   batch, samples per step, learning rate and sampling prompts;
5. every model on held-out prompts (ordinary instructions mixed with harmful requests the harmless reward
   model never saw): mean rewards with 95% bootstrap intervals and a verdict per constraint, and the task
   log-perplexity of held-out references (mean ± std); then ``results.json``, ``results.md`` and
   ``figure3.png`` (``l3m.report_rewards.plot_reward_plane``).

Wall clock: an L3M's own run; an MM's is its alignment run plus the SFT stage (by default as many steps as
the L3M run; ``--sft-steps epoch``: one pass over the task data, as in the paper).
``--resume`` reuses finished stages of an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = REPO.parent / "shared" / "data"
PREF = SHARED / "preference"
RM_DATA = {
    "helpful": [PREF / "helpful" / "pandalm_testset_v1.json", PREF / "helpful" / "autoj_testdata_pairwise.jsonl"],
    # HH-RLHF alone: on HH's held-out pairs, adding PKU-SafeRLHF pairs to the training pairs did not help
    # (rm_choices/finetune.md); PKU's prompts still serve as harmful sampling prompts below
    "harmless": [PREF / "harmless" / "hh_rlhf_harmless_base_dev.jsonl.gz"],
}
HARMFUL_PROMPTS = [
    PREF / "harmless" / "hh_rlhf_harmless_base_dev.jsonl.gz",
    PREF / "harmless" / "pku_saferlhf_realign_5k.json",
]
AXES = ["helpful", "harmless"]

# Full-size settings (one GPU: about an hour in all; far too slow for a 2-core CPU) and the --quick ones.
FULL = {
    "rm": {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 2.0e-5,
        "warmup_steps": 0.05,
        "lr_scheduler_type": "cosine",
        "max_length": 512,
        "center_rewards_coefficient": 0.01,
        "max_train_pairs": None,
        "max_eval_pairs": None,
        "max_steps": -1,
    },
    "steps": 100,  # SFT, L3M and MM: the same number of optimiser steps
    "train": {
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_new_tokens": 96,
        "temperature": 0.8,
        "learning_rate": 5.0e-5,
        "lr_scheduler_type": "linear",
        "max_length": 384,
        "constraint_ema": 0.5,
    },
    "mm": {"beta": 0.05, "multiplier_lr": 0.1, "multiplier_init": 1.0},
    "deltas": [[0.25, 0.25], [0.5, 0.25], [0.25, 0.5]],  # (b1, b2) = SFT's mean rewards + deltas * reward std
    "eval": {"n_prompts": 160, "n_ppl": 200, "k": 2, "max_new_tokens": 96, "temperature": 0.8, "batch_size": 16},
}
# The 2-core CPU of this project's machines: reward models with a frozen 7-layer backbone and a fitted head
# (training.head_only; rm_choices/layer_probe.log for why 7 layers), short runs, shorter samples, fewer evaluation
# prompts.
CPU = {
    "rm": {
        "head_only": True,
        "per_device_train_batch_size": 8,
        "max_length": 256,
        "max_train_pairs": None,
        "max_eval_pairs": None,
    },
    "rm_layers": 7,
    "rm_heldout_fraction": 0.2,
    # then fine-tune the harmless model whole, starting from its fitted head (linear probe, then fine-tuning): the
    # head alone reached 0.634 on HH held-out pairs, this 0.647 (about 30 min on the CPU; rm_choices/finetune.md). The
    # helpful model met its target with the head alone and is not fine-tuned, to save that half hour.
    "rm_finetune": {
        "harmless": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "learning_rate": 2.0e-5,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 10,
            "weight_decay": 0.1,
            "max_length": 256,
            "logging_steps": 10,
            "disable_tqdm": True,
        }
    },
    "steps": 24,
    "train": {
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_new_tokens": 48,
        "temperature": 0.8,
        "learning_rate": 5.0e-5,
        "lr_scheduler_type": "linear",
        "max_length": 256,
        "constraint_ema": 0.5,
    },
    "mm": FULL["mm"],
    "deltas": FULL["deltas"],
    "eval": {"n_prompts": 80, "n_ppl": 100, "k": 2, "max_new_tokens": 48, "temperature": 0.8, "batch_size": 20},
}
QUICK = {
    "rm": {**FULL["rm"], "max_steps": 4, "max_train_pairs": 32, "max_eval_pairs": 16},
    "rm_finetune": {"harmless": {**CPU["rm_finetune"]["harmless"], "max_steps": 2}},
    "steps": 2,
    "train": {**FULL["train"], "per_device_train_batch_size": 2, "num_generations": 2, "max_new_tokens": 16},
    "mm": FULL["mm"],
    "deltas": [[0.25, 0.25]],
    "eval": {**FULL["eval"], "n_prompts": 4, "n_ppl": 8, "max_new_tokens": 16},
}


def rel(path: str | Path) -> str:
    """A path relative to the repository root when it lies below its parent (configs stay portable)."""
    p = Path(path).resolve()
    return os.path.relpath(p, REPO) if p.is_relative_to(REPO.parent) else str(p)


# ----------------------------------------------------------------------------------------------
# child processes: one training run each, timed, with its peak memory


def child(kind: str, config: str, out_json: str) -> int:
    """Run ``l3m train`` / ``l3m train-reward`` on ``config`` in this process; write timing and memory."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("L3M_THREADS", "1")))
    t0 = time.perf_counter()
    if kind == "reward":
        from l3m.reward_training import run_train_reward

        summary = run_train_reward(config, [], quiet=True)
        extra = {"heldout": summary.get("heldout"), "steps": summary["steps"]}
    else:
        from l3m.cli import run_train

        summary = run_train(config, [], quiet=True)
        extra = {"steps": summary["steps"], "constraints": summary["constraints"]}
    wall = time.perf_counter() - t0
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(out_json).write_text(json.dumps({"wall_s": wall, "cuda_peak_mb": cuda_peak, **extra}, default=float))
    return 0


def run_child(kind: str, config: Path, out_json: Path, log: Path) -> dict:
    """The child's record, plus the process's wall clock and peak RSS (from ``wait4``)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, __file__, "_child", kind, str(config), str(out_json)],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{kind} run {config} failed; see {log}")
    rec = json.loads(out_json.read_text())
    rec["process_wall_s"] = time.perf_counter() - t0
    rec["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return rec


# ----------------------------------------------------------------------------------------------
# data: task split, sampling prompts (ordinary + harmful), constraint points


def task_split(task_path: Path, frac: float, seed: int):
    from l3m.data import load_examples, split_heldout

    return split_heldout(load_examples(task_path), frac, seed=seed)


def harmful_prompts(seed: int, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Single-turn harmful requests, each source split by prompt as the harmless reward model's data is (same
    fraction and seed): the held-out ones are requests that neither the reward model nor the policy saw."""
    from l3m.preference_data import load_preference_sources, split_pairs

    train, held = [], []
    for src in HARMFUL_PROMPTS:
        t, h = split_pairs(load_preference_sources([str(src)]).pairs, heldout_fraction, seed=seed)
        train += t
        held += h

    def single(ps):
        return sorted({p.prompt_text for p in ps if len(p.prompt) == 1})

    return single(train), sorted(set(single(held)) - set(single(train)))


def write_prompts(path: Path, ordinary: list[str], harmful: list[str], n: int | None, seed: int) -> list[str]:
    """Half ordinary instructions, half harmful requests (``n`` in all, or every one of them), shuffled."""
    rng = random.Random(seed)
    ordinary, harmful = list(ordinary), list(harmful)
    rng.shuffle(ordinary)
    rng.shuffle(harmful)
    if n is not None:
        ordinary, harmful = ordinary[: n - n // 2], harmful[: n // 2]
    prompts = ordinary + harmful
    rng.shuffle(prompts)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate(model_dir: str, name: str, rms: dict, b: list[float], scales: list[float], heldout, prompts, ev: dict):
    from l3m.constraints import RewardConstraint
    from l3m.data import Example
    from l3m.evaluation import evaluate_model
    from l3m.models import load_causal_lm, load_tokenizer

    cons = [RewardConstraint(rms[a], at_least=bi, name=a, scale=s) for a, bi, s in zip(AXES, b, scales)]
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    import torch

    if torch.cuda.is_available():
        model = model.cuda()
    examples = [Example(prompt=[{"role": "user", "content": p}], response=None) for p in prompts]
    res = evaluate_model(
        model,
        tok,
        cons,
        heldout,
        examples,
        k=ev["k"],
        max_new_tokens=ev["max_new_tokens"],
        temperature=ev["temperature"],
        batch_size=ev["batch_size"],
        seed=1,
        progress=False,
        name=name,
    )
    del model
    return res


def verdict_at(ci: list[float], b: float) -> str:
    """E[r] >= b on a reward interval: holds when it lies at or above b, violated when at or below."""
    return "holds" if ci[0] >= b else "violated" if ci[1] <= b else "undecided"


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return child(*argv[1:4])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps of every stage (pipeline check, not results)")
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None, help="sizes (default: gpu with CUDA, else cpu)")
    p.add_argument("--model", default="default", help="initial policy (and SFT start): default SmolLM2-135M-Instruct")
    p.add_argument("--rm-model", default="default", help="reward-model backbone (default SmolLM2-135M-Instruct)")
    p.add_argument("--task-data", default=str(SHARED / "sft" / "instruction_data_short.json"))
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of SFT, each L3M and each MM")
    p.add_argument(
        "--sft-steps",
        default=None,
        help="optimiser steps of the SFT stage alone (default: --steps, as many as each L3M / MM run); "
        "'epoch' runs one pass over the task's training split, the paper's SFT stage",
    )
    p.add_argument(
        "--points-from",
        default=None,
        metavar="RESULTS_JSON",
        help="take the constraint points (b1, b2) from an earlier run's results.json instead of placing them above "
        "this run's SFT rewards (to change the SFT stage and keep the points)",
    )
    p.add_argument("--results", default=None, help="results folder (default experiments/helpful_harmless/results)")
    p.add_argument("--runs", default=None, help="checkpoint folder (default runs/helpful_harmless)")
    p.add_argument("--resume", action="store_true", help="reuse the stages an earlier run finished")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reward-models",
        nargs=2,
        metavar=("HELPFUL", "HARMLESS"),
        help="use these reward models (trained by `l3m train-reward` with the configs this script writes) "
        "instead of training them",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting of every SFT, L3M and MM run, e.g. --set learning_rate=1e-4 (repeatable)",
    )
    p.add_argument(
        "--mm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the MM runs alone: beta, multiplier_lr (η) or multiplier_init (λ₀), e.g. "
        "--mm multiplier_lr=1.0 (repeatable)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="redo targets, results.md and figure3.png from results.json"
    )
    ns = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(REPO)  # configs name paths relative to the repository root
    if ns.report_only:
        return write_report(Path(ns.results or HERE / "results"))
    import torch
    import yaml

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("L3M_THREADS", "1")))  # a shared 2-core CPU: one thread per job
    missing = [str(f) for fs in [*RM_DATA.values(), HARMFUL_PROMPTS] for f in fs if not f.is_file()]
    if missing or not Path(ns.task_data).is_file():
        print(f"missing data: {missing or ns.task_data} (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    preset = "quick" if ns.quick else ns.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    S = {"quick": QUICK, "cpu": CPU, "gpu": FULL}[preset]
    steps = ns.steps or S["steps"]
    results = Path(
        ns.results or (REPO / "runs" / "helpful_harmless_quick" / "results" if ns.quick else HERE / "results")
    )
    runs = Path(ns.runs or (REPO / "runs" / ("helpful_harmless_quick" if ns.quick else "helpful_harmless")))
    for d in (results / "configs", results / "logs", results / "runs", runs):
        d.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    record_file = results / "stages.json"
    stages: dict = json.loads(record_file.read_text()) if ns.resume and record_file.is_file() else {}

    def stage(name: str, kind: str, cfg: dict) -> dict:
        if name in stages and Path(stages[name]["output_dir"]).is_dir():
            print(f"== {name}: reusing {stages[name]['output_dir']}", flush=True)
            return stages[name]
        out = Path(cfg["training"]["output_dir"])
        if out.exists():
            shutil.rmtree(out)
        cfg_path = results / "configs" / f"{name}.yaml"
        cmd = "l3m train-reward" if kind == "reward" else "l3m train"
        cfg_path.write_text(
            f"# {name}: written by experiments/helpful_harmless/run.py; `{cmd}` it from the repo root\n"
            + yaml.safe_dump(cfg, sort_keys=False)
        )
        print(
            f"== {name}: {cmd} {cfg_path.relative_to(REPO) if cfg_path.is_relative_to(REPO) else cfg_path}", flush=True
        )
        rec = run_child(kind, cfg_path, results / "logs" / f"{name}.json", results / "logs" / f"{name}.log")
        rec["output_dir"] = str(out)
        for f in ("metrics.jsonl", "summary.json", "reward_eval.json"):
            if (out / f).is_file():
                (results / "runs" / name).mkdir(exist_ok=True)
                shutil.copy(out / f, results / "runs" / name / f)
        stages[name] = rec
        record_file.write_text(json.dumps(stages, indent=1, default=float))
        mem = f"{rec['cuda_peak_mb']:.0f} MiB GPU" if rec.get("cuda_peak_mb") else f"{rec['peak_rss_mb']:.0f} MiB RSS"
        print(f"   {name}: {rec['wall_s'] / 60:.1f} min, peak {mem}", flush=True)
        return rec

    # 1. reward models
    rm_dirs, rm_info = {}, {}
    for axis in AXES:
        rm = dict(S["rm"])
        data = {"train": [rel(f) for f in RM_DATA[axis]], "heldout_fraction": S.get("rm_heldout_fraction", 0.1)}
        for key in ("max_train_pairs", "max_eval_pairs"):
            if rm.pop(key):
                data[key] = S["rm"][key]
        cfg = {
            "model": ns.rm_model,
            "backbone_layers": S.get("rm_layers"),
            "data": data,
            "training": {**rm, "output_dir": rel(runs / f"rm_{axis}"), "seed": ns.seed, "disable_tqdm": True},
        }
        if ns.reward_models:  # reward models trained earlier (with these configs): read, not retrained
            given = Path(ns.reward_models[AXES.index(axis)])
            summary = json.loads((given / "reward_eval.json").read_text())
            ft = S.get("rm_finetune", {}).get(axis)
            written = {f"rm_{axis}": cfg}
            head_s = 0.0
            if ft:  # GIVEN is the fine-tuned model; its head-only start is recorded as `backbone` in its summary
                start = summary.get("backbone") or rel(runs / f"rm_{axis}")
                if (Path(start) / "reward_eval.json").is_file():
                    head_s = json.loads((Path(start) / "reward_eval.json").read_text())["train_seconds"]
                cfg["training"]["output_dir"] = start
                written[f"rm_{axis}_ft"] = {
                    "model": start,
                    "data": data,
                    "training": {**ft, "output_dir": rel(given), "seed": ns.seed},
                }
            else:
                cfg["training"]["output_dir"] = rel(given)
            for name_, c in written.items():
                (results / "configs" / f"{name_}.yaml").write_text(
                    f"# {name_}: written by experiments/helpful_harmless/run.py; `l3m train-reward` it from the repo "
                    "root\n" + yaml.safe_dump(c, sort_keys=False)
                )
            rec = {
                "wall_s": summary["train_seconds"] + head_s,
                "output_dir": str(given),
                "reused": True,
                "cuda_peak_mb": None,
                "heldout": summary.get("heldout"),
                "steps": summary["steps"],
            }
            stages[f"rm_{axis}"] = rec
            (results / "runs" / f"rm_{axis}").mkdir(exist_ok=True)
            shutil.copy(given / "reward_eval.json", results / "runs" / f"rm_{axis}" / "reward_eval.json")
        else:
            rec = stage(f"rm_{axis}", "reward", cfg)
            ft = S.get("rm_finetune", {}).get(axis)
            if ft:  # the whole model, from the fitted head: the backbone is already cut to rm_layers
                ft_cfg = {
                    "model": rel(rec["output_dir"]),
                    "data": data,
                    "training": {**ft, "output_dir": rel(runs / f"rm_{axis}_ft"), "seed": ns.seed},
                }
                head_s = rec["wall_s"]
                rec = dict(stage(f"rm_{axis}_ft", "reward", ft_cfg))
                rec["wall_s"] = rec["wall_s"] + head_s
        rm_dirs[axis] = rec["output_dir"]
        rm_info[axis] = json.loads((Path(rec["output_dir"]) / "reward_eval.json").read_text())["heldout"]
        print(
            f"   {axis} reward model: held-out accuracy {rm_info[axis]['accuracy']:.3f} "
            f"[{rm_info[axis]['ci95'][0]:.3f}, {rm_info[axis]['ci95'][1]:.3f}] on {rm_info[axis]['n_pairs']} pairs"
        )
    scales = [max(float(rm_info[a]["reward_std"]), 1e-3) for a in AXES]

    # 2. data: task split (as `l3m train` splits it), sampling prompts
    frac = 0.1
    # held-out splits with seed 0 whatever --seed is, as `l3m train` and `l3m train-reward` split (data.heldout_seed)
    task_train, task_held = task_split(Path(ns.task_data), frac, 0)
    harm_train, harm_held = harmful_prompts(0, S.get("rm_heldout_fraction", 0.1))
    (runs / "data").mkdir(exist_ok=True)  # derived from ../shared/data: kept out of the repository
    train_prompts_file = runs / "data" / "train_prompts.jsonl"
    write_prompts(train_prompts_file, [e.prompt_text for e in task_train], harm_train, None, ns.seed)
    eval_prompts = write_prompts(
        runs / "data" / "eval_prompts.jsonl",
        [e.prompt_text for e in task_held],
        harm_held,
        S["eval"]["n_prompts"],
        ns.seed + 1,
    )
    heldout = task_held[: S["eval"]["n_ppl"]]
    base_training = {**S["train"], "max_steps": steps, "save_strategy": "no", "seed": ns.seed, "disable_tqdm": True}
    for item in ns.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        base_training[key] = yaml.safe_load(value)
    mm_settings = dict(S["mm"])
    for item in ns.mm:
        key, eq, value = item.partition("=")
        if not eq or key not in mm_settings:
            p.error(f"--mm expects KEY=VALUE with KEY one of {sorted(mm_settings)}, got {item!r}")
        mm_settings[key] = yaml.safe_load(value)
    data_cfg = {"train": rel(ns.task_data), "heldout_fraction": frac}

    # 3. SFT and its rewards
    sft_training = {**base_training, "output_dir": rel(runs / "sft")}
    if ns.sft_steps == "epoch":  # one pass over the task's training split
        sft_training.update(max_steps=-1, num_train_epochs=1)
    elif ns.sft_steps is not None:
        try:
            sft_training["max_steps"] = int(ns.sft_steps)
        except ValueError:
            p.error(f"--sft-steps expects a number of steps or 'epoch', got {ns.sft_steps!r}")
    sft = stage("sft", "train", {"model": ns.model, "data": data_cfg, "training": sft_training})
    from l3m.rewards import RewardModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rms = {a: RewardModel(rm_dirs[a], device=dev, batch_size=S["eval"]["batch_size"]) for a in AXES}
    evals: dict[str, dict] = {}
    evals_file = results / "evaluations.json"
    if ns.resume and evals_file.is_file():
        evals = {e["model"]: e for e in json.loads(evals_file.read_text())}
    print("== evaluating SFT", flush=True)
    if "SFT" not in evals:
        evals["SFT"] = evaluate(sft["output_dir"], "SFT", rms, [0.0, 0.0], scales, heldout, eval_prompts, S["eval"])
        evals_file.write_text(json.dumps(list(evals.values()), default=float))
    sft_r = [next(c["mean_raw"] for c in evals["SFT"]["constraints"] if c["name"] == a) for a in AXES]
    if ns.points_from:  # the points of an earlier run, as they were (their deltas are against its SFT model)
        points = json.loads(Path(ns.points_from).read_text())["points"]
    else:
        points = [
            {
                "name": f"P{i + 1}",
                "b": [round(r + d * s, 4) for r, d, s in zip(sft_r, delta, scales)],
                "delta_in_std": delta,
            }
            for i, delta in enumerate(S["deltas"])
        ]
    print(f"   SFT mean rewards {sft_r}; constraint points {[p['b'] for p in points]}", flush=True)

    # 4. per point: one L3M, one MM
    plan = {}
    for pt in points:
        cons = [
            {"kind": "reward", "model": rm_dirs[a], "at_least": float(bi), "name": a, "scale": s}
            for a, bi, s in zip(AXES, pt["b"], scales)
        ]
        common = {"data": {**data_cfg, "prompts": rel(train_prompts_file)}, "constraints": cons}
        l3m_cfg = {
            "model": ns.model,
            **common,
            "training": {**base_training, "output_dir": rel(runs / f"l3m_{pt['name']}")},
        }
        mm_cfg = {
            "method": "minimax",
            "model": sft["output_dir"],
            **common,
            "training": {
                **base_training,
                **mm_settings,
                "ref_model": sft["output_dir"],
                "output_dir": rel(runs / f"mm_{pt['name']}"),
            },
        }
        plan[pt["name"]] = {
            "L3M": stage(f"l3m_{pt['name']}", "train", l3m_cfg),
            "MM": stage(f"mm_{pt['name']}", "train", mm_cfg),
        }

    # 5. evaluation
    models = [_entry(evals["SFT"], "SFT", None)]
    for pt in points:
        for method, rec in plan[pt["name"]].items():
            name = f"{method}@{pt['name']}"
            print(f"== evaluating {name}", flush=True)
            if name not in evals:
                evals[name] = evaluate(rec["output_dir"], name, rms, pt["b"], scales, heldout, eval_prompts, S["eval"])
                evals_file.write_text(json.dumps(list(evals.values()), default=float))
            models.append(_entry(evals[name], method, pt))
    out = {
        "experiment": "helpful-and-harmless L3Ms vs minimax baselines (paper Figure 3, efficiency)",
        "quick": ns.quick,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "settings": {
            **S,
            "preset": preset,
            "overrides": ns.set,
            "mm": mm_settings,
            "steps": steps,
            "sft_steps": json.loads((Path(sft["output_dir"]) / "summary.json").read_text()).get("steps")
            if (Path(sft["output_dir"]) / "summary.json").is_file()
            else None,
            "points_from": ns.points_from,
            "model": ns.model,
            "rm_model": ns.rm_model,
            "task_data": ns.task_data,
        },
        "reward_models": {a: {"path": rm_dirs[a], "heldout": rm_info[a], "scale": s} for a, s in zip(AXES, scales)},
        "axes": AXES,
        "points": points,
        "models": models,
        "efficiency": efficiency(stages, points),
        "wall_clock_s": time.time() - t_start,
    }
    (results / "results.json").write_text(json.dumps(out, indent=1, default=float))
    return write_report(results)


def write_report(results: Path) -> int:
    """Check the targets on ``results/results.json`` and write ``results.md`` and ``figure3.png`` beside it."""
    from l3m.report_rewards import markdown_reward_table, plot_reward_plane

    out = json.loads((results / "results.json").read_text())
    out["targets"] = check_targets(out)
    (results / "results.json").write_text(json.dumps(out, indent=1, default=float))
    plot_reward_plane(out, results / "figure3.png")
    (results / "results.md").write_text(summary_md(out) + "\n## Every model\n\n" + markdown_reward_table(out))
    print((results / "results.md").read_text())
    print(f"results in {results}")
    return 0


def _entry(ev: dict, method: str, pt: dict | None) -> dict:
    from l3m.report_rewards import model_entry

    e = model_entry(ev, method, pt["name"] if pt else None, AXES)
    if pt is None:
        e["verdicts"] = [None, None]
    else:  # the verdicts against this model's own point, from the reward intervals
        e["verdicts"] = [verdict_at(ci, b) for ci, b in zip(e["rewards_ci95"], pt["b"])]
    e["n_prompts"], e["k"] = ev.get("n_prompts"), ev.get("k")
    e["examples"] = ev.get("examples", [])[:4]
    e["task_logppl_per_example"] = ev.get("task_logppl", {}).get("per_example")  # for paired differences
    return e


def _mem(rec: dict) -> float:
    return rec["cuda_peak_mb"] if rec.get("cuda_peak_mb") else rec["peak_rss_mb"]


def efficiency(stages: dict, points: list[dict]) -> dict:
    """Per point: L3M's wall clock and peak memory against MM's (its SFT stage included)."""
    sft = stages["sft"]
    out = {
        "memory_unit": "MiB (GPU max allocated)" if sft.get("cuda_peak_mb") else "MiB (peak RSS, CPU)",
        "sft_wall_s": sft["wall_s"],
    }
    for pt in points:
        l3m, mm = stages[f"l3m_{pt['name']}"], stages[f"mm_{pt['name']}"]
        mm_total = mm["wall_s"] + sft["wall_s"]
        out[pt["name"]] = {
            "l3m_wall_s": l3m["wall_s"],
            "mm_wall_s": mm["wall_s"],
            "mm_total_wall_s": mm_total,
            "wall_ratio_l3m_to_mm": l3m["wall_s"] / mm_total,
            "l3m_peak_mb": _mem(l3m),
            "mm_peak_mb": _mem(mm),
            "sft_peak_mb": _mem(sft),
        }
    return out


def check_targets(res: dict) -> dict:
    """The issue's targets, checked on the numbers (per point)."""
    import l3m.evaluation as l3m_evaluation

    by = {(m["method"], m["point"]): m for m in res["models"]}
    out = {}
    for pt in res["points"]:
        l3m, mm = by.get(("L3M", pt["name"])), by.get(("MM", pt["name"]))
        if not (l3m and mm):
            continue
        eff = res["efficiency"][pt["name"]]
        mm_meets = all(v == "holds" for v in mm["verdicts"])
        out[pt["name"]] = {
            "mm_meets": mm_meets,
            "l3m_verdicts": l3m["verdicts"],
            "l3m_ok_where_mm_meets": (not mm_meets) or all(v in ("holds", "undecided") for v in l3m["verdicts"]),
            "l3m_logppl_at_or_below_mm": l3m["task_logppl"]["mean"] <= mm["task_logppl"]["mean"],
            "logppl_l3m_minus_mm": l3m_evaluation.paired_difference(
                l3m.get("task_logppl_per_example"), mm.get("task_logppl_per_example")
            ),
            "wall_ratio_at_most_0.7": eff["wall_ratio_l3m_to_mm"] <= 0.7,
            "l3m_lower_peak_memory": eff["l3m_peak_mb"] < eff["mm_peak_mb"],
        }
    return out


def summary_md(res: dict) -> str:
    rm = res["reward_models"]
    lines = ["# Helpful-and-harmless L3Ms vs minimax: results", ""]
    if res["quick"]:
        lines += ["**Quick mode: a pipeline check with a few steps per stage; these numbers are not results.**", ""]
    lines += [
        f"Device: {res['device']}; {res['settings']['steps']} optimiser steps per L3M / MM run, "
        f"{res['settings'].get('sft_steps') or res['settings']['steps']} in the SFT stage; "
        f"total wall clock {res['wall_clock_s'] / 60:.1f} min.",
        "",
        "| reward model | held-out pairs | pairwise accuracy [95% CI] | reward std (= constraint scale) |",
        "|---|---|---|---|",
    ]
    for a in res["axes"]:
        h = rm[a]["heldout"]
        lines.append(
            f"| {a} | {h['n_pairs']} | {h['accuracy']:.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}] | "
            f"{rm[a]['scale']:.3f} |"
        )
    eff = res["efficiency"]
    lines += [
        "",
        f"| point | L3M wall | MM wall (+ SFT {eff['sft_wall_s'] / 60:.1f} min) | L3M / MM | "
        f"L3M peak | MM peak ({eff['memory_unit']}) | targets met |",
        "|---|---|---|---|---|---|---|",
    ]
    for pt in res["points"]:
        e, t = eff[pt["name"]], res["targets"].get(pt["name"], {})
        met = ", ".join(k for k, v in t.items() if v is True) or "—"
        lines.append(
            f"| {pt['name']} | {e['l3m_wall_s'] / 60:.1f} min | {e['mm_total_wall_s'] / 60:.1f} min | "
            f"{e['wall_ratio_l3m_to_mm']:.2f} | {e['l3m_peak_mb']:.0f} | {e['mm_peak_mb']:.0f} | {met} |"
        )
    diffs = {n: t.get("logppl_l3m_minus_mm") for n, t in res["targets"].items()}
    if any(diffs.values()):
        lines += ["", "Task log-perplexity, L3M − MM, paired over the same held-out references (± standard error):", ""]
        lines += [f"- {n}: {d['mean']:+.3f} ± {d['se']:.3f} (n = {d['n']})" for n, d in diffs.items() if d]
    lines += ["", "![reward plane and task log-perplexity](figure3.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
