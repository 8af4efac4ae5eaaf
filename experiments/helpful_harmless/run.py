"""Helpful-and-harmless L3Ms against minimax (MM) baselines: the paper's Figure 3, over training seeds.

One command trains and evaluates everything (checkpoints, split data and logs go to ``runs/helpful_harmless/``,
which git ignores; configs, evaluations with their samples, tables and the figure to ``results/`` beside this file):

    .venv/bin/python experiments/helpful_harmless/run.py                # reward models, then seeds 0 1 2
    .venv/bin/python experiments/helpful_harmless/run.py --jobs 2       # two trainings side by side
    .venv/bin/python experiments/helpful_harmless/run.py --smoke        # a few steps of everything: the pipeline
    .venv/bin/python experiments/helpful_harmless/run.py --report-only  # tables and figure from the saved records

Stages (each training and each evaluation a child process whose wall clock and peak memory are recorded):

1. Two reward models (``l3m train-reward``), trained once and shared by every seed: *helpful* from PandaLM and
   Auto-J, *harmless* from HH-RLHF harmless-base; pairwise accuracy on pairs held out by prompt.
2. Splits, fixed by a split seed that does not move with the training seed: the task data into 800 train /
   150 selection / 150 test records (the length experiment's splits of the same file); the harmful requests
   held out from the harmless reward model into a selection and a test half. Sampling prompts for training are the
   train instructions mixed with the reward model's training-side harmful requests. Evaluation prompts of a split:
   half its instructions, half its harmful requests.
3. Per training seed, SFT of the initial model on the train records (the stage only the MM needs).
4. The constraint points from the SFT models' mean rewards on the *selection* prompts (mean over seeds), at
   +(0.25, 0.25), +(0.5, 0.25) and +(0.25, 0.5) reward standard deviations above them.
5. Per seed and point, one L3M (from the initial model: task loss and both reward constraints, one stage) and one
   MM (from that seed's SFT model: KL to it, multipliers by gradient ascent); the same steps, batch, samples per
   step, learning rate and sampling prompts.
6. Every model (the initial model, each SFT, L3M and MM) on the *test* prompts: mean rewards with 95% bootstrap
   intervals and a verdict per constraint, length, cut-off share, repetition, and the task log-perplexity of the
   test references; then the tables over seeds and ``figure3.png`` (seed means with their range).

An interrupted run resumes where it stopped: finished evaluations and trainings are kept, and a training with a
checkpoint continues from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = REPO.parent / "shared" / "data"
PREF = SHARED / "preference"
TASK_DATA = SHARED / "sft" / "instruction_data_short.json"
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
SPLIT_SEED = 0  # fixed: the splits do not move with the training seed
TASK_SPLIT = {"train": 800, "selection": 150, "test": 150}
EVAL_SEED = 1  # the sampling seed of every evaluation

# One GPU: full-size settings (not run on this project's machines).
FULL = {
    "rm": {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 2.0e-5,
        "warmup_steps": 0.05,
        "lr_scheduler_type": "cosine",
        "max_length": 512,
        "center_rewards_coefficient": 0.01,
    },
    "rm_heldout_fraction": 0.1,
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
        "save_steps": 25,
        "save_total_limit": 1,
    },
    "mm": {"beta": 0.05, "multiplier_lr": 0.1, "multiplier_init": 1.0},
    "deltas": [[0.25, 0.25], [0.5, 0.25], [0.25, 0.5]],  # (b1, b2) = SFT's mean rewards + deltas * reward std
    "eval": {"n_prompts": 150, "k": 2, "max_new_tokens": 96, "temperature": 0.8, "batch_size": 16},
}
# The 2-core CPU of this project's machines: reward models with a frozen 7-layer backbone and a fitted head
# (rm_choices/layer_probe.log for why 7 layers), the harmless one then fine-tuned whole from that head
# (rm_choices/finetune.md); short runs, shorter samples, fewer evaluation prompts.
CPU = {
    "rm": {"head_only": True, "per_device_train_batch_size": 8, "max_length": 256},
    "rm_layers": 7,
    "rm_heldout_fraction": 0.2,
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
        "save_steps": 8,
        "save_total_limit": 1,
    },
    "mm": FULL["mm"],
    "deltas": FULL["deltas"],
    "eval": {"n_prompts": 80, "k": 2, "max_new_tokens": 48, "temperature": 0.8, "batch_size": 20},
}
SMOKE = {
    "rm": {**FULL["rm"], "max_steps": 4},
    "rm_pairs": {"max_train_pairs": 32, "max_eval_pairs": 16},
    "rm_heldout_fraction": 0.1,
    "rm_finetune": {"harmless": {**CPU["rm_finetune"]["harmless"], "max_steps": 2}},
    "steps": 2,
    "train": {
        **FULL["train"],
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_new_tokens": 16,
        "save_strategy": "no",
    },
    "n_train": 16,
    "mm": FULL["mm"],
    "deltas": [[0.25, 0.25]],
    "eval": {**FULL["eval"], "n_prompts": 4, "n_refs": 6, "max_new_tokens": 16},
}


def rel(path: str | Path) -> str:
    """A path relative to the repository root when it lies below its parent (configs stay portable)."""
    p = Path(path).resolve()
    return os.path.relpath(p, REPO) if p.is_relative_to(REPO.parent) else str(p)


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n\x00".join(sorted(texts)).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# child processes: one training or evaluation each, timed, with its peak memory


def child(kind: str, spec: str, out_json: str, *overrides: str) -> int:
    """Run one training (``spec``: a config, with ``overrides`` as ``l3m train`` takes them) or one evaluation
    (``spec``: a JSON spec) in this process."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("L3M_THREADS", "1")))
    t0 = time.perf_counter()
    if kind == "reward":
        from l3m.reward_training import run_train_reward

        summary = run_train_reward(spec, list(overrides), quiet=True)
        extra = {"heldout": summary.get("heldout"), "steps": summary["steps"]}
    elif kind == "train":
        from l3m.cli import run_train

        summary = run_train(spec, list(overrides), quiet=True)
        extra = {"steps": summary["steps"]}
    else:
        extra = {}
        Path(json.loads(Path(spec).read_text())["output"]).write_text(json.dumps(evaluate(spec), default=float))
    wall = time.perf_counter() - t0
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(out_json).write_text(json.dumps({"wall_s": wall, "cuda_peak_mb": cuda_peak, **extra}, default=float))
    return 0


