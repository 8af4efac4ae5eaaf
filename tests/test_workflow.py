"""The user's workflow: held-out checks during training, the best feasible checkpoint, the model card, trackers and
a quiet console."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import tiny_args

from l3m import L3MTrainer, LengthConstraint


def _run(tmp_path, model, rows, constraints, **kw):
    args = tiny_args(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        eval_prompts=6,
        select_checkpoint="best_feasible",
        **kw,
    )
    trainer = L3MTrainer(str(model), args=args, train_dataset=rows, eval_dataset=rows[:6], constraints=constraints)
    trainer.train()
    trainer.save_model()
    return trainer


def test_best_feasible_keeps_a_checkpoint_that_holds_and_the_card_says_which(tmp_path, talking_model, counting_rows):
    from huggingface_hub import ModelCard

    trainer = _run(tmp_path, talking_model, counting_rows, [LengthConstraint(40, "max")])
    history = trainer.heldout.history
    assert [h["step"] for h in history] == [2, 4, 6]
    logged = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/constraints/length_max/value" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval/constraints/length_max/ci_low"] <= r["eval/constraints/length_max/value"] for r in evals)
    feasible = [h for h in history if h["all_hold"]]
    assert feasible, "a 40-token cap on responses of at most 12 tokens must hold"
    best = min(feasible, key=lambda h: h["eval_loss"])
    sel = trainer.heldout.selected
    assert sel["step"] == best["step"] and sel["path"].endswith(f"checkpoint-{best['step']}")
    assert Path(sel["path"]).is_dir()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "transformers" and "l3m" in card.data.tags
    assert f"checkpoint-{best['step']}" in card.text and "every constraint holds" in card.text
    assert "**holds**" in card.text  # the held-out verdict of the kept weights
    # every checkpoint carries its own card
    assert (tmp_path / "out" / "checkpoint-2" / "README.md").is_file()


def test_best_feasible_with_no_feasible_checkpoint_keeps_the_least_violation(tmp_path, talking_model, counting_rows):
    from huggingface_hub import ModelCard

    trainer = _run(tmp_path, talking_model, counting_rows, [LengthConstraint(200, "min")])
    history = trainer.heldout.history
    assert not any(h["all_hold"] for h in history)
    sel = trainer.heldout.selected
    assert sel["step"] == min(history, key=lambda h: (h["violation"], -h["step"]))["step"]
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "least violation" in text and "**violated**" in text


def test_a_constraint_never_evaluated_on_heldout_prompts_is_shown_as_such(tmp_path, tiny_model, counting_rows):
    from huggingface_hub import ModelCard

    args = tiny_args(tmp_path, max_steps=2)
    trainer = L3MTrainer(
        str(tiny_model), args=args, train_dataset=counting_rows, constraints=[LengthConstraint(5, "max")]
    )
    trainer.train()
    trainer.save_model()
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "not evaluated on held-out prompts" in text and "**holds**" not in text


def test_evaluate_writes_its_verdicts_into_the_card(tmp_path, tiny_model, counting_rows):
    from huggingface_hub import ModelCard

    from l3m.cli import main

    args = tiny_args(tmp_path, max_steps=1)
    trainer = L3MTrainer(
        str(tiny_model), args=args, train_dataset=counting_rows, constraints=[LengthConstraint(5, "max")]
    )
    trainer.train()
    trainer.save_model()
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps(counting_rows[:4]))
    cons = tmp_path / "cons.yaml"
    cons.write_text(yaml.safe_dump([{"kind": "length", "max": 5}]))
    out = str(tmp_path / "out")
    assert (
        main(["evaluate", "--model", out, "--constraints", str(cons), "--data", str(data), "--quiet", "--update-card"])
        == 0
    )
    text = ModelCard.load(Path(out) / "README.md").text
    assert "not evaluated on held-out prompts" not in text
    assert any(f"**{v}**" in text for v in ("holds", "violated", "undecided"))


def test_tensorboard_gets_the_constraint_metrics(tmp_path, tiny_model, counting_rows):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = tiny_args(tmp_path, max_steps=2, report_to="tensorboard")  # events under output_dir/runs/
    trainer = L3MTrainer(
        str(tiny_model), args=args, train_dataset=counting_rows, constraints=[LengthConstraint(5, "max")]
    )
    trainer.train()
    events = list((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("constraints/length_max/value", "constraints/length_max/lambda", "mu", "task_nll"):
        assert any(t.endswith(key) for t in tags), (key, sorted(tags))
    assert len(acc.Scalars(next(t for t in tags if t.endswith("constraints/length_max/lambda")))) == 2


def test_the_console_prints_one_compact_line_per_log_and_no_raw_dicts(tmp_path, tiny_model, counting_rows, capfd):
    from l3m.cli import main

    data = tmp_path / "train.json"
    data.write_text(json.dumps(counting_rows))
    cfg = {
        "model": str(tiny_model),
        "data": {"train": str(data)},
        "constraints": [{"kind": "length", "max": 5}],
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "num_generations": 2, "max_new_tokens": 8},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    out, err = capfd.readouterr()
    text = out + err
    assert "{'loss'" not in text and "'constraints/" not in text
    assert "pin_memory" not in text
    lines = [x for x in text.splitlines() if x.startswith("step ")]
    assert len(lines) >= 2 and "length_max:" in lines[0] and "mu " in lines[0]


def test_best_feasible_survives_a_resume(tmp_path, talking_model, counting_rows):
    """A run stopped after checkpoint-4 and resumed from it evaluates and selects exactly as the run that went
    through: the held-out history travels in the checkpoint, and each evaluation samples with a fixed seed."""
    from transformers import TrainerCallback

    class StopAt4(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    straight = _run(tmp_path / "a", talking_model, counting_rows, [LengthConstraint(8, "max")])
    args = dict(
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        eval_prompts=6,
        select_checkpoint="best_feasible",
    )
    cons = [LengthConstraint(8, "max")]
    first = L3MTrainer(
        str(talking_model),
        args=tiny_args(tmp_path / "b", **args),
        train_dataset=counting_rows,
        eval_dataset=counting_rows[:6],
        constraints=cons,
        callbacks=[StopAt4()],
    )
    first.train()
    assert first.state.global_step == 4
    cons = [LengthConstraint(8, "max")]
    resumed = L3MTrainer(
        str(talking_model),
        args=tiny_args(tmp_path / "b", **args),
        train_dataset=counting_rows,
        eval_dataset=counting_rows[:6],
        constraints=cons,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-4"))

    def values(history):
        return [(h["step"], h["all_hold"], [c["value"] for c in h["constraints"]]) for h in history]

    assert values(resumed.heldout.history) == values(straight.heldout.history)
    assert resumed.heldout.selected["step"] == straight.heldout.selected["step"]
