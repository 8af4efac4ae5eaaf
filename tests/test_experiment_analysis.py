"""The analysis scripts beside the experiments: checked against answers worked out by hand."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "length"))

from length_bound import task_loss_excess  # noqa: E402


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
    of 0.5 log 3 + 0.5 log 2. Lowering p = (0, 0, 1/2, 1/2) to mean 1 is the mirror image, with the mass at length 0.
    (Until stop 26 the solver could not move mass off p's support and reported far larger bounds.)"""
    from length_bound import length_optimum

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
    from length_bound import yardstick_gap

    n = torch.tensor([1.0, 4.0], dtype=torch.float64)
    assert yardstick_gap(10.0, 10.0, n, 60) == pytest.approx(0.0)
    assert yardstick_gap(10.0, 35.0, n, 60) == pytest.approx(math.log(2) * 5 / 8)
    assert yardstick_gap(10.0, 40.0, n, 60) > yardstick_gap(10.0, 35.0, n, 60)


def test_paired_difference_of_two_models_on_the_same_references():
    from l3m.evaluation import paired_difference

    d = paired_difference([1.0, 2.0, 4.0], [0.5, 1.0, 2.0])  # differences 0.5, 1, 2: mean 7/6
    assert d["mean"] == pytest.approx(7 / 6)
    assert d["se"] == pytest.approx(math.sqrt(((0.5 - 7 / 6) ** 2 + (1 - 7 / 6) ** 2 + (2 - 7 / 6) ** 2) / 2 / 3))
    assert paired_difference([1.0], [2.0]) is None and paired_difference(None, [1.0]) is None


