"""The analysis code beside the experiments: splits, the results table and the length-cost bound, checked against
answers worked out by hand. No model is loaded (the slow test at the end runs the length experiment's smoke mode)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from l3m.data import load_examples, split_by_key

LENGTH = Path(__file__).resolve().parents[1] / "experiments" / "length"
sys.path.insert(0, str(LENGTH))

import run as length_run  # noqa: E402
from length_bound import length_optimum, task_loss_excess, yardstick_gap  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the length-cost bound


def test_length_bound_matches_the_closed_form_on_two_lengths():
    """p puts half its mass on length 0 and half on 2; raising the mean to 1.5 with unit weights is a KL
    projection whose optimum is q = (1/4, 0, 3/4): excess = KL(p || q) = 0.5 log 2 + 0.5 log(2/3)."""
    lengths = torch.arange(3, dtype=torch.float64)
    p = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    excess, mean_best = task_loss_excess(p, ones, lengths, 1.5, 2.0)
    assert mean_best == pytest.approx(1.0)
    assert excess == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-9)
    assert task_loss_excess(p, ones, lengths, 0.5, 1.5)[0] == 0.0  # the optimum already lies in the range


def test_length_bound_moves_mass_to_lengths_the_data_never_has():
    """The cheapest way to raise the mean is to keep p's shape and put the rest of the mass at the longest length
    (the cap), which p never has: p = (1/2, 1/2, 0, 0) raised to mean 2 gives q = (1/6, 1/4, 0, 7/12) and an excess
    of 0.5 log 3 + 0.5 log 2. Lowering p = (0, 0, 1/2, 1/2) to mean 1 is the mirror image, with the mass at 0."""
    lengths = torch.arange(4, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    q = length_optimum(p, ones, lengths, 2.0, 3.0)
    assert q.tolist() == pytest.approx([1 / 6, 1 / 4, 0.0, 7 / 12])
    assert task_loss_excess(p, ones, lengths, 2.0, 3.0)[0] == pytest.approx(0.5 * math.log(6))
    down = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    assert length_optimum(down, ones, lengths, 0.0, 1.0).tolist() == pytest.approx([7 / 12, 0.0, 1 / 4, 1 / 6])
    assert task_loss_excess(down, ones, lengths, 0.0, 1.0)[0] == pytest.approx(0.5 * math.log(6))


def test_length_bound_uses_the_per_token_optimum_as_its_zero():
    """With weights 1/(L+1) the unconstrained optimum is q ∝ p/(L+1), shorter than p: a range around p's own
    mean costs something, a range around the optimum's mean costs nothing."""
    lengths = torch.arange(11, dtype=torch.float64)
    p = torch.zeros(11, dtype=torch.float64)
    p[[1, 9]] = 0.5
    w = 1 / (lengths + 1)
    excess, mean_best = task_loss_excess(p, w, lengths, 4.9, 5.1)  # p's own mean is 5
    assert mean_best == pytest.approx((0.25 * 1 + 0.05 * 9) / (0.25 + 0.05))
    assert excess > 1e-3
    assert task_loss_excess(p, w, lengths, mean_best - 0.1, mean_best + 0.1)[0] == 0.0


def test_yardstick_gap_is_what_stopping_with_probability_s_costs():
    """The stop-or-never yardstick at SFT's own length costs nothing; at mean length m it stops with probability
    s = (cap - m) / (cap - SFT's mean), and each reference of n scored tokens pays -log(s) / n: SFT's mean 10 and a
    cap of 60 give s = 1/2 at m = 35, so references of 1 and 4 tokens pay log 2 and log 2 / 4: 5/8 log 2 on average."""
    n = torch.tensor([1.0, 4.0], dtype=torch.float64)
    assert yardstick_gap(10.0, 10.0, n, 60) == pytest.approx(0.0)
    assert yardstick_gap(10.0, 35.0, n, 60) == pytest.approx(math.log(2) * 5 / 8)
    assert yardstick_gap(10.0, 40.0, n, 60) > yardstick_gap(10.0, 35.0, n, 60)


# ----------------------------------------------------------------------------------------------
# paired differences


def test_paired_difference_of_two_models_on_the_same_references():
    from l3m.evaluation import paired_difference

    se = math.sqrt(((0.5 - 7 / 6) ** 2 + (1 - 7 / 6) ** 2 + (2 - 7 / 6) ** 2) / 2 / 3)
    d = paired_difference([1.0, 2.0, 4.0], [0.5, 1.0, 2.0])  # differences 0.5, 1, 2: mean 7/6
    assert d["mean"] == pytest.approx(7 / 6) and d["se"] == pytest.approx(se) and d["n"] == 3
    fn = paired_difference
    assert fn([1.0], [2.0]) is None and fn(None, [1.0]) is None and fn([1.0, 2.0], [1.0]) is None


