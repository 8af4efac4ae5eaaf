"""How much of a training step's constraint gradient is sampling noise? Signal and noise of the gradient estimates.

Why: in the length experiment the constraints' gradient estimate is 3-10 times the task gradient's norm and
nearly orthogonal to it (``gradient_parts.py``), so it takes most of each clipped, Adam-normalised update. If
that estimate is mostly noise, the update spends its length on a random walk: the task loss learns more slowly
and the random walk itself costs perplexity. This measures it at one fixed model (default: the experiment's SFT
model, where the medium range's l_min = 20 is the active bound): N independent steps' worth of batches (8
prompts x 4 samples, temperature 0.8, at most 64 new tokens, as the experiment trains), and for each batch
three gradients, from the same samples:

- the task loss's, on the batch's 8 reference answers;
- the constraint ``mean length >= 20`` (scale 10) with lambda = 1, by the method's whole-sequence estimator;
- the same by the stop-decision estimator (``gradient: stop``).

For N i.i.d. estimates g_1..g_N of a mean mu with per-batch noise variance sigma^2 = E|g - mu|^2:
sigma^2 = N/(N-1) (mean_i |g_i|^2 - |g_bar|^2) and |mu|^2 = |g_bar|^2 - sigma^2 / N (both unbiased). The signal
to noise ratio of one step's estimate is |mu| / sigma; B sigma^2 / |mu|^2 is how many prompts a step would need
for its noise to be as large as its signal (the noise falls as 1/B).

    .venv/bin/python experiments/length/gradient_noise.py --model runs/length/sft --batches 10
    # writes results/gradient_noise.json and prints the table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

from run import BASE_CONFIG, DATA, SCALE  # noqa: E402

from l3m import L3MConfig, L3MTrainer, LengthConstraint  # noqa: E402
from l3m.data import load_examples, split_heldout  # noqa: E402


class Moments:
    """Running sum of the gradient vectors and of their squared norms (float64)."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, None, 0.0

    def add(self, g: torch.Tensor) -> None:
        g = g.double()
        self.n += 1
        self.sum = g.clone() if self.sum is None else self.sum + g
        self.sq += float(g @ g)

    def summary(self, prompts_per_step: int) -> dict:
        n = self.n
        mean = self.sum / n
        mean_sq = float(mean @ mean)
        noise = max(n / (n - 1) * (self.sq / n - mean_sq), 0.0)  # sigma^2, per batch
        signal = mean_sq - noise / n  # |mu|^2 (unbiased; can come out below 0 when the noise swamps it)
        out = {
            "batches": n,
            "mean_norm_per_batch": (self.sq / n) ** 0.5,
            "noise_sd": noise**0.5,
            "signal_norm": max(signal, 0.0) ** 0.5,
            "signal_sq": signal,
            "noise_share_of_sq_norm": noise / (self.sq / n),
            "prompts_per_step": prompts_per_step,
        }
        out["snr"] = out["signal_norm"] / out["noise_sd"] if noise > 0 else float("inf")
        out["prompts_for_snr_1"] = prompts_per_step * noise / signal if signal > 0 else float("inf")
        add_bounds(out)
        return out


def add_bounds(s: dict) -> None:
    """Conservative numbers that do not lean on the signal estimate (itself noisy with few batches): |g_bar|^2 =
    |mu|^2 + sigma^2 / N overestimates the signal, so B sigma^2 / |g_bar|^2 is a lower bound on the prompts needed."""
    upper_sq = s["signal_sq"] + s["noise_sd"] ** 2 / s["batches"]
    s["signal_norm_at_most"] = upper_sq**0.5
    s["prompts_for_snr_1_at_least"] = s["prompts_per_step"] * s["noise_sd"] ** 2 / upper_sq


