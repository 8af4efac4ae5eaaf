import json
import math

import pytest
import torch
import yaml

from l3m.cli import main
from l3m.constraints import LengthConstraint, SampleBatch
from l3m.errors import L3MUserError
from l3m.evaluation import (
    MODEL_COLUMNS,
    bootstrap_ci,
    constraint_report,
    length_stats,
    load_constraint_specs,
    markdown_table,
    training_warnings,
    verdict,
)
from l3m.quality import quality_stats


def test_verdict_from_interval():
    assert verdict(-3.0, -0.1) == "holds"
    assert verdict(-3.0, 0.0) == "holds"  # at or below 0
    assert verdict(0.0, 2.0) == "violated"
    assert verdict(0.5, 2.0) == "violated"
    assert verdict(-0.1, 0.1) == "undecided"


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_more_prompts():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(20, generator=g) + 5
    big = torch.randn(2000, generator=g) + 5
    lo_s, hi_s = bootstrap_ci(small)
    lo_b, hi_b = bootstrap_ci(big)
    assert lo_s < float(small.mean()) < hi_s
    assert lo_b < 5 < hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 10x narrower for 100x more prompts
    # about 2 * 1.96 / sqrt(n) for unit variance
    assert abs((hi_b - lo_b) - 2 * 1.96 / math.sqrt(2000)) < 0.03
    assert bootstrap_ci(torch.tensor([3.0])) == (3.0, 3.0)


def _samples(lengths_per_prompt) -> tuple[SampleBatch, int]:
    k = len(lengths_per_prompt[0])
    lengths = [n for row in lengths_per_prompt for n in row]
    batch = SampleBatch(
        prompts=["p"] * len(lengths),
        completions=["x"] * len(lengths),
        completion_ids=[[1] * n for n in lengths],
        lengths=torch.tensor(lengths),
        group_ids=torch.arange(len(lengths_per_prompt)).repeat_interleave(k),
    )
    return batch, k


def test_constraint_report_verdicts_on_known_lengths():
    # 50 prompts x 2 samples; per-prompt means 18..22, overall mean exactly 20
    rows = [[18 + (i % 5) - 1, 18 + (i % 5) + 1] for i in range(50)]
    cons = [LengthConstraint(30, "max"), LengthConstraint(25, "min"), LengthConstraint(20, "max", name="edge")]
    rep = {r["name"]: r for r in constraint_report(cons, *_samples(rows))}
    assert rep["length_max"]["verdict"] == "holds" and rep["length_max"]["value"] == pytest.approx(-10)
    assert rep["length_min"]["verdict"] == "violated" and rep["length_min"]["mean_raw"] == pytest.approx(20)
    assert rep["edge"]["verdict"] == "undecided"  # the mean is exactly on the bound: the interval straddles 0
    assert rep["length_max"]["threshold"] == 30 and rep["length_max"]["direction"] == "at_most"


def test_length_stats():
    s = length_stats([1, 2, 3, 4, 64], max_new_tokens=64)
    assert s["n"] == 5 and s["min"] == 1 and s["max"] == 64 and s["median"] == 3
    assert s["mean"] == pytest.approx(74 / 5) and s["clipped_ratio"] == pytest.approx(0.2)


def test_constraint_specs_from_run_config_list_and_json(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "x", "constraints": [{"kind": "length", "max": 5e1}]}))
    assert load_constraint_specs(cfg) == [{"kind": "length", "max": 50.0}]
    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"kind": "length", "min": 3}]))
    assert load_constraint_specs(js) == [{"kind": "length", "min": 3}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\n")
    with pytest.raises(L3MUserError, match="constraints"):
        load_constraint_specs(bad)


def test_training_warnings_read_from_summary(tmp_path):
    assert training_warnings(tmp_path) == []
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {"constraints": [{"name": "a", "warned_infeasible": True}, {"name": "b", "warned_infeasible": False}]}
        )
    )
    assert training_warnings(tmp_path) == ["a"]