def test_seed_summary_pairs_each_l3m_with_the_sft_model_of_its_own_seed(tmp_path, monkeypatch):
    """Two seeds' folders: each L3M is compared with its own seed's SFT model, and the seeds are averaged."""
    import json

    import seeds

    def ev(model, ppl, length, verdicts=("holds", "holds")):
        cons = [{"name": f"short_{b}", "verdict": v} for b, v in zip(("min", "max"), verdicts)]
        cons += [{"name": "medium_min", "verdict": "violated"}]  # another range's verdict: not this model's
        return {
            "model": model,
            "range": [3, 10],
            "task_logppl": {"mean": sum(ppl) / len(ppl), "per_example": ppl},
            "lengths": {"mean": length},
            "constraints": cons,
        }

    for folder, sft, l3m, verdicts in [
        ("results", [1.0, 1.0, 1.0], [1.1, 1.2, 1.0], ("holds", "undecided")),
        ("results_seed2", [2.0, 2.0, 2.0], [2.1, 2.1, 2.1], ("holds", "violated")),
    ]:
        (tmp_path / folder).mkdir()
        evals = [ev("sft", sft, 12.0), ev("l3m_short", l3m, 9.0, verdicts)]
        (tmp_path / folder / "results.json").write_text(json.dumps({"evaluations": evals}))
    (tmp_path / "results_more").mkdir()  # seed 2's medium L3M in a folder of its own, without an SFT model
    medium = {**ev("l3m_medium", [2.2, 2.2, 2.2], 25.0), "range": [20, 30]}
    (tmp_path / "results_more" / "results.json").write_text(json.dumps({"evaluations": [medium]}))
    monkeypatch.setattr(
        seeds, "SEED_RUNS", {"results": 0, "results_seed1_short": 1, "results_seed2": 2, "results_more": 2}
    )
    for table in ("GRADIENT_OF", "SETTINGS_OF", "PROMPTS_OF"):  # the experiment's own folders: not in this test
        monkeypatch.setattr(seeds, table, {})
    out = seeds.collect(tmp_path)
    assert out["runs"][-1]["model"] == "l3m_medium" and out["runs"][-1]["ratio_to_sft"] == pytest.approx(1.1)
    out["runs"] = out["runs"][:-1]
    assert [(r["seed"], r["verdicts"]) for r in out["runs"]] == [
        (0, ["holds", "undecided"]),
        (2, ["holds", "violated"]),
    ]
    r0, r2 = out["runs"]
    assert r0["ratio_to_sft"] == pytest.approx(1.1) and r0["paired_minus_sft"] == pytest.approx(0.1)
    assert r0["paired_se"] == pytest.approx(math.sqrt(0.01 / 3))  # differences 0.1, 0.2, 0.0
    assert r2["ratio_to_sft"] == pytest.approx(1.05) and r2["paired_se"] == pytest.approx(0.0)
    s = out["summary"]["l3m_short"]
    assert s["seeds"] == [0, 2] and s["mean_ratio_to_sft"] == pytest.approx(1.075)
    assert s["se_of_mean"] == pytest.approx(math.sqrt(0.01 / 3) / 2) and s["no_verdict_violated"] is False
    assert "| l3m_short | 0, 2 |" in seeds.markdown(out)
    # an L3M trained with another gradient estimator is summarised apart, against the same seed's SFT model
    (tmp_path / "results_stop").mkdir()
    stop = ev("l3m_short", [1.05, 1.05, 1.05], 11.0, ("holds", "violated"))
    (tmp_path / "results_stop" / "results.json").write_text(json.dumps({"evaluations": [stop]}))
    monkeypatch.setitem(seeds.SEED_RUNS, "results_stop", 0)
    monkeypatch.setattr(seeds, "GRADIENT_OF", {"results_stop": "stop"})
    out = seeds.collect(tmp_path)
    assert list(out["summary"]) == ["l3m_short", "l3m_medium", "l3m_short (gradient: stop)"]
    s = out["summary"]["l3m_short (gradient: stop)"]
    assert s["seeds"] == [0] and s["mean_ratio_to_sft"] == pytest.approx(1.05) and s["no_verdict_violated"] is False
    assert out["summary"]["l3m_short"]["seeds"] == [0, 2]
    # the same estimator with more prompts per step: its own label, and paired with the 8-prompt run of its seed
    (tmp_path / "results_p16").mkdir()
    p16 = ev("l3m_short", [1.0, 1.1, 1.0], 10.0)
    (tmp_path / "results_p16" / "results.json").write_text(json.dumps({"evaluations": [p16]}))
    monkeypatch.setitem(seeds.SEED_RUNS, "results_p16", 0)
    monkeypatch.setitem(seeds.GRADIENT_OF, "results_p16", "stop")
    monkeypatch.setattr(seeds, "PROMPTS_OF", {"results_p16": 16})
    label = "l3m_short (gradient: stop; 16 prompts per step)"
    monkeypatch.setattr(seeds, "COMPARE", [(label, "l3m_short (gradient: stop)")])
    out = seeds.collect(tmp_path)
    assert list(out["summary"])[-1] == label
    (v,) = out["variants"]
    assert v["seed"] == 0 and v["paired_difference"] == pytest.approx(-0.05 + 0.1 / 3)  # 1.0, 1.1, 1.0 - 1.05
    assert f"| {label} | l3m_short (gradient: stop) | 0 |" in seeds.markdown(out)
    # a folder whose models used different estimators, and a model repeated in a second folder: counted once
    (tmp_path / "results_mixed").mkdir()
    mixed = [ev("l3m_short", [1.0, 1.0, 1.1], 9.5), {**ev("l3m_medium", [1.2, 1.2, 1.2], 22.0), "range": [20, 30]}]
    (tmp_path / "results_mixed" / "results.json").write_text(json.dumps({"evaluations": mixed}))
    (tmp_path / "results_again").mkdir()
    again = {**ev("l3m_medium", [1.2, 1.2, 1.5], 23.0), "range": [20, 30]}
    (tmp_path / "results_again" / "results.json").write_text(json.dumps({"evaluations": [again]}))
    monkeypatch.setitem(seeds.SEED_RUNS, "results_mixed", 0)
    monkeypatch.setitem(seeds.SEED_RUNS, "results_again", 0)
    monkeypatch.setitem(seeds.GRADIENT_OF, "results_mixed", {"l3m_medium": "shift"})
    monkeypatch.setitem(seeds.GRADIENT_OF, "results_again", "shift")
    out = seeds.collect(tmp_path)
    shift = [r for r in out["runs"] if r["label"] == "l3m_medium (gradient: shift)"]
    assert len(shift) == 1 and shift[0]["folder"] == "results_mixed"
    (rep,) = shift[0]["repeats"]
    assert rep["folder"] == "results_again" and rep["paired_difference"] == pytest.approx(0.1)
    assert out["summary"]["l3m_medium (gradient: shift)"]["seeds"] == [0]
    assert [r["folder"] for r in out["runs"] if r["label"] == "l3m_short" and r["seed"] == 0] == ["results"]
    assert "| results_again/ | 0 | +0.1000" in seeds.markdown(out)
    # other optimiser settings for SFT and L3M alike: the L3M against its own folder's SFT model, not the seed's
    (tmp_path / "results_beta").mkdir()
    beta = [ev("sft", [0.5, 0.5, 0.5], 12.0), ev("l3m_short", [0.6, 0.6, 0.6], 9.0)]
    (tmp_path / "results_beta" / "results.json").write_text(json.dumps({"evaluations": beta}))
    monkeypatch.setitem(seeds.SEED_RUNS, "results_beta", 0)
    monkeypatch.setattr(seeds, "SETTINGS_OF", {"results_beta": "adam_beta1 0.5"})
    out = seeds.collect(tmp_path)
    (b,) = [r for r in out["runs"] if r["folder"] == "results_beta"]
    assert b["label"] == "l3m_short (adam_beta1 0.5)" and b["sft_logppl"] == pytest.approx(0.5)
    assert b["ratio_to_sft"] == pytest.approx(1.2) and b["paired_minus_sft"] == pytest.approx(0.1)
    # ... and its SFT model is not the seed's SFT model for the other folders
    assert [r["sft_logppl"] for r in out["runs"] if r["folder"] == "results"] == [pytest.approx(1.0)]


