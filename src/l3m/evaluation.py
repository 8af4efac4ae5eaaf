"""Checking a model against its constraints on held-out prompts, and its task log-perplexity.

A constraint's verdict comes from a 95% bootstrap confidence interval of ``C_i`` (resampling prompts,
each with its ``k`` samples): **holds** when the interval lies at or below 0, **violated** when it lies
at or above 0, **undecided** when it straddles 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from l3m.constraints import Constraint, SampleBatch, evaluate_constraints
from l3m.data import Example, pad, tokenize_examples
from l3m.errors import L3MUserError
from l3m.logprobs import response_logprobs
from l3m.quality import bootstrap_ci, quality_stats
from l3m.sampling import sample_examples


def verdict(lo: float, hi: float) -> str:
    if hi <= 0:
        return "holds"
    if lo >= 0:
        return "violated"
    return "undecided"


def constraint_rows(
    constraints: Sequence[Constraint], c_per_prompt: torch.Tensor, raw_per_prompt: torch.Tensor, n_boot: int = 2000
) -> list[dict]:
    """Per constraint: the estimate of C_i, its 95% bootstrap interval over prompts, the mean raw quantity and the
    verdict, from the per-prompt means ``[n_prompts, m]`` of c and of the raw quantity."""
    rows = []
    for i, con in enumerate(constraints):
        lo, hi = bootstrap_ci(c_per_prompt[:, i], n_boot)
        rows.append(
            {
                "name": con.name,
                "kind": con.kind,
                "direction": con.direction,
                "threshold": con.threshold,
                "scale": con.scale,
                "constraint": con.describe(),
                "value": float(c_per_prompt[:, i].double().mean()),
                "ci95": [lo, hi],
                "mean_raw": float(raw_per_prompt[:, i].double().mean()),
                "verdict": verdict(lo, hi),
            }
        )
    return rows


def constraint_report(
    constraints: Sequence[Constraint], samples: SampleBatch, k: int, n_boot: int = 2000
) -> list[dict]:
    """:func:`constraint_rows` for ``k`` samples per prompt, grouped consecutively."""
    raw, c = evaluate_constraints(constraints, samples)
    n_prompts, m = len(samples.completions) // k, len(constraints)
    return constraint_rows(
        constraints, c.reshape(n_prompts, k, m).mean(1), raw.reshape(n_prompts, k, m).mean(1), n_boot
    )


@torch.no_grad()
def task_logppl(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 8, max_length: int = 512, progress: bool = True
) -> torch.Tensor:
    """Per-example task log-perplexity: the mean NLL per response token (prompt tokens never count), computed by
    the same function as the training loss (:func:`l3m.logprobs.response_logprobs`)."""
    feats = tokenize_examples(tokenizer, list(examples), max_length=max_length, what="held-out data")
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in tqdm(range(0, len(feats), batch_size), desc="perplexity", disable=not progress, leave=False):
            chunk = feats[i : i + batch_size]
            ids = pad([f["input_ids"] for f in chunk], tokenizer.pad_token_id)
            attn = pad([[1] * len(f["input_ids"]) for f in chunk], 0)
            mask = pad([f["response_mask"] for f in chunk], 0)
            rows = response_logprobs(model, [(ids, mask, attn)], tokenizer.pad_token_id)
            n_tok = mask.sum(1).clamp(min=1)
            out.append(torch.stack([-r.sum().cpu() for r in rows]).double() / n_tok)
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# Whole-model evaluation: numbers (JSON), a Markdown table, a terminal table


def length_stats(lengths: Sequence[int] | torch.Tensor, max_new_tokens: int | None = None) -> dict:
    """Distribution of response lengths in tokens: mean, std, min, quartiles, max, 5th/95th percentiles."""
    x = torch.as_tensor(lengths, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return {"n": 0}
    q = torch.quantile(x, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    out = {
        "n": int(x.numel()),
        "mean": float(x.mean()),
        "std": float(x.std()) if x.numel() > 1 else 0.0,
        "min": float(x.min()),
        "p5": q[0],
        "q1": q[1],
        "median": q[2],
        "q3": q[3],
        "p95": q[4],
        "max": float(x.max()),
    }
    if max_new_tokens is not None:
        out["clipped_ratio"] = float((x >= max_new_tokens).double().mean())
    return out


def load_constraint_specs(path: str | os.PathLike) -> list[dict]:
    """Constraint entries from a YAML/JSON list, or from a run config's ``constraints:`` section."""
    p = Path(path)
    if not p.is_file():
        raise L3MUserError(f"constraints file '{path}' does not exist")
    try:
        doc = yaml.safe_load(p.read_text())  # JSON is YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise L3MUserError(f"{where}: invalid YAML/JSON ({getattr(exc, 'problem', exc)})") from None
    if isinstance(doc, dict):
        if "constraints" not in doc:
            raise L3MUserError(f"{path}: a mapping needs a 'constraints:' list (a run config), or give a plain list")
        doc = doc["constraints"]
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise L3MUserError(f"{path}: expected a list of constraint entries, got {type(doc).__name__}")
    from l3m.runconfig import fix_numbers

    return fix_numbers(doc)