def test_evaluate_cli_end_to_end_on_a_tiny_model(tmp_path, talking_model, counting_rows, capsys):
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows[:6]))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": "x",
                "constraints": [
                    {"kind": "length", "min": 0, "max": 1000},
                    {"kind": "length", "min": 500, "name": "long"},
                ],
            }
        )
    )
    (talking_model / "summary.json").write_text(
        json.dumps({"constraints": [{"name": "long", "warned_infeasible": True}]})
    )
    try:
        rc = main(
            [
                "evaluate",
                "--model",
                str(talking_model),
                "--config",
                str(cfg),
                "--data",
                str(data),
                "-k",
                "3",
                "--max-new-tokens",
                "16",
                "--name",
                "tiny",
                "-o",
                str(tmp_path / "ev"),
                "--n-boot",
                "200",
            ]
        )
    finally:
        (talking_model / "summary.json").unlink()
    assert rc == 0
    res = json.loads((tmp_path / "ev.json").read_text())["results"][0]
    assert res["model"] == "tiny" and res["n_prompts"] == 6 and res["k"] == 3
    assert res["task_logppl"]["n"] == 6 and len(res["task_logppl"]["per_example"]) == 6
    assert res["task_logppl"]["mean"] > 0 and res["task_logppl"]["std"] >= 0
    assert len(res["lengths"]["values"]) == 18 and 0 <= res["lengths"]["mean"] <= 16
    assert [x["length"] for x in res["samples"]] == res["lengths"]["values"] and res["quality"]["n"] == 18
    verdicts = {c["name"]: c["verdict"] for c in res["constraints"]}
    assert verdicts == {"length_min": "holds", "length_max": "holds", "long": "violated"}
    flagged = {c["name"] for c in res["constraints"] if c["warned_infeasible_in_training"]}
    assert flagged == {"long"} and res["warnings"]
    md = (tmp_path / "ev.md").read_text()
    assert "| tiny |" in md and "**violated** ⚠ warned infeasible" in md and "**holds**" in md
    assert "| cut off (95% CI) | repetition | distinct-2 |" in md
    out = capsys.readouterr().out
    assert "held-out evaluation" in out and "violated" in out


def test_evaluate_cli_user_errors(tmp_path, capsys):
    assert (
        main(
            ["evaluate", "--model", "default", "--constraints", str(tmp_path / "no.yaml"), "--data", "builtin:heldout"]
        )
        == 1
    )
    assert "constraints file" in capsys.readouterr().err
    bad = tmp_path / "c.yaml"
    bad.write_text("- {kind: lenght, max: 3}\n")
    assert main(["evaluate", "--model", "default", "--constraints", str(bad), "--data", "builtin:heldout"]) == 1
    assert "did you mean 'length'" in capsys.readouterr().err
    assert main(["evaluate", "--model", "default"]) == 1
    assert "--data" in capsys.readouterr().err


def test_markdown_table_lists_every_model_and_constraint():
    ids = [[9], [4, 5], [1, 2, 3], [7, 7, 7, 7], [1, 2, 3, 4, 5], [7] * 6]  # lengths 1-6; the last repeats a 4-gram
    res = [
        {
            "model": "m1",
            "k": 2,
            "n_prompts": 3,
            "task_logppl": {"n": 3, "mean": 1.0, "std": 0.1},
            "lengths": length_stats([len(x) for x in ids], 64),
            "quality": quality_stats(ids, [False] * 4 + [True] * 2, n_boot=200, k=2),
            "constraints": [
                {
                    "constraint": "length_max: mean length (tokens) <= 5",
                    "value": -1.5,
                    "ci95": [-2.0, -1.0],
                    "mean_raw": 3.5,
                    "verdict": "holds",
                }
            ],
        }
    ]
    md = markdown_table(res)
    assert "1.000 ± 0.100" in md and "3.5 ± 1.9" in md and "**holds**" in md and "3 × 2" in md
    # median 3.5 tokens; 2 of 6 cut off; 1 of 6 repeats a 4-gram 3 times; 5 distinct bigrams of 15
    assert "| 4 | 33% [" in md and "| 17% | 0.33 |" in md