def test_gradient_noise_moments_recover_a_known_signal_and_noise():
    """N draws g_i = mu + noise with |mu| = 2 and E|noise|^2 = 9: the unbiased estimates recover both, and the
    conservative bound on the prompts needed for signal = noise stays below the point estimate."""
    from gradient_noise import Moments

    gen = torch.Generator().manual_seed(0)
    d, n = 50, 400
    mu = torch.zeros(d, dtype=torch.float64)
    mu[:4] = 1.0  # |mu| = 2
    m = Moments()
    for _ in range(n):
        m.add(mu + 3.0 / math.sqrt(d) * torch.randn(d, generator=gen, dtype=torch.float64))
    s = m.summary(prompts_per_step=8)
    assert s["noise_sd"] == pytest.approx(3.0, rel=0.05)
    assert s["signal_norm"] == pytest.approx(2.0, rel=0.05)
    assert s["snr"] == pytest.approx(2 / 3, rel=0.1)
    assert s["prompts_for_snr_1"] == pytest.approx(8 * 9 / 4, rel=0.15)
    assert s["prompts_for_snr_1_at_least"] <= s["prompts_for_snr_1"]
    assert s["noise_share_of_sq_norm"] == pytest.approx(9 / 13, rel=0.05)


def test_gradient_parts_count_the_steps_spent_on_the_constraints():
    from gradient_parts import summarise

    rows = [{"step": i, "grad_norm": 10.0} for i in range(1, 21)]  # an SFT run: no parts
    assert summarise(rows)["1-20"] == {"steps": 20, "grad_norm_median": 10.0}
    rows = [
        {
            "step": i,
            "grad_norm": n,
            "grad_parts/task_norm": 5.0,
            "grad_parts/constraints_norm": n,
            "grad_parts/cosine": 0.0,
            "grad_parts/task_share": 5.0 / n,
        }
        for i, n in zip(range(1, 5), (5.0, 100.0, 1000.0, 10.0))
    ]
    cell = summarise(rows)["1-20"]
    assert cell["steps_task_share_below_0.1"] == 2  # 5/100 and 5/1000
    assert cell["grad_norm_median"] == pytest.approx(55.0)  # the median is not swamped by the 1000
    assert cell["task_share_mean"] == pytest.approx((1 + 0.05 + 0.005 + 0.5) / 4)