def training_warnings(model_dir: str | os.PathLike) -> list[str]:
    """Names of constraints the training run warned might be infeasible (from its ``summary.json``)."""
    p = Path(model_dir) / "summary.json"
    if not p.is_file():
        return []
    try:
        summary = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return []
    return [c["name"] for c in summary.get("constraints") or [] if c.get("warned_infeasible")]


def evaluate_model(
    model,
    tokenizer,
    constraints: Sequence[Constraint],
    heldout: Sequence[Example] | None = None,
    prompts: Sequence[Example] | None = None,
    k: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    n_boot: int = 2000,
    max_length: int = 512,
    max_prompt_length: int = 256,
    progress: bool = True,
    name: str = "model",
    warned: Sequence[str] = (),
    sampler: str = "hf",
) -> dict:
    """Task log-perplexity on ``heldout`` and constraint verdicts on ``k`` samples per prompt.

    Prompts to sample from are ``prompts`` if given, else the prompts of ``heldout``.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    t0 = time.perf_counter()
    result: dict = {
        "model": name,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    if heldout:
        nll = task_logppl(model, tokenizer, heldout, batch_size=batch_size, max_length=max_length, progress=progress)
        m, s = mean_std(nll)
        result["task_logppl"] = {"n": int(nll.numel()), "mean": m, "std": s, "per_example": nll.tolist()}
    sample_from = list(prompts) if prompts else list(heldout or [])
    if sample_from:
        samples = sample_examples(
            model,
            tokenizer,
            sample_from,
            k=k,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
            seed=seed,
            progress=progress,
            sampler=sampler,
        )
        result["n_prompts"] = len(sample_from)
        lengths = samples.lengths.tolist()
        truncated = samples.truncated.tolist()
        result["lengths"] = {**length_stats(lengths, max_new_tokens), "values": lengths}
        result["quality"] = quality_stats(samples.completion_ids, truncated, n_boot=n_boot, seed=seed, k=k)
        rows = constraint_report(constraints, samples, k, n_boot=n_boot) if constraints else []
        for r in rows:
            r["warned_infeasible_in_training"] = r["name"] in warned
        result["constraints"] = rows
        result["samples"] = [
            {
                "prompt": samples.prompts[i],
                "completion": samples.completions[i],
                "completion_ids": samples.completion_ids[i],
                "length": lengths[i],
                "truncated": truncated[i],
            }
            for i in range(len(lengths))
        ]
    result["warnings"] = [
        f"training warned that constraint '{w}' may be infeasible (violated for many consecutive steps)" for w in warned
    ]
    result["time_s"] = time.perf_counter() - t0
    return result


def _fmt_ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


MODEL_COLUMNS = (
    "model",
    "task log-ppl (mean ± std)",
    "mean length",
    "median length",
    "cut off (95% CI)",
    "repetition",
    "distinct-2",
    "prompts × k",
)


def model_row(r: dict, compact: bool = False) -> list[str]:
    """One model's summary cells: perplexity, lengths, the share cut off at max_new_tokens, repetition, diversity.

    Repetition is the share of responses in which some token 4-gram occurs 3 or more times; distinct-2 the share of
    distinct token bigrams among all of them."""
    ppl = r.get("task_logppl")
    ppl_s = f"{ppl['mean']:.3f} ± {ppl['std']:.3f}" + ("" if compact else f" (n={ppl['n']})") if ppl else "—"
    ln, q = r.get("lengths") or {}, r.get("quality") or {}
    if not ln.get("n"):
        return [r["model"], ppl_s] + ["—"] * (len(MODEL_COLUMNS) - 2)
    cut = q.get("truncated_share", ln.get("clipped_ratio", math.nan))
    lo, hi = q.get("truncated_ci", (math.nan, math.nan))
    return [
        r["model"],
        ppl_s,
        f"{ln['mean']:.1f}" if compact else f"{ln['mean']:.1f} ± {ln['std']:.1f}",
        f"{ln['median']:.0f}",
        f"{100 * cut:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]",
        f"{100 * q.get('repetition_rate', math.nan):.0f}%",
        f"{q.get('distinct_2', math.nan):.2f}",
        f"{r['n_prompts']} × {r['k']}",
    ]


def markdown_table(results: Sequence[dict]) -> str:
    """One Markdown page section: per model its perplexity, lengths and quality checks, then one row per constraint."""
    lines = ["| " + " | ".join(MODEL_COLUMNS) + " |", "|" + "---|" * len(MODEL_COLUMNS)]
    lines += ["| " + " | ".join(model_row(r)) + " |" for r in results]
    crow = [
        "",
        "| model | constraint | C estimate | 95% CI (bootstrap over prompts) | mean raw | verdict |",
        "|---|---|---|---|---|---|",
    ]
    any_c = False
    for r in results:
        for c in r.get("constraints") or []:
            any_c = True
            flag = " ⚠ warned infeasible in training" if c.get("warned_infeasible_in_training") else ""
            crow.append(
                f"| {r['model']} | {c['constraint']} | {c['value']:.3g} | {_fmt_ci(c['ci95'])} | "
                f"{c['mean_raw']:.3g} | **{c['verdict']}**{flag} |"
            )
    if any_c:
        lines += crow
    return "\n".join(lines) + "\n"


def print_rich(results: Sequence[dict], console=None) -> None:
    """The same numbers as :func:`markdown_table`, as tables in the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="held-out evaluation (cut off: at max_new_tokens, 95% CI; repeat: a 4-gram 3+ times)")
    for col in ("model", "log-ppl", "mean len", "median", "cut off", "repeat", "dist-2", "n×k"):
        t.add_column(col)
    for r in results:
        t.add_row(*model_row(r, compact=True))
    console.print(t)
    rows = [(r, c) for r in results for c in r.get("constraints") or []]
    if rows:
        ct = Table(title="constraints (95% bootstrap CI over prompts)")
        for col in ("model", "constraint", "C", "95% CI", "mean raw", "verdict"):
            ct.add_column(col)
        colour = {"holds": "green", "violated": "red", "undecided": "yellow"}
        for r, c in rows:
            v = f"[{colour[c['verdict']]}]{c['verdict']}[/]"
            if c.get("warned_infeasible_in_training"):
                v += " [red](warned infeasible in training)[/]"
            ct.add_row(r["model"], c["constraint"], f"{c['value']:.3g}", _fmt_ci(c["ci95"]), f"{c['mean_raw']:.3g}", v)
        console.print(ct)
    for r in results:
        for w in r.get("warnings") or []:
            console.print(f"[yellow]warning[/yellow] ({r['model']}): {w}")