def test_task_logppl_is_the_mean_nll_per_response_token(talking_model, counting_rows):
    """Each example's log-perplexity is its mean NLL over its response tokens (end token included, prompt tokens
    never), computed here from the model's logits one example at a time: batching and padding change nothing."""
    from l3m.data import load_examples, tokenize_examples
    from l3m.evaluation import task_logppl
    from l3m.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(str(talking_model)), load_causal_lm(str(talking_model))
    examples = load_examples(counting_rows[:6])
    got = task_logppl(model, tok, examples, batch_size=4, progress=False)
    want = []
    with torch.no_grad():
        for f in tokenize_examples(tok, examples, max_length=512):
            ids = torch.tensor([f["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
            mask = torch.tensor(f["response_mask"][1:], dtype=torch.bool)
            assert mask.sum() > 1 and not mask[: len(f["prompt_ids"]) - 1].any()
            want.append(float(nll[mask].mean()))
    assert got.shape == (6,) and torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)
    assert len(set(got.tolist())) == 6  # one number per example, not a batch mean
    assert torch.allclose(got, task_logppl(model, tok, examples, batch_size=1, progress=False), atol=1e-5)


def test_evaluate_model_quality_is_that_of_its_samples(talking_model, counting_rows):
    """evaluate_model's "quality" numbers are l3m.quality.quality_stats of the samples it returns, and the Markdown
    table shows them in its cut-off and repetition columns."""
    from l3m.data import load_examples
    from l3m.evaluation import evaluate_model
    from l3m.logprobs import eos_token_ids
    from l3m.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(str(talking_model)), load_causal_lm(str(talking_model))
    examples = load_examples(counting_rows[::3])  # 1, 4, ..., 22 repetitions of "go"
    k, cap = 3, 12
    res = evaluate_model(
        model, tok, [], prompts=examples, k=k, max_new_tokens=cap, n_boot=300, seed=0, progress=False, name="tiny"
    )
    q, samples = res["quality"], res["samples"]
    assert {"median_length", "truncated_share", "truncated_ci", "repetition_rate", "distinct_2"} <= set(q)
    assert len(samples) == len(examples) * k == q["n"]
    assert [s["prompt"] for s in samples] == [e.prompt_text for e in examples for _ in range(k)]
    # each sample: its ids without the end token, its length, and cut off exactly when it ran to the cap
    eos = set(eos_token_ids(model, tok))
    for s in samples:
        assert len(s["completion_ids"]) == s["length"] <= cap and not eos & set(s["completion_ids"]), (s, eos)
        assert s["truncated"] == (s["length"] == cap)
        assert tok.decode(s["completion_ids"], skip_special_tokens=True) == s["completion"]
    assert res["lengths"]["values"] == [s["length"] for s in samples]
    # recomputed from the samples alone: the same numbers, the interval resampling prompts (k per prompt)
    again = quality_stats(
        [s["completion_ids"] for s in samples], [s["truncated"] for s in samples], n_boot=300, seed=0, k=k
    )
    assert again == q
    cut = [s["truncated"] for s in samples]
    assert q["truncated_share"] == sum(cut) / len(cut) and 0 < q["truncated_share"] < 1  # some end, some are cut
    assert q["truncated_ci"][0] <= q["truncated_share"] <= q["truncated_ci"][1]
    assert q["truncated_ci"][0] < q["truncated_ci"][1]  # a real interval: prompts differ in their cut-off share
    assert q["median_length"] == res["lengths"]["median"]
    assert 0 < q["repetition_rate"] < 1 and 0 < q["distinct_2"] < 1  # "go go go ..." repeats itself

    # the table: one column per number, each cell formatted from the quality numbers
    header, rule, row = markdown_table([res]).splitlines()[:3]
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    assert cells(header) == list(MODEL_COLUMNS)
    assert {"median length", "cut off (95% CI)", "repetition", "distinct-2"} <= set(MODEL_COLUMNS)
    got = dict(zip(MODEL_COLUMNS, cells(row)))
    lo, hi = q["truncated_ci"]
    assert got["model"] == "tiny" and got["prompts × k"] == f"{len(examples)} × {k}"
    assert got["cut off (95% CI)"] == f"{100 * q['truncated_share']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    assert got["repetition"] == f"{100 * q['repetition_rate']:.0f}%"
    assert got["distinct-2"] == f"{q['distinct_2']:.2f}" and got["median length"] == f"{q['median_length']:.0f}"
