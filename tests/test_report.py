import json

import pytest
import yaml

from l3m.cli import main
from l3m.errors import L3MUserError
from l3m.evaluation import length_stats
from l3m.report import (
    against_first,
    averaged_steps,
    load_evaluations,
    make_report,
    moving_average,
    read_metrics,
)


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, talking_model, counting_rows):
    """A 6-step constrained run of the tiny model through `l3m train` (metrics.jsonl, summary.json)."""
    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))
    cfg = {
        "model": str(talking_model),
        "data": {"train": str(data)},
        "constraints": [{"kind": "length", "min": 2, "max": 6, "name": "len"}],
        "training": {
            "output_dir": str(tmp / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_new_tokens": 8,
            "save_strategy": "no",
            "use_cpu": True,
            "disable_tqdm": True,
            "learning_rate": 1e-3,
            "average_tail": 0.5,  # the saved model averages the last 3 steps: the report marks them
        },
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return tmp / "run"


def test_read_metrics_has_every_step(tiny_run):
    rows = read_metrics(tiny_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all("constraints/len_min/lambda" in r and "mu" in r for r in rows)


def _fake_eval(name, lengths, rng=None, ppl=(1.0, 0.2)):
    return {
        "model": name,
        "k": 2,
        "n_prompts": len(lengths) // 2,
        "max_new_tokens": 64,
        "range": rng,
        "task_logppl": {"n": 10, "mean": ppl[0], "std": ppl[1]},
        "lengths": {**length_stats(lengths, 64), "values": lengths},
        "constraints": [],
    }


def test_report_cli_writes_pngs_and_markdown(tiny_run, tmp_path, capsys):
    ev = tmp_path / "ev.json"
    ev.write_text(
        json.dumps(
            {
                "results": [
                    _fake_eval("sft", [10, 20, 30, 40] * 5),
                    _fake_eval("l3m", [5, 8, 9, 12] * 5, [5, 15], (1.05, 0.25)),
                ]
            }
        )
    )
    out = tmp_path / "rep"
    assert main(["report", str(tiny_run), "--eval", str(ev), "-o", str(out), "--title", "tiny"]) == 0
    for name in ("training_curves.png", "barrier.png", "lengths_perplexity.png"):
        assert _is_png(out / name), name
    md = (out / "report.md").read_text()
    assert md.startswith("# tiny")
    for name in ("training_curves.png", "barrier.png", "lengths_perplexity.png"):
        assert f"]({name})" in md
    assert md.count("*Figure") == 3  # a caption for each figure
    assert "| sft |" in md and "| l3m |" in md and "1.050 ± 0.250" in md
    assert "report written to" in capsys.readouterr().out


def test_report_compares_each_model_with_the_first_reference_by_reference(tmp_path):
    sft = _fake_eval("sft", [10, 12] * 5, ppl=(1.0, 0.5))
    l3m = _fake_eval("l3m", [20, 22] * 5, [20, 30], (1.1, 0.5))
    sft["task_logppl"]["per_example"] = [0.5, 1.5, 1.0, 1.0]
    l3m["task_logppl"]["per_example"] = [0.6, 1.7, 1.0, 1.1]  # differences 0.1, 0.2, 0, 0.1
    other = _fake_eval("other", [5, 6] * 5, ppl=(0.9, 0.5))  # no per-example scores: a ratio, no paired difference
    rows = against_first([sft, l3m, other])
    assert [r["model"] for r in rows] == ["l3m", "other"] and all(r["against"] == "sft" for r in rows)
    assert rows[0]["ratio"] == pytest.approx(1.1) and rows[0]["paired_diff"] == pytest.approx(0.1)
    assert rows[0]["paired_se"] == pytest.approx((0.02 / 3 / 4) ** 0.5)  # sample variance 0.02/3, over n = 4
    assert rows[1]["ratio"] == pytest.approx(0.9) and "paired_diff" not in rows[1]
    assert against_first([sft]) == []
    md = make_report([], [sft, l3m, other], tmp_path).read_text()
    assert "| l3m | 1.100 (+10.0%) | +0.100 ± 0.041 |" in md and "| other | 0.900 (-10.0%) | — |" in md
    assert "change against the first model" in md
    assert _is_png(tmp_path / "lengths_perplexity.png")


def test_report_without_evaluations_still_plots_training_and_barrier(tiny_run, tmp_path):
    path = make_report([tiny_run], [], tmp_path)
    assert _is_png(tmp_path / "training_curves.png") and _is_png(tmp_path / "barrier.png")
    assert not (tmp_path / "lengths_perplexity.png").exists()
    assert "Training curves" in path.read_text()


def test_report_user_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(L3MUserError, match="metrics.jsonl"):
        read_metrics(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(L3MUserError, match="not JSON"):
        load_evaluations([bad])


def _experiment():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "length" / "run.py"
    spec = importlib.util.spec_from_file_location("length_experiment", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_length_experiment_targets_logic():
    exp = _experiment()
    lo, hi = exp.RANGES["short"]

    def ev(name, mean, verdicts, ppl):
        cons = [{"name": f"{r}_{b}", "verdict": "holds"} for r in exp.RANGES for b in ("min", "max")]
        for c in cons:
            if c["name"].startswith("short_"):
                c["verdict"] = verdicts[0] if c["name"].endswith("min") else verdicts[1]
        return {"model": name, "lengths": {"mean": mean}, "task_logppl": {"mean": ppl}, "constraints": cons}

    t = exp.check_targets(
        [ev("sft", 100.0, ("holds", "holds"), 1.0), ev("l3m_short", hi - 1, ("holds", "undecided"), 1.2)]
    )
    assert t["l3m_short"]["inside"] and t["l3m_short"]["mean_inside"] and not t["l3m_short"]["certified"]
    below = exp.check_targets([ev("l3m_short", lo - 0.5, ("undecided", "holds"), 1.0)])["l3m_short"]
    assert below["inside"] and not below["mean_inside"]  # undecided, but the mean lies below l_min
    assert t["l3m_short"]["logppl_ratio_to_sft"] == pytest.approx(1.2) and not t["l3m_short"]["logppl_within_10pct"]
    assert t["sft"]["outside_at_least_two"] and "short" in t["sft"]["ranges_below"]


def test_length_experiment_data_split():
    from conftest import SHARED_DATA

    from l3m.data import load_examples, split_heldout

    exp = _experiment()
    if not exp.DATA.is_file():
        pytest.skip(f"the shared data set {exp.DATA} is absent (see ../shared/data/README.md)")
    assert exp.DATA.is_relative_to(SHARED_DATA)
    train, held = split_heldout(load_examples(exp.DATA), exp.BASE_CONFIG["data"]["heldout_fraction"], seed=0)
    assert len(held) >= exp.EVAL["n_prompts"] >= 150 and exp.EVAL["k"] >= 2
    # the data set repeats a few instructions (with other answers): 4 of the 150 held-out prompts also occur in
    # the training part (README); no (prompt, response) pair does
    seen = {e.prompt_text for e in train}
    assert sum(e.prompt_text in seen for e in held[: exp.EVAL["n_prompts"]]) <= 5
    pairs = {(e.prompt_text, e.response) for e in train}
    assert not any((e.prompt_text, e.response) in pairs for e in held)


def test_moving_average_is_the_mean_of_the_last_values():
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0, 9.0], window=5) == [2.0, 3.0, 5.0]  # fewer values at the start


def test_report_marks_the_averaged_steps(tiny_run, tmp_path):
    assert json.loads((tiny_run / "summary.json").read_text())["weights_averaged"] == 3
    assert averaged_steps(tiny_run) == 3
    assert averaged_steps(tmp_path) == 0  # no summary.json: the last iterate
    md = make_report([tiny_run], [], tmp_path / "rep").read_text()
    assert "Grey band: the last steps, whose weights the saved model averages" in md


def test_length_experiment_deals_models_to_processes_by_cost():
    """--jobs 2: the longest-running L3M gets a process of its own load class; every model runs exactly once."""
    exp = _experiment()
    models = list(exp.model_configs())
    groups = exp.split_jobs(models, 2)
    assert sorted(sum(groups, [])) == sorted(models)
    loads = [sum(exp.COST[m] for m in g) for g in groups]
    assert max(loads) - min(loads) <= min(exp.COST.values()) + 1e-9  # as even as whole models allow here
    assert "l3m_long" in groups[0]
    assert exp.split_jobs(["sft"], 4) == [["sft"]]  # never more processes than models
    assert len(exp.split_jobs(models, 1)) == 1


def test_length_experiment_gradient_option_sets_every_length_constraint():
    """run.py --gradient stop: each L3M's length constraint gets the stop-decision estimator, valid for l3m train."""
    from l3m.constraints import build_constraints

    exp = _experiment()
    for gradient in ("sequence", "stop"):
        cfgs = exp.model_configs(gradient)
        assert cfgs["sft"]["constraints"] is None
        for name in ("l3m_short", "l3m_medium", "l3m_long"):
            cons = build_constraints(cfgs[name]["constraints"])
            assert [c.gradient for c in cons] == [gradient, gradient]
    # by default each range takes its own estimator: shift where it lengthens (medium, long), sequence for short
    default = exp.model_configs()
    assert "gradient" not in default["l3m_short"]["constraints"][0]
    for name in ("l3m_medium", "l3m_long"):
        assert [c.gradient for c in build_constraints(default[name]["constraints"])] == ["shift", "shift"]
    # --gradient-min: the lower bound alone gets its own estimator, under the same constraint names
    cons = build_constraints(exp.model_configs("sequence", "shift")["l3m_medium"]["constraints"])
    assert [(c.name, c.gradient) for c in cons] == [("length_min", "shift"), ("length_max", "sequence")]
    default = build_constraints(exp.model_configs()["l3m_medium"]["constraints"])
    assert [c.name for c in cons] == [c.name for c in default]
    assert exp.model_configs("stop", "stop") == exp.model_configs("stop")


def test_eos_bias_yardstick_lowers_only_the_end_logits_and_lengthens(talking_model):
    """experiments/length/eos_bias.py: the hook shifts the end tokens' logits alone, and a large shift stops no one."""
    import importlib.util
    from pathlib import Path

    import torch

    from l3m.data import Example
    from l3m.evaluation import sample_responses
    from l3m.logprobs import eos_token_ids
    from l3m.models import load_causal_lm, load_tokenizer

    path = Path(__file__).resolve().parents[1] / "experiments" / "length" / "eos_bias.py"
    spec = importlib.util.spec_from_file_location("eos_bias", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok, model = load_tokenizer(str(talking_model)), load_causal_lm(str(talking_model))
    eos = eos_token_ids(model, tok)
    ids = torch.tensor([tok("Repeat the word 'go' 5 times.")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = mod.bias_end_tokens(model, eos, 3.0)
        shifted = model(input_ids=ids).logits
        handle.remove()
        after = model(input_ids=ids).logits
    others = [i for i in range(before.shape[-1]) if i not in eos]
    assert torch.allclose(shifted[..., eos], before[..., eos] - 3.0)
    assert torch.equal(shifted[..., others], before[..., others]) and torch.equal(after, before)
    prompts = [
        Example(prompt=[{"role": "user", "content": f"Repeat the word 'go' {n} times."}], response="") for n in (2, 3)
    ]

    def lengths(delta):
        handle = mod.bias_end_tokens(model, eos, delta)
        try:
            s = sample_responses(model, tok, prompts, k=4, max_new_tokens=12, temperature=1.0, progress=False)
        finally:
            handle.remove()
        return s.batch.lengths

    assert (lengths(0.0) < 12).any()  # the trained model ends some responses by itself
    assert (lengths(50.0) == 12).all()  # with its end tokens 50 nats down, none ends before the cap


def test_barrier_figure_draws_the_runs_barrier_when_it_is_not_the_papers(tmp_path):
    paper = make_report([], [], tmp_path / "p").read_text()
    own = make_report([], [], tmp_path / "o", barrier_s_power=1.0).read_text()
    assert "s = μ^1" not in paper and "Dashed" not in paper
    assert "s = μ^1 (`barrier_s_power`)" in own and "= 1 at every μ" in own
    # the figure itself differs: the dashed curves are drawn
    assert (tmp_path / "p" / "barrier.png").read_bytes() != (tmp_path / "o" / "barrier.png").read_bytes()
