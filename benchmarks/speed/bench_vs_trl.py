"""Side by side: TRL's ``GRPOTrainer`` (beta = 0, no reference model) against l3m's ``L3MTrainer``.

Three trainers run the same model (SmolLM2-135M-Instruct, the converted safetensors copy from
``l3m.models.default_model_path()``, fp32), the same prompts (the first rows of l3m's built-in data), the same
number of samples per prompt, longest completion, batch, optimiser and schedule, for the same number of steps:

* ``grpo``      TRL GRPOTrainer, reward = minus the completion length in tokens;
* ``l3m_sft``   L3MTrainer with its SFT term (its real workload) and a length constraint;
* ``l3m_nosft`` L3MTrainer without the SFT term (``task_loss=False``): the same work as the GRPO step;
* ``l3m_sft_plain``, ``l3m_nosft_plain`` (on request, ``--trainers``): the same, on the trainer's unshared paths
  (every sample's prompt encoded again for sampling and for the loss), for before/after comparisons;
* ``mm`` (on request): the minimax baseline (``method="minimax"``) with the same constraint, its reference model
  a frozen copy of the same initial model; ``l3m_sft_chunks4`` and ``mm_chunks4``: L3M and MM with
  ``loss_chunks=4`` (each micro-batch back-propagated one prompt at a time). For the memory claim "no reference
  model": ``--trainers l3m_sft,mm,l3m_sft_chunks4,mm_chunks4``.
* ``l3m_sft_clip`` (on request): L3M with its SFT term and ``clip_each_part`` (the task's and the constraints'
  gradients clipped apart, each with its own forward and backward): ``--trainers l3m_sft,l3m_sft_clip``.

Each trainer lives in its own worker process and trains with ``Trainer.train()``; a callback holds it at the end
of every optimiser step until the parent says "go", so the steps alternate (A B C A B C ...) and never overlap.
A step's wall time runs from "go" to the end of the next optimiser step (data, sampling, scoring, forward,
backward, clipping, optimiser, the previous step's logging). Peak memory is the kernel's high-water mark of the
worker's resident set (``VmHWM`` in ``/proc/self/status``), reset at the start of every step by writing 5 to
``/proc/self/clear_refs``: exact (no sampling thread), and per process, so one trainer's freed memory never hides
another's. Every worker imports the same modules (torch, transformers, trl, l3m), so the absolute RSS compares;
the delta (peak minus the RSS before the first step) is what training adds: optimiser state, gradients,
activations, generation cache. Each worker uses one thread (``torch.set_num_threads(1)``): the machine has two
cores shared with other jobs, and one thread each keeps the ratio fair.

Run ``python benchmarks/speed/bench_vs_trl.py`` (8-12 minutes on 2 shared CPU cores) or ``--quick`` (about 5);
TRL comes with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAINERS = {
    "grpo": "TRL GRPOTrainer (beta=0)",
    "l3m_sft": "L3MTrainer, with the SFT term",
    "l3m_nosft": "L3MTrainer, without the SFT term",
    # the same trainers on their unshared paths (what the trainer did before benchmarks/speed, and still does
    # as a fallback): every sample's prompt encoded again for generation and for the loss
    "l3m_sft_plain": "L3MTrainer, with the SFT term, unshared prompts",
    "l3m_nosft_plain": "L3MTrainer, without the SFT term, unshared prompts",
    # the minimax baseline (method.md section 6) from the same initial model, which is also its reference (a frozen
    # copy in memory); and both with the loss back-propagated in 4 chunks of one prompt (``loss_chunks=4``)
    "mm": "minimax (MM), reference model in memory",
    "l3m_sft_chunks4": "L3MTrainer, with the SFT term, loss_chunks=4",
    "mm_chunks4": "minimax (MM), loss_chunks=4",
    # the task's and the constraints' gradients clipped apart (a second forward of the task rows' prompts)
    "l3m_sft_clip": "L3MTrainer, with the SFT term, clip_each_part",
}
PHASES = ("generation", "scoring", "forward", "backward", "optimizer")
TARGET_NOSFT = ">= 1.2x speed, <= 1.0x memory"
TARGET_SFT = ">= 1.0x speed"


# ----------------------------------------------------------------------------------------------
# memory: the kernel's per-process high-water mark of the resident set


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# the worker: one trainer, stepping when told


def neg_length(completions, completion_ids=None, **kwargs) -> list[float]:
    """GRPO's reward: minus the completion length in tokens (the counterpart of l3m's length constraint)."""
    return [-float(len(c)) for c in completion_ids]


def worker(name: str, cfg: dict, conn) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(1)
    import datasets  # noqa: F401  (every worker imports the same modules, so absolute RSS compares)
    import transformers

    try:
        import trl
    except ImportError:  # only the l3m trainers were asked for (main checks); the RSS still compares among them
        trl = None
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    import l3m.trainer as l3m_trainer
    from l3m import L3MConfig, L3MTrainer, LengthConstraint
    from l3m.data import load_examples
    from l3m.models import default_model_path

    transformers.logging.set_verbosity_error()
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    p, k, steps = cfg["prompts_per_step"], cfg["num_generations"], cfg["total_steps"]
    examples = load_examples("builtin")[: p * steps]  # one epoch of exactly the steps' prompts, for each trainer
    out_dir = tempfile.mkdtemp(prefix=f"bench-{name}-")
    common = dict(
        output_dir=out_dir,
        max_steps=steps,
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=cfg["seed"],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    if name == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **common,
            per_device_train_batch_size=p * k,  # GRPO counts completions per batch, not prompts
            num_generations=k,
            max_completion_length=cfg["max_new_tokens"],
            beta=0.0,
            shuffle_dataset=False,
            log_completions=False,
        )
        ds = datasets.Dataset.from_list([{"prompt": ex.prompt} for ex in examples])
        trainer = GRPOTrainer(model=model, reward_funcs=neg_length, args=args, train_dataset=ds, processing_class=tok)
        wrap = {"_generate": "generation", "_calculate_rewards": "scoring", "compute_loss": "forward"}
        wrap_target = trainer
    else:
        args = L3MConfig(
            **common,
            per_device_train_batch_size=p,
            num_generations=k,
            max_new_tokens=cfg["max_new_tokens"],
            task_loss=name.startswith("l3m_sft"),
            method="minimax" if name.startswith("mm") else "l3m",
            loss_chunks=4 if name.endswith("_chunks4") else 1,
            clip_each_part=name.endswith("_clip"),
        )
        trainer = L3MTrainer(
            model,
            args=args,
            train_dataset=examples,
            processing_class=tok,
            constraints=[LengthConstraint(cfg["length_limit"], "max")],
        )
        wrap = {"_generate": "generation", "compute_loss": "forward"}
        wrap_target = trainer
        if name.endswith("_plain"):
            trainer._prefix_sharing_failed = True  # the loss: every sequence whole
            trainer._shared_prompt_cache = lambda *a, **kw: None  # generation: generate(num_return_sequences=k)

    phases: dict[str, float] = defaultdict(float)

    def timed(obj, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[phase] += time.perf_counter() - t

        setattr(obj, attr, wrapper)

    for attr, phase in wrap.items():
        timed(wrap_target, attr, phase)
    if name != "grpo":  # the constraints are evaluated through this module-level name
        timed(l3m_trainer, "evaluate_constraints", "scoring")
    timed(trainer.accelerator, "backward", "backward")
    timed(trainer, "_clip_grad_norm", "optimizer")

    class Gate(TrainerCallback):
        """Holds training at the end of each optimiser step until the parent says go; records the step."""

        t0 = 0.0
        rss0 = 0
        t_opt = 0.0

        def _go(self, state) -> None:
            msg = conn.recv()
            if msg != "go":
                raise SystemExit(0)
            phases.clear()
            self.n_metrics = len(state.log_history)
            reset_peak_rss()
            self.rss0 = _status_kib("VmRSS")
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            conn.send(("ready", {"rss_kib": _status_kib("VmRSS"), "out_dir": out_dir}))
            self._go(state)

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            phases["optimizer"] += time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, **kw):
            wall = time.perf_counter() - self.t0
            rec = {
                "step": state.global_step,
                "wall_s": wall,
                "samples": p * k,
                "peak_rss_kib": _status_kib("VmHWM"),
                "start_rss_kib": self.rss0,
                "phases_s": dict(phases),
            }
            conn.send(("step", rec))
            if state.global_step < steps:
                self._go(state)

    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the parent prints its own lines
    trainer.add_callback(Gate())
    trainer.train()
    lengths = [h.get("sample/mean_length", h.get("completions/mean_length")) for h in trainer.state.log_history]
    lengths = [x for x in lengths if x is not None]
    conn.send(
        (
            "done",
            {
                "mean_completion_length_per_step": lengths,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "trl": trl.__version__ if trl else "not installed",
                },
            },
        )
    )
    conn.close()


# ----------------------------------------------------------------------------------------------
# the parent: start the workers, alternate their steps, summarise


def summarise(records: list[dict], warmup: int) -> dict:
    timed = [r for r in records if r["step"] > warmup]
    walls = [r["wall_s"] for r in timed]
    sps = [r["samples"] / r["wall_s"] for r in timed]
    phases = {ph: statistics.mean(r["phases_s"].get(ph, 0.0) for r in timed) for ph in PHASES}
    phases["overhead"] = statistics.mean(r["wall_s"] - sum(r["phases_s"].values()) for r in timed)
    return {
        "steps_timed": len(timed),
        "wall_s": {
            "median": statistics.median(walls),
            "min": min(walls),
            "max": max(walls),
            "mean": statistics.mean(walls),
        },
        "samples_per_s": {"median": statistics.median(sps), "min": min(sps), "max": max(sps)},
        # memory counts every step, the warm-up included: it allocates the optimiser state
        "peak_rss_mib": max(r["peak_rss_kib"] for r in records) / 1024,
        "phases_mean_s": phases,
    }


def paired_ratios(records: dict[str, list[dict]], name: str, base: str, warmup: int) -> dict:
    """samples/s of ``name`` over ``base``, per round (the two steps ran back to back, under the same load)."""
    r = [
        (a["samples"] / a["wall_s"]) / (b["samples"] / b["wall_s"])
        for a, b in zip(records[name], records[base])
        if a["step"] > warmup
    ]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def comparisons(result: dict) -> list[tuple[str, str, str]]:
    """(l3m trainer, what it is compared with, target) pairs present in this run."""
    names = result["order"]
    out = []
    if "grpo" in names:
        out += [(n, "grpo", t) for n, t in (("l3m_nosft", TARGET_NOSFT), ("l3m_sft", TARGET_SFT)) if n in names]
        out += [(n, "grpo", "") for n in ("l3m_nosft_plain", "l3m_sft_plain") if n in names]
    out += [(n, n + "_plain", "") for n in ("l3m_nosft", "l3m_sft") if n in names and n + "_plain" in names]
    pairs = [("l3m_sft", "mm"), ("l3m_sft_chunks4", "mm_chunks4"), ("l3m_sft_chunks4", "l3m_sft"), ("mm_chunks4", "mm")]
    pairs.append(("l3m_sft_clip", "l3m_sft"))
    out += [(a, b, "") for a, b in pairs if a in names and b in names]
    return out


def markdown(result: dict) -> str:
    cfg, s = result["config"], result["summary"]
    lines = [
        f"# One training step, side by side ({result['date']})",
        "",
        f"Machine: {result['machine']}; torch {result['versions']['torch']}, transformers "
        f"{result['versions']['transformers']}, TRL {result['versions']['trl']}; one thread per trainer.",
        f"Model SmolLM2-135M-Instruct (fp32); {cfg['prompts_per_step']} prompts x {cfg['num_generations']} samples "
        f"= {cfg['prompts_per_step'] * cfg['num_generations']} samples per step, at most {cfg['max_new_tokens']} new "
        f"tokens; AdamW lr {cfg['learning_rate']}, constant, gradient clipping 1; {cfg['steps']} timed steps per "
        f"trainer after {cfg['warmup']} warm-up step(s), alternating {' '.join(result['order'])}; "
        f"{result['elapsed_s'] / 60:.1f} minutes in all.",
        "",
        "| trainer | step wall s, median [min, max] | samples/s, median [min, max] | peak RSS MiB | "
        "RSS before step 1 MiB | peak - before MiB | mean completion tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        w, r = v["wall_s"], v["samples_per_s"]
        lines.append(
            f"| {TRAINERS[name]} | {w['median']:.2f} [{w['min']:.2f}, {w['max']:.2f}] | "
            f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] | {v['peak_rss_mib']:.0f} | "
            f"{v['rss_before_mib']:.0f} | {v['peak_rss_mib'] - v['rss_before_mib']:.0f} | "
            f"{v['mean_completion_length']:.1f} |"
        )
    comps = result.get("comparisons", [])
    if comps:
        lines += [
            "",
            "| comparison | samples/s ratio (of medians) | per-round ratio, median [min, max] | peak RSS ratio "
            "| target |",
            "|---|---|---|---|---|",
        ]
        for c in comps:
            pr = c["paired"]
            lines.append(
                f"| {TRAINERS[c['trainer']]} / {TRAINERS[c['baseline']]} | {c['speed_ratio']:.2f}x | "
                f"{pr['median']:.2f}x [{pr['min']:.2f}, {pr['max']:.2f}] | {c['memory_ratio']:.2f}x | "
                f"{c['target']} |"
            )
    lines += [
        "",
        "Mean seconds per step in each phase (overhead = wall time minus the phases):",
        "",
        "| trainer | " + " | ".join(PHASES) + " | overhead | wall |",
        "|---|" + "---|" * (len(PHASES) + 2),
    ]
    for name, v in s.items():
        ph = v["phases_mean_s"]
        lines.append(
            f"| {TRAINERS[name]} | "
            + " | ".join(f"{ph[x]:.2f}" if ph[x] >= 0.1 else f"{ph[x]:.3f}" for x in (*PHASES, "overhead"))
            + f" | {v['wall_s']['mean']:.2f} |"
        )
    lines += [
        "",
        "Phases: generation = sampling the completions (TRL's includes tokenising the prompts); scoring = the "
        "reward function / the constraints; forward = `compute_loss` (the log-probability forward pass and the "
        "loss); backward = `accelerator.backward`; optimizer = gradient clipping and `optimizer.step`; "
        "overhead = the rest (data loading, decoding, advantages or weights, logging). Peak RSS: the kernel's "
        "high-water mark of each trainer's process (VmHWM, reset before every step), warm-up step included.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per trainer (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per trainer (default 1)")
    ap.add_argument("--quick", action="store_true", help="2 timed steps, 2 prompts x 4 samples, 24 tokens")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--length-limit", type=int, default=32, help="l3m's constraint: mean length <= this")
    ap.add_argument("--trainers", default="grpo,l3m_nosft,l3m_sft", help="comma-separated, in alternation order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the .json and .md results")
    ap.add_argument(
        "--tag", default=None, help="results file name: bench_<tag>.json/.md (default: vs_trl, or quick with --quick)"
    )
    a = ap.parse_args(argv)
    a.tag = a.tag or ("quick" if a.quick else "vs_trl")
    if a.quick:
        a.steps, a.prompts_per_step, a.max_new_tokens = 2, 2, 24
    order = [t.strip() for t in a.trainers.split(",") if t.strip()]
    unknown = [t for t in order if t not in TRAINERS]
    if unknown:
        ap.error(f"unknown trainer(s) {unknown}; choose from {list(TRAINERS)}")
    import importlib.util

    if "grpo" in order and importlib.util.find_spec("trl") is None:
        ap.error('TRL is not installed: pip install -e ".[bench]" (a benchmark-only dependency)')
    if not reset_peak_rss():
        print("warning: cannot reset the peak RSS (/proc/self/clear_refs): memory is the process-lifetime peak")
    cfg = {
        "steps": a.steps,
        "warmup": a.warmup,
        "total_steps": a.steps + a.warmup,
        "prompts_per_step": a.prompts_per_step,
        "num_generations": a.num_generations,
        "max_new_tokens": a.max_new_tokens,
        "learning_rate": a.learning_rate,
        "length_limit": a.length_limit,
        "seed": a.seed,
    }
    os.environ["OMP_NUM_THREADS"] = "1"
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs, conns, ready = {}, {}, {}
    t_start = time.time()
    for name in order:  # one at a time: loading in parallel would only contend for the two cores
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, cfg, child), daemon=True)
        proc.start()
        procs[name], conns[name] = proc, parent
        kind, info = parent.recv()
        assert kind == "ready", kind
        ready[name] = info
        print(f"{name}: ready, RSS {info['rss_kib'] / 1024:.0f} MiB", flush=True)
    records: dict[str, list[dict]] = {n: [] for n in order}
    for step in range(1, cfg["total_steps"] + 1):
        for name in order:
            conns[name].send("go")
            kind, rec = conns[name].recv()
            assert kind == "step", kind
            records[name].append(rec)
            print(
                f"step {step} {name}: {rec['wall_s']:.2f} s, peak RSS {rec['peak_rss_kib'] / 1024:.0f} MiB, "
                + ", ".join(f"{k} {v:.2f}" for k, v in rec["phases_s"].items()),
                flush=True,
            )
    done = {}
    for name in order:
        kind, info = conns[name].recv()
        assert kind == "done", kind
        done[name] = info
        procs[name].join(timeout=60)
    summary = {}
    for name in order:
        v = summarise(records[name], a.warmup)
        v["rss_before_mib"] = ready[name]["rss_kib"] / 1024
        lens = done[name]["mean_completion_length_per_step"]
        v["mean_completion_length"] = statistics.mean(lens) if lens else float("nan")
        summary[name] = v
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.python_version()}",
        "versions": done[order[0]]["versions"],
        "config": cfg,
        "order": order,
        "elapsed_s": time.time() - t_start,
        "records": records,
        "mean_completion_length_per_step": {n: done[n]["mean_completion_length_per_step"] for n in order},
        "summary": summary,
    }
    result["comparisons"] = [
        {
            "trainer": n,
            "baseline": base,
            "target": target,
            "speed_ratio": summary[n]["samples_per_s"]["median"] / summary[base]["samples_per_s"]["median"],
            "paired": paired_ratios(records, n, base, a.warmup),
            "memory_ratio": summary[n]["peak_rss_mib"] / summary[base]["peak_rss_mib"],
        }
        for n, base, target in comparisons(result)
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_{a.tag}.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / f"bench_{a.tag}.md").write_text(md)
    print(md)
    print(f"wrote {out / f'bench_{a.tag}.json'} and .md in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
