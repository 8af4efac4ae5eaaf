"""The model card written into saved model folders (no model is loaded)."""

import math

import pytest
from huggingface_hub import ModelCard

from l3m.model_card import (
    END,
    NOT_EVALUATED,
    START,
    build_model_card,
    read_card,
    update_model_card_with_evaluation,
    write_model_card,
)


def full_info(**over):
    info = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "data": {"train": "builtin", "eval": "builtin:heldout", "prompts": "hf:someone/prompts:train"},
        "constraints": [
            {"kind": "length", "max": 40},
            {"kind": "function", "function": "my_rewards.py:politeness", "at_least": 0.5, "name": "polite"},
        ],
        "training": {"max_steps": 16, "learning_rate": 1e-5, "num_generations": 4, "mu_init": 1.0},
        "training_estimates": [
            {
                "name": "length_max",
                "constraint": "length_max: mean tokens <= 40",
                "value": -0.39,
                "lambda": 0.08,
                "mean_raw": 28.1,
                "holds": True,
            },
            {
                "name": "polite",
                "constraint": "polite: mean value >= 0.5",
                "value": 0.12,
                "lambda": 1.7,
                "mean_raw": 0.38,
                "holds": False,
            },
        ],
        "heldout": [
            {
                "name": "length_max",
                "constraint": "length_max: mean tokens <= 40",
                "value": -0.31,
                "ci95": [-0.45, -0.17],
                "mean_raw": 29.4,
                "verdict": "holds",
                "n_prompts": 64,
                "k": 4,
            }
        ],
        "checkpoint": {"path": "runs/x/checkpoint-12", "step": 12, "reason": "all constraints hold on held-out"},
        "command": ["l3m", "train", "run.yaml", "training.max_steps=16"],
        "method": "l3m",
    }
    info.update(over)
    return info


def eval_result(verdict="violated", lo=0.02, hi=0.2):
    return {
        "model": "runs/x",
        "k": 2,
        "n_prompts": 32,
        "task_logppl": {"mean": 1.234, "std": 0.5, "n": 32, "per_example": [1.0] * 32},
        "constraints": [
            {
                "name": "polite",
                "constraint": "polite: mean value >= 0.5",
                "value": 0.11,
                "ci95": [lo, hi],
                "mean_raw": 0.39,
                "verdict": verdict,
            }
        ],
    }


def section(text, title):
    """The text of one '## ' section of a card."""
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 1)
    return text[start : nxt if nxt > 0 else len(text)]


def row(text, name):
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))