def run_child(kind: str, spec: Path, log: Path, threads: int, overrides: list[str] = ()) -> dict:
    """The child's record, plus the process's wall clock and peak RSS (from ``wait4``). Raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_json = log.with_suffix(".json")
    env = {**os.environ, "L3M_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        cmd = [sys.executable, __file__, "_child", kind, str(spec), str(out_json), *overrides]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{kind} {spec} failed; log {log}:\n{tail}")
    rec = json.loads(out_json.read_text())
    rec["process_wall_s"] = time.perf_counter() - t0
    rec["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return rec


def evaluate(spec_file: str) -> dict:
    """One model on one split's prompts and references, against one constraint point (the child's work)."""
    import torch

    from l3m.constraints import RewardConstraint
    from l3m.data import load_examples
    from l3m.evaluation import evaluate_model
    from l3m.models import load_causal_lm, load_tokenizer
    from l3m.rewards import RewardModel

    spec = json.loads(Path(spec_file).read_text())
    ev = spec["eval"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cons = [
        RewardConstraint(
            RewardModel(spec["rms"][a], device=dev, batch_size=ev["batch_size"]), at_least=b, name=a, scale=s
        )
        for a, b, s in zip(AXES, spec["b"], spec["scales"])
    ]
    tok, model = load_tokenizer(spec["model"]), load_causal_lm(spec["model"])
    if dev == "cuda":
        model = model.cuda()
    return evaluate_model(
        model,
        tok,
        cons,
        load_examples(spec["references"]),
        load_examples(spec["prompts"], need_response=False),
        k=ev["k"],
        max_new_tokens=ev["max_new_tokens"],
        temperature=ev["temperature"],
        batch_size=ev["batch_size"],
        seed=EVAL_SEED,
        progress=False,
        name=spec["name"],
    )


# ----------------------------------------------------------------------------------------------
# data: the splits and the prompt files


def harmful_prompts(heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Single-turn harmful requests, split by prompt as the harmless reward model's data is (the same fraction and
    split seed): the held-out ones are requests that neither the reward model nor any policy saw."""
    from l3m.preference_data import load_preference_sources, split_pairs

    train, held = [], []
    for src in HARMFUL_PROMPTS:
        t, h = split_pairs(load_preference_sources([str(src)]).pairs, heldout_fraction, seed=SPLIT_SEED)
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