def test_stop_shift_log_odds_and_a_uniform_bias():
    """The stop log-odds of known logits, and a uniform end-token bias -d: a shift of -d at every position, and a
    'same mean shift, uniform' cost equal to the measured one."""
    from stop_shift import shift_summary, stop_log_odds

    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, -1.0]])  # vocab 4, end tokens 0 and 1
    p = torch.softmax(logits, -1)[:, :2].sum(-1)
    assert torch.allclose(stop_log_odds(logits, [0, 1]), torch.log(p / (1 - p)), atol=1e-6)
    torch.manual_seed(0)
    base = [torch.randn(n) for n in (5, 3, 8)]
    d = 2.0
    r = shift_summary(base, [b - d for b in base])
    assert r["end_shift"] == pytest.approx(-d) and r["inner_shift"] == pytest.approx(-d)
    assert r["end_shift_sd"] == pytest.approx(0.0, abs=1e-6)
    assert r["end_stop_nll"] == pytest.approx(r["end_stop_nll_uniform_shift"], rel=1e-5)
    assert sum(b["positions"] for b in r["inner_by_sft_p_stop"]) == 4 + 2 + 7
    # an uneven shift of the same mean at the ends costs more than a uniform one (the softplus is convex)
    uneven = [b.clone() for b in base]
    uneven[0][-1] -= 2 * d
    uneven[1][-1] -= d
    r = shift_summary(base, uneven)
    assert r["end_shift"] == pytest.approx(-d) and r["end_stop_nll"] > r["end_stop_nll_uniform_shift"]


def test_tied_end_token_restores_only_the_input_rows_of_the_end_tokens(tmp_path):
    """Untying keeps every output logit as trained; only the end token's input row goes back, so a text without
    that token scores exactly as before, and one with it does not."""
    import helpers
    from tied_end_token import restore_input_rows, row_change

    from l3m.models import load_causal_lm

    model = load_causal_lm(str(helpers.make_tiny_llama(tmp_path / "m")))
    w0 = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():  # "training" moved rows 2 (the end token) and 5
        model.get_input_embeddings().weight[[2, 5]] += 0.5
    change = row_change(model.get_input_embeddings().weight.detach(), w0)
    assert change[3] == 0 and change[2] > 0 and change[5] > 0
    w_trained = model.get_output_embeddings().weight.detach().clone()
    without_end, with_end = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[3, 2, 5, 6]])
    before = [model(input_ids=x).logits for x in (without_end, with_end)]
    restore_input_rows(model, w0, [2])
    assert torch.equal(model.get_output_embeddings().weight, w_trained)
    assert torch.equal(model.get_input_embeddings().weight[2], w0[2])
    assert torch.equal(model.get_input_embeddings().weight[5], w_trained[5])
    assert torch.allclose(model(input_ids=without_end).logits, before[0])
    assert not torch.allclose(model(input_ids=with_end).logits[:, 1:], before[1][:, 1:])


def test_momentum_summary_counts_constraint_steps_and_the_excursions_of_the_length():
    """30 steps: λ above 1 in steps 3, 12 and 25 (one of them in the last third); the sampled length sits at 25
    except for 5 steps at 40 (steps 15-19), whose 5-step mean leaves the range [20, 30] for steps 16-23."""
    from momentum import summarise

    rows = []
    for step in range(1, 31):
        lam = 5.0 if step in (3, 12, 25) else 0.1
        length = 40.0 if 15 <= step <= 19 else 25.0
        rows.append(
            {"step": step, "sample/mean_length": length, "constraints/a/lambda": lam, "constraints/b/lambda": 0.0}
        )
    s = summarise(rows, 20, 30)
    assert s["steps_lambda_above_1"] == 3 and s["tail_steps_lambda_above_1"] == 1
    assert s["highest_5step_mean_length_after_step_10"] == pytest.approx(40.0)
    assert s["lowest_5step_mean_length_after_step_10"] == pytest.approx(25.0)
    # 5-step means: step 15: 28, 16: 31, 17: 34, 18: 37, 19: 40, 20: 37, 21: 34, 22: 31, 23: 28 -> 16..22 outside
    assert s["steps_5step_mean_outside_range_after_step_10"] == 7
    assert s["mean_sample_length_last_third"] == pytest.approx(25.0)