# ----------------------------------------------------------------------------------------------
# splits and configs of the length experiment


def test_length_experiment_splits_of_the_real_data():
    if not length_run.DATA.is_file():
        pytest.skip(f"the shared data set {length_run.DATA} is absent (see ../shared/data/README.md)")
    keys = [e.prompt_text for e in load_examples(length_run.DATA)]
    s = split_by_key(keys, length_run.SPLIT_SIZES, length_run.SPLIT_SEED)
    assert [len(s[n]) for n in ("train", "selection", "test")] == [800, 150, 150]
    prompts = {n: {keys[i] for i in v} for n, v in s.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["selection"]
    assert not prompts["selection"] & prompts["test"]
    assert s == split_by_key(keys, length_run.SPLIT_SIZES, length_run.SPLIT_SEED)
    committed = json.loads((LENGTH / "results" / "splits.json").read_text())  # the splits the results were made on
    assert all(s[n] == committed[n] for n in s)


def test_length_experiment_configs_differ_only_in_their_constraints():
    from l3m.constraints import build_constraints

    cfgs = {m: length_run.model_config(m, 0, "train.json", "out", "default", False) for m in length_run.MODELS[1:]}
    assert cfgs["sft"]["constraints"] is None
    for c in cfgs.values():
        assert {k: v for k, v in c.items() if k != "constraints"} == {
            k: v for k, v in cfgs["sft"].items() if k != "constraints"
        }
    long = build_constraints(cfgs["l3m_long"]["constraints"])
    assert [(c.name, c.threshold) for c in long] == [("length_min", 35), ("length_max", 50)]
    trunc = build_constraints(cfgs["l3m_long_truncated"]["constraints"])
    assert [c.name for c in trunc] == ["length_min", "length_max", "truncated"] and trunc[2].threshold == 0.05
    # no L3M setting is set by the experiment: the core's defaults
    from l3m.config import L3MConfig

    core = {"num_generations", "temperature", "mu_init", "mu_min", "constraint_ema", "baseline", "max_new_tokens"}
    assert core.isdisjoint(cfgs["l3m_short"]["training"]) and core <= {f for f in L3MConfig.__dataclass_fields__}
    # another training seed changes the seed alone
    other = length_run.model_config("l3m_short", 1, "train.json", "out", "default", False)
    assert {k: v for k, v in other["training"].items() if k != "seed"} == {
        k: v for k, v in cfgs["l3m_short"]["training"].items() if k != "seed"
    }


# ----------------------------------------------------------------------------------------------
# the results table


def _ev(model, ppl, lengths, verdicts=None, cap=10, quality=None):
    cons = [
        {"name": f"{r}_{b}", "verdict": "violated"} for r in length_run.RANGES for b in ("min", "max")
    ]  # every other range's bounds: not this model's, never in its row
    cons.append({"name": "truncated", "verdict": "violated"})
    for name, v in (verdicts or {}).items():
        next(c for c in cons if c["name"] == name)["verdict"] = v
    ev = {
        "model": model,
        "k": 2,
        "n_prompts": len(ppl),
        "max_new_tokens": cap,
        "task_logppl": {"mean": sum(ppl) / len(ppl), "std": 0.5, "per_example": ppl},
        "lengths": {"mean": sum(lengths) / len(lengths), "values": lengths},
        "constraints": cons,
    }
    if quality:
        ev["quality"] = quality
    return {"evaluation": ev, "train_s": 120.0}


def test_summary_pairs_each_model_with_the_sft_model_of_its_own_seed():
    records = {
        0: {
            "sft": _ev("sft", [1.0, 1.0, 1.0], [2, 4]),
            "l3m_short": _ev("l3m_short", [1.1, 1.2, 1.0], [4, 10], {"short_min": "holds", "short_max": "undecided"}),
        },
        1: {
            "sft": _ev("sft", [2.0, 2.0, 2.0], [2, 4]),
            "l3m_short": _ev(
                "l3m_short",
                [2.3, 2.3, 2.3],
                [6, 6],
                {"short_min": "holds", "short_max": "holds"},
                quality={"median_length": 5.5, "truncated_share": 0.25, "repetition_rate": 0.5, "distinct_2": 0.9},
            ),
        },
    }
    initial = _ev("initial", [3.0, 3.0, 3.0], [10, 10])
    initial["train_s"] = None
    rows = length_run.summarise(records, initial)
    assert list(rows) == ["initial", "sft", "l3m_short"]
    s = rows["l3m_short"]
    assert s["minus_sft_per_seed"]["0"]["mean"] == pytest.approx(0.1)
    assert s["minus_sft_per_seed"]["0"]["se"] == pytest.approx(math.sqrt(0.01 / 3))  # differences 0.1, 0.2, 0
    assert s["minus_sft_per_seed"]["1"]["mean"] == pytest.approx(0.3)
    assert s["minus_sft"]["mean"] == pytest.approx(0.2)  # the mean over seeds, its s.e. over seeds
    assert s["minus_sft"]["se"] == pytest.approx(math.sqrt(((0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 1) / math.sqrt(2))
    assert s["verdicts_per_seed"] == {
        "0": {"short_min": "holds", "short_max": "undecided"},
        "1": {"short_min": "holds", "short_max": "holds"},
    }
    # seed 0 has no quality block: median and cut-off share from its lengths (10 is the cap), the rest unknown
    assert s["median_length"] == pytest.approx((7.0 + 5.5) / 2)
    assert s["truncated_share"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["repetition_rate"] == pytest.approx(0.5) and s["distinct_2"] == pytest.approx(0.9)
    assert s["train_min"] == pytest.approx(2.0) and rows["initial"]["train_min"] is None
    # the initial model is one evaluation, compared with each seed's SFT model
    assert rows["initial"]["minus_sft_per_seed"]["0"]["mean"] == pytest.approx(2.0)
    assert rows["initial"]["minus_sft"]["mean"] == pytest.approx(1.5)
    assert rows["sft"]["minus_sft"] is None and rows["sft"]["verdicts_per_seed"] == {"0": {}, "1": {}}
    md = length_run.markdown(rows, "test", 3, 2)
    assert "| l3m_short | [3, 10] | 2 | 6.5 |" in md and "| H·U, H·H |" in md and "+0.200 ± 0.100" in md
    assert "| l3m_short | 1 | 6.0 | +0.300 ± 0.000 |" in md


def test_summary_of_one_seed_uses_the_paired_standard_error():
    records = {0: {"sft": _ev("sft", [1.0, 1.0, 1.0], [2, 4]), "l3m_long": _ev("l3m_long", [1.1, 1.2, 1.0], [9, 10])}}
    rows = length_run.summarise(records)
    assert "initial" not in rows
    d = rows["l3m_long"]["minus_sft"]
    assert d["mean"] == pytest.approx(0.1) and d["se"] == pytest.approx(math.sqrt(0.01 / 3))
    assert rows["l3m_long"]["bounds"] == ["long_min", "long_max"]
    assert length_run.own_bounds("l3m_long_truncated") == ["long_min", "long_max", "truncated"]


# ----------------------------------------------------------------------------------------------
# the whole pipeline (slow: trains the tiny test model)


@pytest.mark.slow
def test_length_experiment_smoke_run_and_resume(tmp_path, tiny_model):
    """run.py --smoke with the tiny model: every model trained, evaluated and in the table. A second call keeps the
    finished evaluations, and resumes an interrupted training from its checkpoint."""
    import shutil
    import subprocess

    if not length_run.DATA.is_file():
        pytest.skip(f"the shared data set {length_run.DATA} is absent (see ../shared/data/README.md)")
    results, runs = tmp_path / "results", tmp_path / "runs"
    cmd = [sys.executable, str(LENGTH / "run.py"), "--smoke", "--model", str(tiny_model)]
    cmd += ["--results", str(results), "--runs", str(runs), "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((results / "results.json").read_text())
    assert list(res["models"]) == length_run.MODELS
    splits = json.loads((results / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"]) and len(splits["test"]) == length_run.SMOKE["n_eval"]
    for m in length_run.MODELS[1:]:
        assert (results / "configs" / "seed0" / f"{m}.yaml").is_file()
        assert res["models"][m]["logppl"] is not None and res["models"][m]["train_min"] > 0
    assert res["models"]["l3m_long_truncated"]["verdicts_per_seed"]["0"].keys() == {"long_min", "long_max", "truncated"}
    assert all((results / f).is_file() for f in ("figure2.png", "length_histograms.png", "results.md"))

    # an interrupted training: a checkpoint after step 1 of 2, no saved model and no evaluation
    out = runs / "seed0" / "l3m_short"
    shutil.rmtree(out)
    (results / "evals" / "seed0" / "l3m_short.json").unlink()
    cfg = results / "configs" / "seed0" / "l3m_short.yaml"
    train = [sys.executable, "-m", "l3m.cli", "train", str(cfg), "training.max_steps=1"]
    train += ["training.save_strategy=steps", "training.save_steps=1"]
    done = subprocess.run(train, cwd=LENGTH.parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for f in [out / "config.json", out / "summary.json", *out.glob("*.safetensors")]:
        f.unlink()
    assert list(out.glob("checkpoint-*"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done before, kept") == len(length_run.MODELS) - 1
    assert "training l3m_short, seed 0 (resuming)" in again.stdout
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert 2 in steps and json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not list(out.glob("checkpoint-*"))  # removed once the model is saved
    assert (results / "evals" / "seed0" / "l3m_short.json").is_file()


# ----------------------------------------------------------------------------------------------
# the helpful-and-harmless experiment's rows over seeds


def _reward_ev(name, rewards, verdicts, ppl, b=(0.0, 0.0)):
    cons = [
        {"name": a, "mean_raw": r, "value": bi - r, "ci95": [bi - r - 0.1, bi - r + 0.1], "verdict": v}
        for a, r, v, bi in zip(("helpful", "harmless"), rewards, verdicts, b)
    ]
    q = {"median_length": 10.0, "truncated_share": 0.5, "repetition_rate": 0.0, "distinct_2": 0.8}
    ev = {"model": name, "constraints": cons, "lengths": {"mean": 12.0}, "quality": q}
    ev["task_logppl"] = {"mean": sum(ppl) / len(ppl), "per_example": ppl}
    return {"b": list(b), "evaluation": ev}


def test_helpful_harmless_rows_over_seeds(tmp_path):
    """Seed means and ranges of the rewards, verdicts seed by seed, and the paired differences (L3M - MM of the
    same seed, each model - SFT of the same seed) with a t-interval over seeds, from hand-made records."""
    sys.path.insert(0, str(LENGTH.parent / "helpful_harmless"))
    import summary

    ev = tmp_path / "evals" / "test"
    b = (1.0, 1.0)
    recs = {
        "initial.json": _reward_ev("initial", [0.0, 0.0], ["violated"] * 2, [3.0, 3.0]),
        "seed0/sft.json": _reward_ev("SFT", [0.5, 0.5], ["violated"] * 2, [1.0, 1.0]),
        "seed1/sft.json": _reward_ev("SFT", [0.7, 0.7], ["violated"] * 2, [2.0, 2.0]),
        "seed0/l3m_P1.json": _reward_ev("L3M@P1", [1.5, 2.0], ["holds", "holds"], [1.2, 1.4], b),
        "seed1/l3m_P1.json": _reward_ev("L3M@P1", [1.1, 1.2], ["holds", "undecided"], [2.3, 2.5], b),
        "seed0/mm_P1.json": _reward_ev("MM@P1", [1.0, 1.0], ["undecided", "holds"], [1.0, 1.2], b),
        "seed1/mm_P1.json": _reward_ev("MM@P1", [1.0, 0.5], ["undecided", "violated"], [2.0, 2.0], b),
    }
    for name, rec in recs.items():
        (ev / name).parent.mkdir(parents=True, exist_ok=True)
        (ev / name).write_text(json.dumps(rec))
    out = {"seeds": [0, 1], "axes": ["helpful", "harmless"], "points": [{"name": "P1", "b": list(b)}]}
    rows = {r["model"]: r for r in summary.summarise(tmp_path, out)["models"]}
    assert list(rows) == ["initial", "SFT", "L3M@P1", "MM@P1"]
    l3m = rows["L3M@P1"]
    assert l3m["rewards"] == pytest.approx([1.3, 1.6]) and l3m["rewards_range"] == [[1.1, 1.5], [1.2, 2.0]]
    assert l3m["verdicts_per_seed"] == {0: ["holds", "holds"], 1: ["holds", "undecided"]}
    assert l3m["seeds_meeting_point"] == 1 and rows["MM@P1"]["seeds_violating"] == 1
    # L3M - MM per seed: seed 0 (0.2 + 0.2) / 2 = 0.2, seed 1 (0.3 + 0.5) / 2 = 0.4; over seeds 0.3 +- 0.1 * 12.706
    assert l3m["minus_mm_per_seed"][0]["mean"] == pytest.approx(0.2)
    assert l3m["minus_mm"]["mean"] == pytest.approx(0.3)
    assert l3m["minus_mm"]["ci95"] == pytest.approx([0.3 - 12.706 * 0.1, 0.3 + 12.706 * 0.1])
    # the initial model is one model, paired with each seed's SFT: 3 - 1 = 2 and 3 - 2 = 1
    assert rows["initial"]["minus_sft"]["mean"] == pytest.approx(1.5) and rows["initial"]["seeds"] is None
    assert "minus_sft" not in rows["SFT"] and "minus_mm" not in rows["MM@P1"]