def prepare_data(S: dict, smoke: bool, data_dir: Path, results: Path) -> dict:
    """Write the split files to ``data_dir`` and a record of the splits to ``results/splits.json``."""
    from l3m.data import load_examples, split_by_key

    records = json.loads(TASK_DATA.read_text())
    task = split_by_key([e.prompt_text for e in load_examples(TASK_DATA)], TASK_SPLIT, SPLIT_SEED)
    if smoke:
        task = {n: v[: S["n_train"] if n == "train" else S["eval"]["n_refs"]] for n, v in task.items()}
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, idx in task.items():
        files[f"task_{name}"] = data_dir / f"task_{name}.json"
        files[f"task_{name}"].write_text(json.dumps([records[i] for i in idx], indent=1))
    harm_train, harm_held = harmful_prompts(S["rm_heldout_fraction"])
    random.Random(SPLIT_SEED).shuffle(harm_held)
    harm = {
        "train": harm_train,
        "selection": harm_held[: len(harm_held) // 2],
        "test": harm_held[len(harm_held) // 2 :],
    }
    prompts = {}
    for name in task:
        ordinary = [e.prompt_text for e in load_examples(files[f"task_{name}"])]
        n = None if name == "train" else S["eval"]["n_prompts"]
        files[f"prompts_{name}"] = data_dir / f"prompts_{name}.jsonl"
        prompts[name] = write_prompts(files[f"prompts_{name}"], ordinary, harm[name], n, SPLIT_SEED + 1)
    doc = {
        "task_data": rel(TASK_DATA),
        "split_seed": SPLIT_SEED,
        "task_records": {n: len(v) for n, v in task.items()},
        "harmful_requests": {n: len(v) for n, v in harm.items()},
        "harmful_sources": [rel(f) for f in HARMFUL_PROMPTS],
        "eval_prompts": {n: len(prompts[n]) for n in ("selection", "test")},
        "prompt_sha256": {n: _digest(p) for n, p in prompts.items()},
        "note": "task: indices into the task data's JSON array (records sharing a prompt in one split); harmful "
        "requests: the harmless reward model's held-out single-turn prompts, halved by a seeded shuffle",
        "task": task,
    }
    (results / "splits.json").write_text(json.dumps(doc) + "\n")
    return {k: rel(v) for k, v in files.items()}


# ----------------------------------------------------------------------------------------------
# the runs


def signature(models: list[str]) -> list:
    """What identifies the trained models a stage uses: each local model folder with the time its weights were
    written (a model trained again gets a new one); a hub name stands for itself."""
    out = []
    for m in models:
        files = sorted((REPO / m).glob("*.safetensors")) if (REPO / m).is_dir() else []
        out.append([m, round(max(f.stat().st_mtime for f in files), 3) if files else None])
    return out


class Runner:
    """Stages with their records (``results/stages.json``) and evaluations (``results/evals/``); thread-safe."""

    def __init__(self, results: Path, runs: Path, threads: int):
        self.results, self.runs, self.threads = results, runs, threads
        self.file = results / "stages.json"
        self.stages: dict = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.lock = threading.Lock()

    def _save(self, name: str, rec: dict) -> None:
        with self.lock:
            self.stages[name] = rec
            self.file.write_text(json.dumps(self.stages, indent=1, default=float))

    def train(self, name: str, kind: str, cfg: dict, uses: list[str] = ()) -> dict:
        """Train (or resume, or reuse) one model; ``name`` is ``seed0/l3m_P1``-like. A finished model is reused
        when its config and the models it ``uses`` (folders: its start, reference and reward models) are the
        ones it was trained with."""
        import yaml

        out = REPO / cfg["training"]["output_dir"]
        done = self.stages.get(name)
        if done and done.get("config") == cfg and done.get("uses") == signature(uses) and out.is_dir():
            return done
        # an unfinished run resumes from its checkpoint; a finished one with another config is trained again
        checkpoints = sorted(out.glob("checkpoint-*")) if out.is_dir() and not done else []
        for split in ("selection", "test"):  # evaluations of an earlier model of this name
            (self.results / "evals" / split / f"{name}.json").unlink(missing_ok=True)
        if not checkpoints and out.exists():
            shutil.rmtree(out)
        cfg_path = self.results / "configs" / f"{name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = "l3m train-reward" if kind == "reward" else "l3m train"
        cfg_path.write_text(
            f"# {name}: written by experiments/helpful_harmless/run.py. From the repository root:\n"
            f"#   {cmd} {rel(cfg_path)}\n" + yaml.safe_dump(cfg, sort_keys=False)
        )
        resume = bool(checkpoints) and kind == "train"
        overrides = ["training.resume_from_checkpoint=true"] if resume else []
        print(f"== {name}: {cmd} {rel(cfg_path)} {' '.join(overrides)}", flush=True)
        rec = run_child(kind, cfg_path, self.runs / "logs" / f"{name.replace('/', '_')}.log", self.threads, overrides)
        rec.update(output_dir=rel(out), resumed=resume, config=cfg, uses=signature(uses))  # resumed: the last part
        for c in out.glob("checkpoint-*"):  # only needed to resume
            shutil.rmtree(c)
        for f in ("metrics.jsonl", "summary.json", "reward_eval.json"):
            if (out / f).is_file():
                (self.results / "runs" / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(out / f, self.results / "runs" / name / f)
        self._save(name, rec)
        mem = f"{rec['cuda_peak_mb']:.0f} MiB GPU" if rec.get("cuda_peak_mb") else f"{rec['peak_rss_mb']:.0f} MiB RSS"
        print(f"   {name}: {rec['wall_s'] / 60:.1f} min, peak {mem}", flush=True)
        return rec

    def evaluate(self, record: str, model: str, name: str, split: str, b: list[float], ctx: dict) -> dict:
        """Evaluate ``model`` on a split against the point ``b`` (saved as ``results/evals/<record>.json``)."""
        path = self.results / "evals" / f"{record}.json"
        uses = signature([model, *ctx["rms"].values()])
        if path.is_file():  # kept when it evaluated the same model against the same point with the same rewards
            kept = json.loads(path.read_text())
            if kept.get("b") == b and kept.get("uses") == uses:  # `uses` names the model too
                return kept
        tag = record.replace("/", "_")
        spec = {
            "model": model,
            "name": name,
            "rms": ctx["rms"],
            "b": b,
            "scales": ctx["scales"],
            "prompts": ctx["files"][f"prompts_{split}"],
            "references": ctx["files"][f"task_{split}"],
            "eval": ctx["eval"],
            "output": str(self.runs / "evals" / f"{tag}.json"),
        }
        spec_file = self.runs / "evals" / f"{tag}_spec.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec, indent=1))
        print(f"== evaluating {name} on the {split} prompts", flush=True)
        rec = run_child("eval", spec_file, self.runs / "logs" / f"eval_{tag}.log", self.threads)
        ev = json.loads(Path(spec["output"]).read_text())
        out = {"model": name, "model_path": model, "split": split, "b": b, "uses": uses, "eval_s": rec["wall_s"]}
        out["evaluation"] = ev
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=float) + "\n")
        return out


def reward_models(ns, S: dict, runner: Runner) -> tuple[dict, dict]:
    """Train (or take from ``--reward-models``) the two reward models; their paths and held-out accuracies."""
    import yaml

    paths, info = {}, {}
    for axis in AXES:
        data = {"train": [rel(f) for f in RM_DATA[axis]], "heldout_fraction": S["rm_heldout_fraction"]}
        data.update(S.get("rm_pairs", {}))
        cfg = {
            "model": ns.rm_model,
            "backbone_layers": S.get("rm_layers"),
            "data": data,
            "training": {**S["rm"], "output_dir": rel(runner.runs / f"rm_{axis}"), "seed": 0, "disable_tqdm": True},
        }
        ft = S.get("rm_finetune", {}).get(axis)
        if ns.reward_models:  # trained earlier with these configs: read, not retrained
            given = Path(ns.reward_models[AXES.index(axis)])
            (runner.results / "configs").mkdir(parents=True, exist_ok=True)
            written = {f"rm_{axis}": cfg}
            if ft:  # GIVEN is the fine-tuned model; its head-only start is its summary's `backbone`
                start = json.loads((given / "reward_eval.json").read_text()).get("backbone") or cfg["model"]
                cfg["training"]["output_dir"] = rel(start)
                written[f"rm_{axis}_ft"] = {
                    "model": rel(start),
                    "data": data,
                    "training": {**ft, "output_dir": rel(given)},
                }
            else:
                cfg["training"]["output_dir"] = rel(given)
            for n, c in written.items():
                (runner.results / "configs" / f"{n}.yaml").write_text(
                    f"# {n}: `l3m train-reward` it from the repository root\n" + yaml.safe_dump(c, sort_keys=False)
                )
            path = given
        else:
            rec = runner.train(f"rm_{axis}", "reward", cfg)
            if ft:  # the whole model from the fitted head: the backbone is already cut to rm_layers
                ft_cfg = {
                    "model": rec["output_dir"],
                    "data": data,
                    "training": {
                        **ft,
                        "output_dir": rel(runner.runs / f"rm_{axis}_ft"),
                        "seed": 0,
                        "disable_tqdm": True,
                    },
                }
                rec = runner.train(f"rm_{axis}_ft", "reward", ft_cfg, [rec["output_dir"]])
            path = REPO / rec["output_dir"]
        paths[axis] = rel(path)
        info[axis] = json.loads((path / "reward_eval.json").read_text())["heldout"]
        (runner.results / "runs" / f"rm_{axis}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path / "reward_eval.json", runner.results / "runs" / f"rm_{axis}" / "reward_eval.json")
        h = info[axis]
        print(f"   {axis} reward model: accuracy {h['accuracy']:.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}]")
    return paths, info


def mean_rewards(evaluation: dict) -> list[float]:
    by = {c["name"]: c for c in evaluation["constraints"]}
    return [float(by[a]["mean_raw"]) for a in AXES]


def parse_sets(p: argparse.ArgumentParser, items: list[str], allowed: set | None, flag: str) -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or (allowed is not None and key not in allowed) or key in ("seed", "output_dir"):
            what = f"KEY one of {sorted(allowed)}" if allowed else "a training setting other than seed and output_dir"
            p.error(f"{flag} expects KEY=VALUE with {what}, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return child(*argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; smoke: 0)")
    p.add_argument("--jobs", type=int, default=1, help="trainings and evaluations side by side (default 1)")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage: the pipeline, not results")
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None, help="sizes (default: gpu with CUDA, else cpu)")
    p.add_argument("--model", default="default", help="initial policy (and SFT start): default SmolLM2-135M-Instruct")
    p.add_argument("--rm-model", default="default", help="reward-model backbone (default SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of SFT, each L3M and each MM")
    p.add_argument(
        "--sft-steps", default=None, help="steps of the SFT stage alone (default --steps); 'epoch': one pass"
    )
    p.add_argument("--points-from", default=None, metavar="RESULTS_JSON", help="take (b1, b2) from a results.json")
    p.add_argument("--reward-models", nargs=2, metavar=("HELPFUL", "HARMLESS"), help="reward models trained earlier")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting of every run")
    p.add_argument("--mm", action="append", default=[], metavar="KEY=VALUE", help="beta, multiplier_lr or _init of MMs")
    p.add_argument("--results", default=None, help="results folder (default experiments/helpful_harmless/results)")
    p.add_argument("--runs", default=None, help="checkpoints, split data and logs (default runs/helpful_harmless)")
    p.add_argument("--report-only", action="store_true", help="redo the tables and the figure from the records")
    ns = p.parse_args(argv)
    if ns.jobs < 1:
        p.error(f"--jobs must be at least 1, got {ns.jobs}")
    if ns.sft_steps not in (None, "epoch") and not str(ns.sft_steps).isdigit():
        p.error(f"--sft-steps expects a number of steps or 'epoch', got {ns.sft_steps!r}")
    ns.seeds = ns.seeds if ns.seeds is not None else ([0] if ns.smoke else [0, 1, 2])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = Path(ns.results or (Path("/tmp/l3m_hh_smoke") if ns.smoke else HERE / "results")).resolve()
    runs = Path(ns.runs or REPO / "runs" / ("helpful_harmless_smoke" if ns.smoke else "helpful_harmless")).resolve()
    ns.points_from = ns.points_from and str(Path(ns.points_from).resolve())
    ns.reward_models = ns.reward_models and [str(Path(x).resolve()) for x in ns.reward_models]
    for key in ("model", "rm_model"):  # a local folder, not a name: relative to where the command was started
        if Path(getattr(ns, key)).exists():
            setattr(ns, key, str(Path(getattr(ns, key)).resolve()))
    os.chdir(REPO)  # configs name paths relative to the repository root
    if ns.report_only:
        return write_report(results)
    import torch

    missing = [str(f) for fs in [*RM_DATA.values(), HARMFUL_PROMPTS, [TASK_DATA]] for f in fs if not f.is_file()]
    if missing:
        print(f"missing data: {missing} (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    preset = "smoke" if ns.smoke else ns.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    S = {"smoke": SMOKE, "cpu": CPU, "gpu": FULL}[preset]
    overrides = parse_sets(p, ns.set, None, "--set")
    mm_settings = {**S["mm"], **parse_sets(p, ns.mm, set(S["mm"]), "--mm")}
    for d in (results / "configs", results / "runs", runs):
        d.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # torch threads per child: the cores divided by the jobs, unless L3M_THREADS says otherwise
    threads = int(os.environ.get("L3M_THREADS") or max(1, (os.cpu_count() or 1) // ns.jobs))
    runner = Runner(results, runs, threads)

    # 1-2: reward models, splits
    rms, rm_info = reward_models(ns, S, runner)
    scales = [max(float(rm_info[a]["reward_std"]), 1e-3) for a in AXES]
    files = prepare_data(S, ns.smoke, runs / "data", results)
    ctx = {"rms": rms, "scales": scales, "files": files, "eval": S["eval"]}
    base = {**S["train"], "max_steps": ns.steps or S["steps"], "disable_tqdm": True, **overrides}
    data_cfg = {"train": files["task_train"]}

    def pool(jobs: list, fn) -> list:
        failed, out = [], []
        with ThreadPoolExecutor(ns.jobs) as ex:
            futures = [(ex.submit(fn, *j), j) for j in jobs]
            for fut, j in futures:
                try:
                    out.append(fut.result())
                except Exception as exc:  # noqa: BLE001 (one failed run does not stop the others)
                    failed.append(f"{j[0]}: {exc}")
        if failed:
            raise SystemExit("failed:\n" + "\n".join(failed))
        return out

    # 3: SFT per seed, and its rewards on the selection prompts
    def sft_job(seed: int) -> dict:
        training = {**base, "seed": seed, "output_dir": rel(runs / f"seed{seed}" / "sft")}
        if ns.sft_steps == "epoch":
            training.update(max_steps=-1, num_train_epochs=1)
        elif ns.sft_steps is not None:
            training["max_steps"] = int(ns.sft_steps)
        rec = runner.train(f"seed{seed}/sft", "train", {"model": ns.model, "data": data_cfg, "training": training})
        return runner.evaluate(f"selection/seed{seed}/sft", rec["output_dir"], "SFT", "selection", [0.0, 0.0], ctx)

    sft_sel = pool([(s,) for s in ns.seeds], sft_job)

    # 4: the constraint points
    per_seed = [mean_rewards(e["evaluation"]) for e in sft_sel]
    sft_r = [statistics.fmean(r[i] for r in per_seed) for i in range(len(AXES))]
    if ns.points_from:
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
    print(f"   SFT selection rewards {[round(x, 4) for x in sft_r]}; points {[q['b'] for q in points]}", flush=True)

    # 5-6: per seed and point an L3M and an MM, each evaluated on the test prompts; the initial and SFT models too
    def job(kind: str, seed: int | None, pt: dict | None) -> dict:
        if kind == "initial":
            return runner.evaluate("test/initial", ns.model, "initial", "test", [0.0, 0.0], ctx)
        if kind == "sft":
            model = runner.stages[f"seed{seed}/sft"]["output_dir"]
            return runner.evaluate(f"test/seed{seed}/sft", model, "SFT", "test", [0.0, 0.0], ctx)
        cons = [
            {"kind": "reward", "model": rms[a], "at_least": float(b), "name": a, "scale": s}
            for a, b, s in zip(AXES, pt["b"], scales)
        ]
        common = {"data": {**data_cfg, "prompts": files["prompts_train"]}, "constraints": cons}
        out_dir = rel(runs / f"seed{seed}" / f"{kind}_{pt['name']}")
        if kind == "l3m":
            cfg = {"model": ns.model, **common, "training": {**base, "seed": seed, "output_dir": out_dir}}
        else:
            sft_dir = runner.stages[f"seed{seed}/sft"]["output_dir"]
            training = {**base, **mm_settings, "ref_model": sft_dir, "seed": seed, "output_dir": out_dir}
            cfg = {"method": "minimax", "model": sft_dir, **common, "training": training}
        uses = [cfg["model"], *rms.values()] + ([cfg["training"]["ref_model"]] if kind == "mm" else [])
        rec = runner.train(f"seed{seed}/{kind}_{pt['name']}", "train", cfg, uses)
        name = f"{kind.upper()}@{pt['name']}"
        return runner.evaluate(f"test/seed{seed}/{kind}_{pt['name']}", rec["output_dir"], name, "test", pt["b"], ctx)

    jobs = [(k, s, pt) for s in ns.seeds for pt in points for k in ("l3m", "mm")]
    jobs += [("sft", s, None) for s in ns.seeds] + [("initial", None, None)]
    pool(jobs, job)

    settings = {**S, "preset": preset, "steps": base["max_steps"], "overrides": overrides, "mm": mm_settings}
    settings.update(sft_steps=ns.sft_steps, points_from=ns.points_from, model=ns.model, rm_model=ns.rm_model)
    out = {
        "experiment": "helpful-and-harmless L3Ms vs minimax baselines over training seeds (paper Figure 3)",
        "smoke": ns.smoke,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seeds": ns.seeds,
        "jobs": ns.jobs,
        "settings": settings,
        "reward_models": {a: {"path": rms[a], "heldout": rm_info[a], "scale": s} for a, s in zip(AXES, scales)},
        "axes": AXES,
        "sft_selection_rewards": {"mean": sft_r, "per_seed": dict(zip(map(str, ns.seeds), per_seed))},
        "points": points,
        "wall_clock_s": time.time() - t_start,
    }
    (results / "results.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    return write_report(results)


def write_report(results: Path) -> int:
    """Read ``results.json`` and the saved evaluations; add the rows over seeds; write the tables and figure."""
    sys.path.insert(0, str(HERE))
    import summary as report

    if not (results / "results.json").is_file():
        sys.exit(f"--report-only: {results / 'results.json'} is missing: a finished run writes it")
    out = json.loads((results / "results.json").read_text())
    out.update(report.summarise(results, out))
    (results / "results.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    report.figure(out, results / "figure3.png")
    (results / "results.md").write_text(report.markdown(out))
    print((results / "results.md").read_text())
    print(f"results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