def run_evaluate(ns) -> list[dict]:
    """``l3m evaluate``: the CLI entry point (arguments from :func:`add_evaluate_arguments`)."""
    from l3m.constraints import build_constraints, validate_constraint_specs
    from l3m.data import load_examples
    from l3m.models import check_model_exists, load_causal_lm, load_tokenizer
    from l3m.runconfig import resolve_data_path

    specs: list[dict] = []
    base = "."
    if ns.config:
        specs = load_constraint_specs(ns.config)
        base = str(Path(ns.config).parent)
    if ns.constraints:
        specs = specs + load_constraint_specs(ns.constraints)
    validate_constraint_specs(specs)
    if not ns.data and not ns.prompts:
        raise L3MUserError("give held-out data (--data FILE|builtin:heldout) and/or prompts (--prompts FILE)")
    for m in ns.model:
        check_model_exists(m, "--model")
    heldout = load_examples(resolve_data_path(ns.data, base), need_response=True) if ns.data else None
    prompts = load_examples(resolve_data_path(ns.prompts, base), need_response=False) if ns.prompts else None
    if ns.limit:
        heldout = heldout[: ns.limit] if heldout else heldout
        prompts = prompts[: ns.limit] if prompts else prompts
    constraints = build_constraints(specs)
    results = []
    for m in ns.model:
        tok = load_tokenizer(m)
        model = load_causal_lm(m)
        results.append(
            evaluate_model(
                model,
                tok,
                constraints,
                heldout,
                prompts,
                k=ns.num_samples,
                max_new_tokens=ns.max_new_tokens,
                temperature=ns.temperature,
                batch_size=ns.batch_size,
                seed=ns.seed,
                n_boot=ns.n_boot,
                progress=not ns.quiet,
                name=ns.name if ns.name and len(ns.model) == 1 else str(m),
                warned=training_warnings(m) if Path(m).is_dir() else (),
                sampler=ns.sampler,
            )
        )
        del model
    write_outputs(results, ns.output)
    if ns.update_card:
        from l3m.model_card import update_model_card_with_evaluation

        for m, result in zip(ns.model, results):
            if not Path(m).is_dir():
                raise L3MUserError(f"--update-card: '{m}' is not a local model folder, so it has no card to update")
            card = update_model_card_with_evaluation(m, result)
            if not ns.quiet:
                print(f"held-out verdicts written into {card}")
    if not ns.quiet:
        print_rich(results)
    return results


