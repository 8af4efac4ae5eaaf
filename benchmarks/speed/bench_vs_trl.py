"""L3M's training step against TRL's GRPO step: the same prompts in the same order, the ratio split into its parts.

Sides (``--sides``, comma-separated). Each side is one trainer in its own process, training with ``Trainer.train()``;
a callback holds it at the end of every optimiser step until the parent says "go", so the steps of the sides
alternate and never overlap. Every round runs each side once, the order rotating by one side per round.

  trl           TRL ``GRPOTrainer``, beta = 0 (no reference model), reward = minus the completion length.
  trl_compact   the same, its fused LM head run over the completion tokens only. TRL decides that by whether
                Triton runs on the device (``trl.trainer.utils._use_triton``): on a CUDA GPU it scores the completion
                tokens only; on a CPU it projects every position (prompt and padding included) through the LM head.
                This side turns the GPU path on, on any device; the numbers are the same, the work is not.
  trl_paged     the same as trl, sampling with transformers' continuous batching (``generate_batch``; TRL's
                ``use_transformers_continuous_batching``). Meant for a GPU.
  l3m           ``L3MTrainer``, its whole step: k samples per prompt, a mean-length constraint, and one
                forward/backward for the task loss on the batch's reference responses plus the constraint's
                score-function term, each prompt encoded once (prefix sharing) in sampling and in the loss.
  l3m_unshared  the same with prefix sharing off: each sample's prompt encoded again, in sampling and in the loss.
  l3m_static, l3m_paged   l3m with ``L3MConfig.sampler`` = static / paged, where this l3m has that setting (they
                are left out, with a message, where it does not: l3m then samples with ``generate`` only).

What both sides are given:

* the same model (``--model``: ``default`` = SmolLM2-135M-Instruct from ``l3m.models.default_model_path()``,
  ``random-1b`` = a randomly initialised ~1.0B Llama with that tokenizer, seed 0, or a local directory);
* the same prompts in the same order: the first ``prompts x (warm-up + rounds)`` rows of l3m's built-in data, each
  step the next ``--prompts`` of them (TRL: ``shuffle_dataset=False``; l3m: ``train_sampling_strategy="sequential"``).
  Every step records a hash of the prompt token ids each side sampled from; the run checks they agree round by round;
* ancestral sampling at temperature 1 (no top-p, no top-k), ``--k`` samples per prompt, at most
  ``--max-new-tokens`` new tokens; the same optimiser (AdamW, constant learning rate, gradient clipping at 1).

Completions end where the model ends them, so their lengths differ between the sides. Every figure is therefore per
generated token (end tokens included): a side's throughput in a round is its generated tokens over its step's wall
time; the ratio of two sides is taken round by round (the two steps ran back to back, under the same load) and
summarised by the geometric mean with a 95% t-interval over the rounds. The parts multiply exactly:

    l3m / trl = (l3m / l3m_unshared) x (l3m_unshared / trl_compact) x (trl_compact / trl)
                 prefix sharing         the rest                        TRL's CPU log-prob fallback

Each comparison is also given for the sampling phase alone (generated tokens per second of sampling) and for the
rest of the step (generated tokens per second of everything but sampling: rewards or constraints, the log-prob
forward, backward, optimiser, bookkeeping). The L3M step's rest includes its task loss (the reference responses of
the batch's prompts), which GRPO does not have.

Memory: on a CPU, the kernel's high-water mark of each side's resident set (``VmHWM``, reset before every step by
writing 5 to ``/proc/self/clear_refs``); on a GPU, ``torch.cuda.max_memory_allocated`` (reset before every step).
Timers: ``time.perf_counter``; on a GPU, after ``torch.cuda.synchronize()``.

    python benchmarks/speed/bench_vs_trl.py            # CPU: trl, trl_compact, l3m, l3m_unshared (~10 minutes)
    python benchmarks/speed/bench_vs_trl.py --gpu      # one GPU: trl, trl_paged, l3m, l3m_static, l3m_paged

TRL comes with ``pip install -e ".[bench]"``. Results go to ``benchmarks/speed/results/`` as
``vs_trl_<device>_<model>_<prompts>x<k>x<tokens>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/random_llama.py

HERE = Path(__file__).resolve().parent
SIDES = {
    "trl": "TRL GRPOTrainer (beta=0)",
    "trl_compact": "TRL GRPOTrainer, LM head over completion tokens only",
    "trl_paged": "TRL GRPOTrainer, continuous batching (generate_batch)",
    "l3m": "L3MTrainer, whole step",
    "l3m_unshared": "L3MTrainer, no prefix sharing",
    "l3m_static": "L3MTrainer, sampler static",
    "l3m_paged": "L3MTrainer, sampler paged",
}
L3M_SAMPLER = {"l3m": "hf", "l3m_unshared": "hf", "l3m_static": "static", "l3m_paged": "paged"}
PHASES = ("sampling", "rewards", "loss_forward", "backward", "optimizer")
CPU_SIDES = "trl,trl_compact,l3m,l3m_unshared"
GPU_SIDES = "trl,trl_paged,l3m,l3m_static,l3m_paged"
# (numerator, denominator, what the ratio measures), reported where both sides ran
COMPARISONS = [
    ("l3m", "trl", "whole: L3M step / TRL GRPO step"),
    ("l3m_unshared", "trl", "(a) L3M without prefix sharing / TRL as it runs here"),
    ("l3m_unshared", "trl_compact", "(a') L3M without prefix sharing / TRL scoring completion tokens only"),
    ("l3m", "l3m_unshared", "(b) prefix sharing"),
    ("trl_compact", "trl", "(c) TRL's completion-only scoring (its CPU fallback undone)"),
    ("l3m", "trl_compact", "L3M step / TRL scoring completion tokens only"),
    ("l3m", "trl_paged", "L3M step / TRL with continuous batching"),
    ("trl_paged", "trl", "TRL: continuous batching / generate"),
    ("l3m_static", "trl", "L3M (static sampler) / TRL"),
    ("l3m_paged", "trl_paged", "L3M (paged sampler) / TRL with continuous batching"),
    ("l3m_static", "l3m", "L3M: static sampler / hf"),
    ("l3m_paged", "l3m", "L3M: paged sampler / hf"),
]
DECOMPOSITION = (("l3m", "l3m_unshared"), ("l3m_unshared", "trl_compact"), ("trl_compact", "trl"))


# ----------------------------------------------------------------------------------------------
# statistics: paired ratios over rounds


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (Simpson's rule on its density, bisection)."""

    def cdf(x: float) -> float:
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)
        n = 2000
        h = x / n
        s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Per-round ratios ``num[r] / den[r]``: their geometric mean and its 95% t-interval (on the log scale)."""
    logs = [math.log(a / b) for a, b in zip(num, den)]
    n = len(logs)
    mean = statistics.fmean(logs)
    half = t_quantile(0.975, n - 1) * statistics.stdev(logs) / math.sqrt(n) if n > 1 else float("nan")
    ratios = [math.exp(x) for x in logs]
    return {
        "ratio": math.exp(mean),
        "ci95": [math.exp(mean - half), math.exp(mean + half)],
        "rounds": n,
        "min": min(ratios),
        "max": max(ratios),
        "per_round": ratios,
    }


# ----------------------------------------------------------------------------------------------
# memory: the kernel's per-process high-water mark of the resident set (CPU)


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
# the worker: one side, stepping when told


def neg_length(completions, completion_ids=None, **kwargs) -> list[float]:
    """GRPO's reward: minus the completion length in tokens (the counterpart of l3m's length constraint)."""
    return [-float(len(c)) for c in completion_ids]


def prompt_hash(prompts: list[list[int]]) -> str:
    return hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:16]


def load_model(spec: str, cuda: bool):
    """(model, tokenizer) for ``--model``; a random model is initialised from seed 0, so every side gets the same."""
    import torch
    from random_llama import random_llama_1b
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l3m.models import default_model_path

    path = default_model_path() if spec in ("default", "random-1b") else Path(spec)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if spec != "random-1b":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok
    return random_llama_1b(tok, "cuda" if cuda else "cpu"), tok


def worker(side: str, cfg: dict, conn) -> None:
    try:
        _worker(side, cfg, conn)
    except BaseException:  # noqa: BLE001 - the parent reports it and stops the other sides
        conn.send(("error", traceback.format_exc()))
        raise


def _worker(side: str, cfg: dict, conn) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if not cfg["gpu"]:
        os.environ["OMP_NUM_THREADS"] = str(cfg["threads"])
    import torch

    if not cfg["gpu"]:
        torch.set_num_threads(cfg["threads"])
    import datasets
    import transformers
    import trl
    import trl.trainer.utils as trl_utils
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    import l3m.sampling as l3m_sampling
    import l3m.trainer as l3m_trainer
    from l3m import L3MConfig, L3MTrainer, LengthConstraint
    from l3m.data import load_examples

    transformers.logging.set_verbosity_error()
    cuda = cfg["gpu"]
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    p, k, steps = cfg["prompts"], cfg["k"], cfg["total_steps"]
    model, tok = load_model(cfg["model"], cuda)
    examples = load_examples("builtin")[: p * steps]  # exactly the steps' prompts, in order, for every side
    out_dir = tempfile.mkdtemp(prefix=f"bench-{side}-")
    common = dict(
        output_dir=out_dir,
        max_steps=steps,
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=cfg["seed"],
        use_cpu=not cuda,
        bf16=cuda,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    step: dict = defaultdict(float)  # this step's phases and counts
    info: dict = {
        "side": side,
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s) per side",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }

    def timed(obj, attr: str, phase: str, after=None) -> None:
        fn = getattr(obj, attr)

        def wrapper(*a, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            step[phase] += time.perf_counter() - t
            if after is not None:
                after(a, out)
            return out

        setattr(obj, attr, wrapper)

    if side.startswith("trl"):
        from trl import GRPOConfig, GRPOTrainer

        extra = {}
        if side == "trl_paged":
            names = {f.name for f in dataclasses.fields(GRPOConfig)}
            flag = "use_transformers_continuous_batching"
            extra[flag if flag in names else "use_transformers_paged"] = True
            # The paged cache holds this step's sequences (prompts up to 256 tokens, pages of 256 tokens): TRL's
            # default, half of the GPU's memory, assumes one process per GPU, and the sides share one here.
            blocks = p * k * math.ceil((256 + cfg["max_new_tokens"]) / 256)
            extra["transformers_continuous_batching_config"] = {"num_blocks": blocks}
        args = GRPOConfig(
            **common,
            per_device_train_batch_size=p * k,  # GRPO counts completions per batch, not prompts
            num_generations=k,
            max_completion_length=cfg["max_new_tokens"],
            beta=0.0,
            shuffle_dataset=False,
            log_completions=False,
            **extra,
        )
        ds = datasets.Dataset.from_list([{"prompt": ex.prompt} for ex in examples])
        trainer = GRPOTrainer(model=model, reward_funcs=neg_length, args=args, train_dataset=ds, processing_class=tok)
        if side == "trl_compact":
            trl_utils._use_triton = lambda dev: True  # the fused LM head's choice of completion-only scoring
        info["trl_completion_only_scoring"] = bool(trl_utils._use_triton(device))
        eos = set(trainer.eos_token_ids)

        def after_sampling(a, out):
            ids = out[0]  # completion ids, each up to and including its end token
            step["tokens"] += sum(len(c) for c in ids)
            step["sequences"] += len(ids)
            step["truncated"] += sum(1 for c in ids if not c or c[-1] not in eos)
            step["decode_steps"] = max(step["decode_steps"], max(len(c) for c in ids))
            prompts = [list(map(int, x)) for x in a[0]]
            assert all(prompts[i] == prompts[i - i % k] for i in range(len(prompts))), "prompts not grouped by k"
            step["prompt_hash"] = prompt_hash(prompts[::k])

        timed(trainer, "_generate_single_turn", "sampling", after_sampling)
        timed(trainer, "_calculate_rewards", "rewards")
    else:
        sampler = L3M_SAMPLER[side]
        extra = {}
        if "sampler" in {f.name for f in dataclasses.fields(L3MConfig)}:
            extra["sampler"] = sampler
        elif sampler != "hf":
            raise SystemExit(f"{side}: this l3m has no sampler setting")
        info["l3m_sampler"] = extra.get("sampler", "hf (generate; no sampler setting)")
        args = L3MConfig(
            **common,
            per_device_train_batch_size=p,
            num_generations=k,
            max_new_tokens=cfg["max_new_tokens"],
            train_sampling_strategy="sequential",
            **extra,
        )
        trainer = L3MTrainer(
            model,
            args=args,
            train_dataset=examples,
            processing_class=tok,
            constraints=[LengthConstraint(cfg["length_limit"], "max")],
        )
        if side == "l3m_unshared":  # prefix sharing off: in sampling (generate with num_return_sequences) and loss
            if not hasattr(l3m_sampling, "_shared_prompt_cache"):
                raise SystemExit("l3m_unshared: l3m.sampling has no _shared_prompt_cache to turn off")
            l3m_sampling._shared_prompt_cache = lambda *a, **kw: None
            trainer._can_share_prefix = lambda model: False
        info["l3m_prefix_sharing"] = side != "l3m_unshared"

        def after_sampling(a, comps):
            scored = comps.scored_ids()  # each response up to and including its end token
            step["tokens"] += sum(len(c) for c in scored)
            step["sequences"] += len(scored)
            step["truncated"] += sum(comps.truncated)
            step["decode_steps"] = max(step["decode_steps"], max(len(c) for c in scored))
            ids, mask = a[0], a[1]
            step["prompt_hash"] = prompt_hash([row[m.bool()].tolist() for row, m in zip(ids, mask)])

        timed(trainer, "sample", "sampling", after_sampling)
        timed(l3m_trainer, "evaluate_constraints", "rewards")  # a module-level name in l3m.trainer

    def after_loss(a, out):  # the task loss's tokens: the reference responses of the batch's prompts (l3m only)
        inputs = a[1] if len(a) > 1 else {}
        if "response_mask" in inputs and "sample_input_ids" in inputs:
            step["task_tokens"] += int(inputs["response_mask"].sum())

    timed(trainer, "compute_loss", "loss_forward", after_loss)
    timed(trainer.accelerator, "backward", "backward")
    timed(trainer, "_clip_grad_norm", "optimizer")

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_kib("VmHWM") / 1024

    class Gate(TrainerCallback):
        """Holds training at the end of each optimiser step until the parent says go; records the step."""

        t0 = t_opt = 0.0

        def _go(self) -> None:
            if conn.recv() != "go":
                raise SystemExit(0)
            step.clear()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            info["memory_before_mib"] = torch.cuda.memory_allocated() / 2**20 if cuda else _status_kib("VmRSS") / 1024
            conn.send(("ready", info))
            self._go()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            sync()
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            sync()
            step["optimizer"] += time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, **kw):
            sync()
            wall = time.perf_counter() - self.t0
            rec = {
                "step": state.global_step,
                "wall_s": wall,
                "phases_s": {ph: step.get(ph, 0.0) for ph in PHASES},
                "tokens": int(step["tokens"]),
                "task_tokens": int(step["task_tokens"]),
                "sequences": int(step["sequences"]),
                "truncated": int(step["truncated"]),
                "decode_steps": int(step["decode_steps"]),
                "prompt_hash": step.get("prompt_hash"),
                "peak_mib": peak(),
                "param_dtype": str(next(trainer.model.parameters()).dtype),
            }
            conn.send(("step", rec))
            if state.global_step < steps:
                self._go()

    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the parent prints its own lines
    trainer.add_callback(Gate())
    trainer.train()
    conn.send(("done", {}))
    conn.close()


# ----------------------------------------------------------------------------------------------
# the parent: start the sides, alternate their steps, summarise


def side_summary(records: list[dict]) -> dict:
    """One side's timed rounds."""
    tok = sum(r["tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    samp = sum(r["phases_s"]["sampling"] for r in records)
    tps = [r["tokens"] / r["wall_s"] for r in records]
    return {
        "rounds": len(records),
        "wall_s_median": statistics.median(r["wall_s"] for r in records),
        "tokens_per_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
        "tokens_per_step": tok / len(records),
        "task_tokens_per_step": sum(r.get("task_tokens", 0) for r in records) / len(records),
        "mean_completion_tokens": tok / sum(r["sequences"] for r in records),
        "truncated_share": sum(r["truncated"] for r in records) / sum(r["sequences"] for r in records),
        "sampling_ms_per_token": 1000 * samp / tok,
        "sampling_tokens_per_s": tok / samp,
        "sampling_ms_per_decode_step": 1000 * samp / sum(r["decode_steps"] for r in records),
        "rest_ms_per_token": 1000 * (wall - samp) / tok,
        "phases_mean_s": {ph: statistics.fmean(r["phases_s"][ph] for r in records) for ph in PHASES},
        "other_mean_s": statistics.fmean(r["wall_s"] - sum(r["phases_s"].values()) for r in records),
        "wall_mean_s": wall / len(records),
        "param_dtype": records[-1]["param_dtype"],
    }


def compare(records: dict[str, list[dict]], num: str, den: str) -> dict:
    a, b = records[num], records[den]
    step = lambda r: r["tokens"] / r["wall_s"]
    samp = lambda r: r["tokens"] / r["phases_s"]["sampling"]
    rest = lambda r: r["tokens"] / (r["wall_s"] - r["phases_s"]["sampling"])
    out = {f: paired_ratio([g(r) for r in a], [g(r) for r in b]) for f, g in (("step", step), ("sampling", samp))}
    out["rest"] = paired_ratio([rest(r) for r in a], [rest(r) for r in b])
    out["wall_time"] = paired_ratio([r["wall_s"] for r in b], [r["wall_s"] for r in a])  # > 1: num is faster
    return out


def fmt_ratio(r: dict) -> str:
    return f"{r['ratio']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def markdown(res: dict) -> str:
    cfg, s = res["config"], res["sides"]
    mem = "peak GPU MiB (max_memory_allocated)" if cfg["gpu"] else "peak RSS MiB (VmHWM)"
    lines = [
        f"# L3M step vs TRL GRPO step: {res['setting']}",
        "",
        f"Device: {res['device']} ({res['machine']}); torch {res['versions']['torch']}, transformers "
        f"{res['versions']['transformers']}, TRL {res['versions']['trl']}.",
        f"Model {cfg['model_name']}; {cfg['prompts']} prompts x {cfg['k']} samples per step, at most "
        f"{cfg['max_new_tokens']} new tokens, temperature 1; AdamW lr {cfg['learning_rate']}, constant, clipping 1; "
        f"{res['rounds_timed']} timed rounds after {cfg['warmup']} warm-up round(s), the order of the sides "
        f"rotating each round ({', '.join(res['order'])}); {res['elapsed_s'] / 60:.1f} minutes in all; load average "
        f"{res['load_average_1min']['start']:.1f} at the start, {res['load_average_1min']['end']:.1f} at the end.",
        f"Same prompts on every side in every round: **{'yes' if res['same_prompts'] else 'NO'}** "
        f"(hash of the prompt token ids each side sampled from).",
        "",
        "| side | generated tokens/s, median [min, max] | step s (median) | mean completion tokens | cut off at the "
        f"cap | task-loss tokens per step | sampling ms/token | sampling ms/decode step | rest ms/token | {mem} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        t = v["tokens_per_s"]
        lines.append(
            f"| {name}: {SIDES[name]} | {t['median']:.1f} [{t['min']:.1f}, {t['max']:.1f}] | {v['wall_s_median']:.2f} "
            f"| {v['mean_completion_tokens']:.1f} | {100 * v['truncated_share']:.0f}% | "
            f"{v.get('task_tokens_per_step', 0):.0f} | "
            f"{v['sampling_ms_per_token']:.1f} | {v['sampling_ms_per_decode_step']:.1f} | "
            f"{v['rest_ms_per_token']:.1f} | {v['peak_mib']:.0f} |"
        )
    lines += [
        "",
        "Paired ratios of generated tokens per second (> 1: the first side is faster), geometric mean over the "
        "rounds [95% t-interval]; for the whole step, the sampling phase alone, and the rest of the step:",
        "",
        "| comparison | whole step | sampling | rest of the step | step wall-time ratio (no normalisation) |",
        "|---|---|---|---|---|",
    ]
    for c in res["comparisons"]:
        lines.append(
            f"| {c['label']} (`{c['num']}` / `{c['den']}`) | {fmt_ratio(c['step'])} | {fmt_ratio(c['sampling'])} | "
            f"{fmt_ratio(c['rest'])} | {fmt_ratio(c['wall_time'])} |"
        )
    if res.get("decomposition"):
        d = res["decomposition"]
        lines += [
            "",
            f"Decomposition of the whole-step ratio: {' x '.join(f'{x:.3f}' for x in d['factors'])} = "
            f"{d['product']:.3f} (l3m / trl measured directly: {d['whole']:.3f}).",
        ]
    lines += [
        "",
        "Mean seconds per step in each phase (other = wall time minus the phases):",
        "",
        "| side | " + " | ".join(PHASES) + " | other | wall |",
        "|---|" + "---|" * (len(PHASES) + 2),
    ]
    for name, v in s.items():
        ph = v["phases_mean_s"]
        cells = [ph[x] for x in PHASES] + [v["other_mean_s"]]
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in cells) + f" | {v['wall_mean_s']:.2f} |")
    lines += [
        "",
        "Phases: sampling = drawing the completions (TRL: `_generate_single_turn`; l3m: `L3MTrainer.sample`); "
        "rewards = the reward function / the constraints; loss_forward = `compute_loss` (the log-prob forward and "
        "the loss); backward = `accelerator.backward`; optimizer = gradient clipping and `optimizer.step`; other = "
        "the rest (data, tokenising, decoding, advantages or weights, logging). Generated tokens count each "
        "completion up to and including its end token; a decode step is one new token for the whole batch (a "
        "step's decode steps: its longest completion).",
    ]
    notes = list(res.get("notes") or [])
    dtypes = {name: v["param_dtype"] for name, v in s.items()}
    if len(set(dtypes.values())) > 1:  # e.g. TRL's continuous batching casts the model to bf16 under bf16=True
        notes.append("parameter dtype after the last step: " + ", ".join(f"{n} {d}" for n, d in dtypes.items()))
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="one CUDA GPU: bf16 mixed precision, GPU sides and sizes")
    ap.add_argument("--model", default="default", help="default | random-1b | a local model directory")
    ap.add_argument("--sides", default=None, help=f"comma-separated (CPU default {CPU_SIDES}; GPU {GPU_SIDES})")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (CPU default 2; GPU 8)")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="CPU default 32; GPU 128")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first rounds (CPU default 1; GPU 3)")
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--length-limit", type=int, default=32, help="l3m's constraint: mean length <= this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per side (default 1)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop starting rounds after this long")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the .json and .md results")
    ap.add_argument("--name", default=None, help="results file name without suffix (default: from the setting)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only write the .md of an earlier run's .json")
    a = ap.parse_args(argv)
    a.sides = a.sides or (GPU_SIDES if a.gpu else CPU_SIDES)
    a.prompts = a.prompts or (8 if a.gpu else 2)
    a.max_new_tokens = a.max_new_tokens or (128 if a.gpu else 32)
    a.warmup = a.warmup if a.warmup is not None else (3 if a.gpu else 1)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.render:
        src = Path(a.render)
        src.with_suffix(".md").write_text(markdown(json.loads(src.read_text())))
        return 0
    order = [t.strip() for t in a.sides.split(",") if t.strip()]
    unknown = [t for t in order if t not in SIDES]
    if unknown:
        sys.exit(f"unknown side(s) {unknown}; choose from {list(SIDES)}")
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        sys.exit('TRL is not installed: pip install -e ".[bench]" (a benchmark-only dependency)')
    import torch

    if a.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device here")
    from l3m.config import L3MConfig

    notes = []
    if "sampler" not in {f.name for f in dataclasses.fields(L3MConfig)}:
        dropped = [s for s in order if L3M_SAMPLER.get(s, "hf") != "hf"]
        if dropped:
            msg = f"L3MConfig has no `sampler` setting: l3m samples with generate (hf) only; left out: {dropped}"
            print(msg)
            notes.append(msg)
            order = [s for s in order if s not in dropped]
    if not a.gpu and not reset_peak_rss():
        print("warning: cannot reset the peak RSS (/proc/self/clear_refs): memory is the process-lifetime peak")
    model_name = {"default": "SmolLM2-135M-Instruct (fp32)", "random-1b": "random Llama ~1.0B"}.get(a.model)
    model_name = model_name or Path(a.model).name
    if a.gpu:
        model_name += ", bf16 mixed precision"
    short = {"default": "smollm2-135m"}.get(a.model, Path(a.model).name.lower())
    setting = f"{'gpu' if a.gpu else 'cpu'}, {short}, {a.prompts}x{a.k}x{a.max_new_tokens}"
    name = a.name or f"vs_trl_{'gpu' if a.gpu else 'cpu'}_{short}_{a.prompts}x{a.k}x{a.max_new_tokens}"
    cfg = {
        "gpu": a.gpu,
        "model": a.model,
        "model_name": model_name,
        "prompts": a.prompts,
        "k": a.k,
        "max_new_tokens": a.max_new_tokens,
        "warmup": a.warmup,
        "rounds": a.rounds,
        "total_steps": a.warmup + a.rounds,
        "learning_rate": a.learning_rate,
        "length_limit": a.length_limit,
        "seed": a.seed,
        "threads": a.threads,
    }
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs, conns, ready = {}, {}, {}
    t_start = time.time()
    load_start = os.getloadavg()

    def receive(side: str, kind: str):
        try:
            got, payload = conns[side].recv()
        except EOFError:
            got, payload = "error", f"{side}: the process ended without a word (exit code {procs[side].exitcode})"
        if got == "error":
            for proc in procs.values():  # the processes this run started, one by one
                if proc.is_alive():
                    proc.terminate()
            sys.exit(f"{side} failed:\n{payload}")
        assert got == kind, (side, got, kind)
        return payload

    for side in order:  # one at a time: loading in parallel would only contend for the cores
        parent, child = ctx.Pipe()
        procs[side] = ctx.Process(target=worker, args=(side, cfg, child), daemon=True)
        procs[side].start()
        conns[side] = parent
        ready[side] = receive(side, "ready")
        print(f"{side}: ready ({ready[side]})", flush=True)
    records: dict[str, list[dict]] = {s: [] for s in order}
    rounds_run = 0
    for r in range(cfg["total_steps"]):
        t_round = time.time()
        for side in order[r % len(order) :] + order[: r % len(order)]:
            conns[side].send("go")
            rec = receive(side, "step")
            rec["round"] = r
            records[side].append(rec)
            print(
                f"round {r} {side}: {rec['wall_s']:.2f} s, {rec['tokens']} tokens, {rec['tokens'] / rec['wall_s']:.1f} "
                f"tok/s, peak {rec['peak_mib']:.0f} MiB, "
                + ", ".join(f"{ph} {x:.2f}" for ph, x in rec["phases_s"].items()),
                flush=True,
            )
        rounds_run = r + 1
        spent = (time.time() - t_start) / 60
        if a.max_minutes and r + 1 < cfg["total_steps"] and spent + (time.time() - t_round) / 60 > a.max_minutes:
            msg = f"stopped after {rounds_run - a.warmup} timed rounds (--max-minutes {a.max_minutes})"
            print(msg)
            notes.append(msg)
            break
    if rounds_run < cfg["total_steps"]:
        for proc in procs.values():
            proc.terminate()
    else:
        for s in order:
            receive(s, "done")
            procs[s].join(timeout=60)
    timed = {s: [x for x in recs if x["round"] >= a.warmup] for s, recs in records.items()}
    if not timed[order[0]]:
        sys.exit("no timed rounds")
    hashes = [{timed[s][i]["prompt_hash"] for s in order} for i in range(len(timed[order[0]]))]
    same = all(len(h) == 1 for h in hashes)
    if not same:
        print("WARNING: the sides sampled from different prompts in some round")
    sides = {}
    for s in order:
        v = side_summary(timed[s])
        v["peak_mib"] = max(x["peak_mib"] for x in records[s])  # the warm-up included: optimiser state, caches
        v["memory_before_mib"] = ready[s]["memory_before_mib"]
        v["worker"] = ready[s]
        sides[s] = v
    comparisons = [
        {"num": n, "den": d, "label": label, **compare(timed, n, d)}
        for n, d, label in COMPARISONS
        if n in order and d in order
    ]
    res = {
        "setting": setting,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": ready[order[0]]["device"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}",
        "versions": ready[order[0]]["versions"],
        "config": cfg,
        "order": order,
        "rounds_timed": len(timed[order[0]]),
        "elapsed_s": time.time() - t_start,
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},  # other jobs on the machine
        "same_prompts": same,
        "sides": sides,
        "comparisons": comparisons,
        "records": records,
        "notes": notes,
    }
    if all(n in order and d in order for n, d in DECOMPOSITION):
        factors = [compare(timed, n, d)["step"]["ratio"] for n, d in DECOMPOSITION]
        res["decomposition"] = {
            "factors": factors,
            "labels": [f"{n} / {d}" for n, d in DECOMPOSITION],
            "product": math.prod(factors),
            "whole": compare(timed, "l3m", "trl")["step"]["ratio"],
        }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {out / name}.json and .md in {res['elapsed_s']:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
