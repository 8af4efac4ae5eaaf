"""The ``l3m`` command line: ``train``, ``train-reward``, ``generate``, ``demo``, ``evaluate``, ``report``,
``merge``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from l3m.errors import L3MUserError, NonFiniteError

logger = logging.getLogger("l3m")


def _demo_config_path() -> Path:
    return Path(str(resources.files("l3m") / "configs" / "demo.yaml"))


# ----------------------------------------------------------------------------------------------
# train


def build_run(cfg: dict) -> dict[str, Any]:
    """Everything a run needs, from a validated config: args, model, tokenizer, data, constraints."""
    from l3m.constraints import build_constraints
    from l3m.data import load_examples, split_heldout
    from l3m.models import check_model_exists, load_causal_lm, load_tokenizer
    from l3m.runconfig import method_classes, resolve_data_path

    model_name = cfg.get("model", "default")
    config_class, trainer_class = method_classes(cfg.get("method", "l3m"))
    check_model_exists(model_name)
    training = dict(cfg.get("training") or {})
    resume = training.pop("resume_from_checkpoint", None)
    training.setdefault("output_dir", "runs/l3m")
    try:
        args = config_class(**training)
    except (ValueError, TypeError) as exc:
        raise L3MUserError(f"training: {exc}") from None
    base = cfg.get("_base_dir", ".")
    data = cfg.get("data") or {}
    train = load_examples(resolve_data_path(data["train"], base), need_response=True)
    heldout = None
    if data.get("heldout_fraction"):
        # its own seed: the held-out set stays put when training.seed changes (a seed study compares like with like)
        train, heldout = split_heldout(train, float(data["heldout_fraction"]), seed=int(data.get("heldout_seed", 0)))
    if data.get("eval") is not None:
        heldout = load_examples(resolve_data_path(data["eval"], base), need_response=True)
    prompts = None
    if data.get("prompts") is not None:
        prompts = load_examples(resolve_data_path(data["prompts"], base), need_response=False)
    constraints = build_constraints(cfg.get("constraints"), device=args.device)
    trust = bool(cfg.get("trust_remote_code", False))
    tok = load_tokenizer(model_name, trust_remote_code=trust)
    model = load_causal_lm(model_name, dtype=cfg.get("dtype"), trust_remote_code=trust)
    peft_config = None
    if cfg.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **cfg["peft"])
    return dict(
        trainer_class=trainer_class,
        args=args,
        model=model,
        tokenizer=tok,
        train=train,
        heldout=heldout,
        prompts=prompts,
        constraints=constraints,
        peft_config=peft_config,
        resume=resume,
    )


def _command(config_path: str | None, overrides: list[str]) -> str:
    """The command that reproduces a run."""
    import shlex

    return " ".join(["l3m train", shlex.quote(config_path or "CONFIG.yaml"), *map(shlex.quote, overrides)])


def _resume_hint(config_path: str | None, overrides: list[str]) -> str:
    parts = ["l3m train", config_path or "CONFIG.yaml", *[o for o in overrides if "resume_from_checkpoint" not in o]]
    return " ".join(parts + ["training.resume_from_checkpoint=true"])


def run_train(config_path: str | None, overrides: list[str], quiet: bool = False) -> dict:
    """Train from a YAML config; returns the run summary (also written to ``summary.json``)."""
    from transformers.trainer_utils import get_last_checkpoint

    from l3m.errors import ConstraintFunctionError
    from l3m.runconfig import load_run_config

    cfg = load_run_config(config_path, overrides)
    run = build_run(cfg)
    args = run["args"]
    resume = run["resume"]
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if resume is None:
            raise L3MUserError(f"training.resume_from_checkpoint: no checkpoint found in '{args.output_dir}'")
    elif resume in (False, None, "false"):
        resume = None
    trainer = run["trainer_class"](
        run["model"],
        args=args,
        train_dataset=run["train"],
        eval_dataset=run["heldout"],
        processing_class=run["tokenizer"],
        constraints=run["constraints"],
        prompt_dataset=run["prompts"],
        peft_config=run["peft_config"],
    )
    from l3m.models import DEFAULT_HUB_ID, is_default_model

    model_name = cfg.get("model", "default")
    trainer.model_card_info = {
        "base_model": DEFAULT_HUB_ID if is_default_model(model_name) else model_name,
        "method": cfg.get("method", "l3m"),
        "data": {k: v for k, v in (cfg.get("data") or {}).items() if v is not None},
        "constraints": cfg.get("constraints") or [],
        "peft": cfg.get("peft"),
        "command": _command(config_path, overrides),
    }
    try:
        trainer.train(resume_from_checkpoint=resume)
    except (NonFiniteError, ConstraintFunctionError) as exc:
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        os.makedirs(args.output_dir, exist_ok=True)
        kind = "nonfinite" if isinstance(exc, NonFiniteError) else "reward-error"
        rank = f"-rank{trainer.accelerator.process_index}" if trainer.accelerator.num_processes > 1 else ""
        dump = os.path.join(args.output_dir, f"{kind}-step-{trainer.state.global_step}{rank}.json")
        record = {
            "error": str(exc),
            "step": trainer.state.global_step,
            "last_checkpoint": last,
            "prompt": exc.prompt,
            "completion": exc.completion,
        }
        if isinstance(exc, ConstraintFunctionError):
            record.update(samples=exc.samples, traceback=exc.details)
        with open(dump, "w") as f:
            json.dump(record, f, indent=2)
        where = f"the last checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
        what = (
            "The offending prompt and response are"
            if isinstance(exc, NonFiniteError)
            else ("The samples it was scoring, and its traceback, are")
        )
        raise L3MUserError(
            f"training stopped at step {trainer.state.global_step}: {exc}. No optimiser step was taken on it; "
            f"{where}. {what} in {dump}. Fix the reward or data, then "
            + (f"resume with: {_resume_hint(config_path, overrides)}" if last else "run the same command again")
        ) from None
    except KeyboardInterrupt:
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        print(
            f"\ninterrupted; last checkpoint: {last}. Resume with: {_resume_hint(config_path, overrides)}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except Exception:
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        print(
            f"\ntraining failed; last checkpoint: {last}. Resume with: {_resume_hint(config_path, overrides)}",
            file=sys.stderr,
        )
        raise
    if getattr(trainer, "is_fsdp_enabled", False):
        # checkpoints may hold shards (SHARDED_STATE_DICT); the final model is gathered whole, so that
        # AutoModelForCausalLM.from_pretrained loads it (a sharded save is not loadable: seen on an H100)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(args.output_dir)
    summary = {
        "output_dir": args.output_dir,
        "steps": trainer.state.global_step,
        "constraints": trainer.constraint_summary(),
        "metrics_file": os.path.join(args.output_dir, "metrics.jsonl"),
        # experimental average_tail: the saved weights are the mean of those after each of the last n steps
        "weights_averaged": getattr(getattr(trainer, "tail_average", None), "count", 0),
        "selected_checkpoint": trainer.heldout.selected,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if not quiet:
            _print_summary(summary)
    summary["_trainer"] = trainer
    summary["_heldout"] = run["heldout"]
    return summary


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]model saved to[/bold] {summary['output_dir']}  (metrics: {summary['metrics_file']})")
    if summary["constraints"]:
        table = Table(title="constraints on the last training step's samples")
        for col in ("constraint", "C estimate", "lambda", "mean", "holds"):
            table.add_column(col)
        for c in summary["constraints"]:
            table.add_row(
                c["constraint"],
                f"{c['value']:.4g}",
                f"{c['lambda']:.4g}",
                f"{c['mean_raw']:.4g}",
                "yes" if c["holds"] else "NO",
            )
        console.print(table)
        for c in summary["constraints"]:
            w = c.get("infeasible_warning")
            if w:
                console.print(
                    f"[bold yellow]warning:[/bold yellow] {c['constraint']} was violated for {w['violated_steps']} "
                    f"consecutive steps by step {w['step']} (C = {w['value']:.4g}, mean {w['mean_raw']:.4g}, "
                    f"lambda = {w['lambda']:.4g}, mu = {w['mu']:.3g}): it may be infeasible for this model and "
                    "data, or need more steps"
                )


# ----------------------------------------------------------------------------------------------
# generate


def run_generate(ns: argparse.Namespace) -> None:
    from l3m.data import Example, load_examples
    from l3m.models import check_model_exists, load_causal_lm, load_tokenizer
    from l3m.sampling import sample_examples

    check_model_exists(ns.model, "--model")
    if ns.prompts_file:
        examples = load_examples(ns.prompts_file, need_response=False)
    elif ns.prompt:
        examples = [Example(prompt=[{"role": "user", "content": p}], response=None) for p in ns.prompt]
    else:
        raise L3MUserError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    tok = load_tokenizer(ns.model)
    model = load_causal_lm(ns.model)
    b = sample_examples(
        model,
        tok,
        examples,
        k=ns.num_samples,
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        seed=ns.seed,
        progress=len(examples) > 8,
        sampler=ns.sampler,
    )
    for i, comp in enumerate(b.completions):
        n, cut = int(b.lengths[i]), bool(b.truncated[i])
        if ns.json:
            print(json.dumps({"prompt": b.prompts[i], "completion": comp, "length": n, "truncated": cut}))
        else:
            print(f"### {b.prompts[i]}\n{comp}\n[{n} tokens{', cut off' if cut else ''}]\n")


# ----------------------------------------------------------------------------------------------
# demo


def run_demo(ns: argparse.Namespace) -> None:
    """Train the embedded default, then evaluate the initial and the trained model side by side on held-out data."""
    import yaml

    from l3m.constraints import build_constraints
    from l3m.evaluation import evaluate_model, print_rich, write_outputs
    from l3m.model_card import update_model_card_with_evaluation
    from l3m.models import load_causal_lm

    overrides = [f"training.output_dir={ns.output_dir}"]
    if ns.max_steps:
        overrides.append(f"training.max_steps={ns.max_steps}")
    cfg_path = str(_demo_config_path())
    print(f"l3m demo: SmolLM2-135M-Instruct on the built-in data, constrained by {cfg_path}")
    summary = run_train(cfg_path, overrides)
    trainer = summary["_trainer"]
    heldout = summary["_heldout"][: ns.eval_prompts]
    cfg = yaml.safe_load(open(cfg_path))
    cons = build_constraints(cfg["constraints"])
    args, tok = trainer.args, trainer.processing_class
    settings = dict(k=2, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0, progress=False)
    print(f"\nevaluating the initial and the trained model on {len(heldout)} held-out prompts x 2 samples ...")
    results = [
        evaluate_model(load_causal_lm(cfg["model"]), tok, cons, heldout, name="initial", **settings),
        evaluate_model(trainer.accelerator.unwrap_model(trainer.model), tok, cons, heldout, name="trained", **settings),
    ]
    write_outputs(results, os.path.join(ns.output_dir, "heldout_eval"))
    update_model_card_with_evaluation(ns.output_dir, results[1])
    first = json.loads(open(summary["metrics_file"]).readline())
    print_rich(results)
    print(f"checkpoint (loads with AutoModelForCausalLM.from_pretrained): {ns.output_dir}  (model card: README.md)")
    print(f"metrics: {summary['metrics_file']}; held-out evaluation: {ns.output_dir}/heldout_eval.md")
    print(f"mean sampled length at the first training step: {first.get('sample/mean_length', float('nan')):.1f} tokens")
    ppl0, ppl1 = (r["task_logppl"]["mean"] for r in results)
    print(f"held-out task log-perplexity: {ppl0:.3f} (initial) -> {ppl1:.3f} (trained)")
    for r in results[1]["constraints"]:
        lo, hi = r["ci95"]
        print(
            f"held-out ({len(heldout)} prompts x 2 samples): {r['constraint']}: mean {r['mean_raw']:.1f} tokens, "
            f"C = {r['value']:.3g} (95% CI {lo:.3g} .. {hi:.3g}) -> {r['verdict'].upper()}"
        )


# ----------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l3m", description="Fine-tune LLMs under average constraints (L3Ms).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config: l3m train CONFIG.yaml [key=value ...]")
    t.add_argument("config", help="YAML run config (see the README's config reference)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=10 model=./my-model")

    g = sub.add_parser("generate", help="sample responses from a model")
    g.add_argument("--model", default="default", help="hub name, local directory, or 'default'")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a data file whose prompts to use")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", default="hf", choices=["hf", "static", "paged"], help="what draws the samples")
    g.add_argument("--json", action="store_true", help="one JSON object per line")

    d = sub.add_parser("demo", help="the embedded default: SmolLM2-135M-Instruct, built-in data, a length limit")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--max-steps", type=int, default=None)
    d.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts to check the constraint on")

    mg = sub.add_parser("merge", help="merge a LoRA adapter into its base model: l3m merge ADAPTER_DIR OUT_DIR")
    mg.add_argument("adapter_dir", help="a run's output directory or checkpoint trained with a 'peft:' block")
    mg.add_argument("out_dir", help="where to write the merged model (safetensors) and its tokenizer")
    mg.add_argument("--base", default=None, help="the base model, if not the one named in adapter_config.json")
    mg.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32", "auto"], help="dtype of the result")

    w = sub.add_parser("train-reward", help="train a Bradley-Terry reward model from preference pairs")
    w.add_argument("config", help="YAML config: model, data (preference files), peft, training (see the README)")
    w.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.num_train_epochs=2")

    from l3m.reward_training import add_evaluate_reward_arguments

    er = sub.add_parser("evaluate-reward", help="pairwise accuracy of a reward model on preference files")
    add_evaluate_reward_arguments(er)

    from l3m.evaluation import add_evaluate_arguments

    e = sub.add_parser("evaluate", help="task log-perplexity and constraint verdicts on held-out data")
    add_evaluate_arguments(e)

    r = sub.add_parser("report", help="PNG plots and a Markdown page from training runs and evaluate's JSON")
    r.add_argument("runs", nargs="*", help="run directories (with metrics.jsonl)")
    r.add_argument("--eval", action="append", default=[], help="a JSON file written by `l3m evaluate -o` (repeatable)")
    r.add_argument("--output-dir", "-o", default="report", help="where to write report.md and the PNGs")
    r.add_argument("--title", default="l3m report")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-file loading and saving bars; the training bar stays
    ns = make_parser().parse_args(argv)
    try:
        if ns.command == "train":
            run_train(ns.config, ns.overrides)
        elif ns.command == "generate":
            run_generate(ns)
        elif ns.command == "demo":
            run_demo(ns)
        elif ns.command == "merge":
            from l3m.merge import merge_adapter

            out = merge_adapter(ns.adapter_dir, ns.out_dir, base=ns.base, dtype=ns.dtype)
            print(f"merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")
        elif ns.command == "train-reward":
            from l3m.reward_training import run_train_reward

            run_train_reward(ns.config, ns.overrides)
        elif ns.command == "evaluate-reward":
            from l3m.reward_training import run_evaluate_reward

            run_evaluate_reward(ns)
        elif ns.command == "evaluate":
            from l3m.evaluation import run_evaluate

            run_evaluate(ns)
        elif ns.command == "report":
            from l3m.report import run_report

            run_report(ns)
    except L3MUserError as exc:
        print(f"l3m: error: {exc}", file=sys.stderr)
        return 1
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under ``accelerate launch`` / ``torchrun``: all processes leave the process group together once the work is
    done, then exit without the interpreter's native teardown. Left to that teardown, gloo's threads sometimes abort
    a finished process ("terminate called without an active exception") on a loaded machine, even after the group
    is destroyed; the Python exit handlers (trackers' final syncs) still run first."""
    import atexit

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        logging.shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