def flat_grad(model, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "runs" / "length" / "sft"), help="the model to measure at")
    p.add_argument("--batches", type=int, default=10, help="independent batches (steps' worth of samples)")
    p.add_argument("--min-length", type=float, default=20.0, help="the constraint's bound: mean length >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "gradient_noise.json"))
    p.add_argument("--label", default=None, help="name of this measurement in the output (default: the model's)")
    ns = p.parse_args(argv)
    if ns.batches < 2:
        p.error("--batches must be at least 2")
    if not DATA.is_file():
        print(f"the data set {DATA} is missing (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    tr = BASE_CONFIG["training"]
    keys = ("per_device_train_batch_size", "num_generations", "max_new_tokens", "temperature", "max_length")
    args = L3MConfig(
        output_dir="/tmp/l3m_gradient_noise",
        **{k: tr[k] for k in keys},
        score_temperature=tr["score_temperature"],
        seed=ns.seed,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    train, _ = split_heldout(load_examples(str(DATA)), 0.2, seed=0)
    con = LengthConstraint(ns.min_length, "min", scale=SCALE, gradient="stop")
    trainer = L3MTrainer(ns.model, args=args, train_dataset=train, constraints=[con])
    model = trainer.model
    model.train()
    batches = iter(trainer.get_train_dataloader())
    moments = {"task": Moments(), "sequence": Moments(), "stop": Moments()}
    lengths = []
    t0 = time.perf_counter()
    for i in range(ns.batches):
        batch = trainer._prepare_inputs(next(batches))
        trainer._sample_and_weight([batch])  # samples, c_i, the leave-one-out baseline, lambda (barrier)
        lam = con.state.lam
        weights = batch.pop("sample_stop_weights") / lam  # lambda = 1: the gradient of C itself
        samples = {k: v for k, v in batch.items() if k.startswith("sample_")}
        task = {k: v for k, v in batch.items() if not k.startswith("sample_")}
        lengths.append(float(torch.as_tensor(trainer._metrics["sample/mean_length"][-1])))
        moments["task"].add(flat_grad(model, trainer.compute_loss(model, task)))
        trainer.args.task_loss = False  # the constraint term alone
        moments["sequence"].add(
            flat_grad(model, trainer.compute_loss(model, {**task, **samples, "sample_weights": weights}))
        )
        zero = torch.zeros_like(weights)
        stop = {**task, **samples, "sample_weights": zero, "sample_stop_weights": weights}
        moments["stop"].add(flat_grad(model, trainer.compute_loss(model, stop)))
        trainer.args.task_loss = True
        print(
            f"batch {i + 1}/{ns.batches}: mean length {lengths[-1]:.1f}, {time.perf_counter() - t0:.0f} s", flush=True
        )
    B = args.per_device_train_batch_size
    row = {
        "model": os.path.relpath(ns.model, REPO),
        "constraint": f"mean length >= {ns.min_length:g} (scale {SCALE:g}), lambda = 1",
        "prompts_per_step": B,
        "samples_per_prompt": args.num_generations,
        "sample_mean_length": sum(lengths) / len(lengths),
        "seconds": time.perf_counter() - t0,
        **{name: m.summary(B) for name, m in moments.items()},
    }
    out = Path(ns.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[ns.label or Path(ns.model).name] = row
    out.write_text(json.dumps(data, indent=1) + "\n")
    (out.with_suffix(".md")).write_text(markdown(data))
    print(markdown(data))
    return 0


def markdown(data: dict) -> str:
    lines = [
        "| at model | gradient | norm per step | signal norm (at most) | noise sd per step | signal/noise "
        "| noise share of \\|g\\|² | prompts per step for signal = noise (at least) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in data.items():
        for name in ("task", "sequence", "stop"):
            s = row[name]
            lines.append(
                f"| {label} | {name} | {s['mean_norm_per_batch']:.2f} | {s['signal_norm']:.2f} "
                f"({s['signal_norm_at_most']:.2f}) | {s['noise_sd']:.2f} | {s['snr']:.2f} "
                f"| {100 * s['noise_share_of_sq_norm']:.0f}% | {s['prompts_for_snr_1']:.0f} "
                f"({s['prompts_for_snr_1_at_least']:.0f}) |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