def write_outputs(results: Sequence[dict], output: str | os.PathLike | None) -> None:
    """``OUTPUT.json`` (every number, per-example values included) and ``OUTPUT.md`` (the tables)."""
    if not output:
        return
    out = Path(output)
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.json", "w") as f:
        json.dump({"results": list(results)}, f, indent=1)
    with open(f"{stem}.md", "w") as f:
        f.write("# Held-out evaluation\n\n" + markdown_table(results))


def add_evaluate_arguments(p) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="model directory, hub name or 'default' (repeatable: one row per model)",
    )
    p.add_argument("--config", help="a run config YAML whose 'constraints:' to check (or a plain list)")
    p.add_argument("--constraints", help="a YAML/JSON list of constraint entries (added to --config's)")
    p.add_argument("--data", help="held-out task data (file, builtin:heldout): log-perplexity, and prompts to sample")
    p.add_argument("--prompts", help="prompts to sample from instead of --data's (file; responses not needed)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples/prompts")
    p.add_argument("--num-samples", "-k", type=int, default=2, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="use the training run's temperature")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sampler",
        choices=("hf", "static", "paged"),
        default="hf",
        help="what draws the samples (as the training field 'sampler'): hf, static or paged",
    )
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--name", help="the model's name in the tables (one model only)")
    p.add_argument("--output", "-o", help="write OUTPUT.json and OUTPUT.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no terminal table")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="write the verdicts into each evaluated model folder's README.md card",
    )


def paired_difference(a: list[float] | None, b: list[float] | None) -> dict | None:
    """Mean of a - b over the same references, with its standard error (a paired comparison of two models)."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return {"mean": m, "se": (var / len(d)) ** 0.5, "n": len(d)}