def test_full_card_loads_with_front_matter(tmp_path):
    path = write_model_card(tmp_path, full_info())
    assert path == tmp_path / "README.md"
    card = ModelCard.load(tmp_path / "README.md")
    d = card.data.to_dict()
    assert d["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert d["library_name"] == "transformers"
    assert d["pipeline_tag"] == "text-generation"
    assert d["tags"][:2] == ["l3m", "constrained-fine-tuning"]
    assert d["datasets"] == ["someone/prompts"]
    assert d["l3m"]["training"]["max_steps"] == 16
    text = card.text
    for title in ("Data", "Constraints", "Training", "Training estimates", "Held-out evaluation", "Reproduce"):
        assert f"## {title}" in text
    assert "my_rewards.py:politeness" in section(text, "Constraints")  # as the user wrote it
    assert "l3m train run.yaml training.max_steps=16" in section(text, "Reproduce")
    assert "checkpoint-12" in text and "all constraints hold on held-out" in text
    est = section(text, "Training estimates")
    assert "-0.39" in row(est, "length_max") and "holds" in row(est, "length_max")
    assert "violated" in row(est, "polite")


def test_constraint_without_heldout_is_not_shown_as_holding(tmp_path):
    write_model_card(tmp_path, full_info())
    held = section(ModelCard.load(tmp_path / "README.md").text, "Held-out evaluation")
    assert NOT_EVALUATED in row(held, "polite")
    assert "holds" not in row(held, "polite")
    assert "[-0.45, -0.17]" in row(held, "length_max") and "holds" in row(held, "length_max")


def test_no_heldout_at_all(tmp_path):
    text = build_model_card(full_info(heldout=None, checkpoint=None))
    held = section(text, "Held-out evaluation")
    assert NOT_EVALUATED in row(held, "length_max") and NOT_EVALUATED in row(held, "polite")
    assert "holds" not in held
    assert "## Checkpoint" not in text


def test_local_base_model_is_not_put_in_front_matter(tmp_path):
    write_model_card(tmp_path, full_info(base_model=str(tmp_path)))
    meta, body = read_card(tmp_path)
    assert "base_model" not in meta
    assert meta["l3m"]["base_model"] == str(tmp_path)
    assert str(tmp_path) in body


def test_minimax_method_tag(tmp_path):
    write_model_card(tmp_path, full_info(method="minimax"))
    assert "l3m-minimax" in ModelCard.load(tmp_path / "README.md").data.to_dict()["tags"]


def test_update_with_evaluation_puts_verdict_and_interval(tmp_path):
    write_model_card(tmp_path, full_info())
    update_model_card_with_evaluation(tmp_path, eval_result())
    card = ModelCard.load(tmp_path / "README.md")
    held = section(card.text, "Held-out evaluation")
    polite = row(held, "polite")
    assert "violated" in polite and "[0.02, 0.2]" in polite and "32 × 2" in polite
    # the earlier held-out result is replaced by this evaluation, which did not cover length_max
    assert NOT_EVALUATED in row(held, "length_max")
    assert "1.23" in held  # task log-perplexity
    d = card.data.to_dict()["l3m"]
    assert d["heldout"][0]["verdict"] == "violated" and d["heldout"][0]["ci95"] == [0.02, 0.2]
    assert d["evaluation"]["task_logppl"] == {"mean": 1.234, "std": 0.5, "n": 32}
    assert d["training"]["max_steps"] == 16  # the rest of the card's information is kept
    assert "my_rewards.py:politeness" in section(card.text, "Constraints")


def test_rewriting_keeps_one_copy_and_user_text(tmp_path):
    write_model_card(tmp_path, full_info())
    path = tmp_path / "README.md"
    text = path.read_text()
    text = text.replace("---\n\n", "---\n\nA note by the user.\n\n", 1) + "\nMore user text.\n"
    path.write_text(text.replace("library_name: transformers", "license: apache-2.0\nlibrary_name: transformers"))
    update_model_card_with_evaluation(tmp_path, eval_result())
    first = path.read_text()
    update_model_card_with_evaluation(tmp_path, eval_result())
    write_model_card(tmp_path, read_card(tmp_path)[0]["l3m"])
    again = path.read_text()
    assert again == first
    for title in ("## Data", "## Constraints", "## Held-out evaluation", "## Reproduce"):
        assert again.count(title) == 1
    assert again.count(START) == 1 and again.count(END) == 1
    assert again.count("A note by the user.") == 1 and again.count("More user text.") == 1
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["license"] == "apache-2.0"


def test_update_without_card_writes_a_minimal_one(tmp_path):
    update_model_card_with_evaluation(tmp_path, eval_result(verdict="holds", lo=-0.3, hi=-0.01))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers"
    polite = row(section(card.text, "Held-out evaluation"), "polite")
    assert "holds" in polite and "[-0.3, -0.01]" in polite


@pytest.mark.parametrize("value", [float("nan"), None])
def test_missing_estimates_are_not_reported_as_holding(value):
    est = dict(full_info()["training_estimates"][0], value=value, holds=None)
    text = build_model_card(full_info(training_estimates=[est], heldout=None))
    line = row(section(text, "Training estimates"), "length_max")
    assert "no estimate" in line and "holds" not in line
    if value is not None:
        assert math.isnan(value) and "nan" in line
