"""benchmarks/speed/bench_vs_trl.py: its statistics, the switches it turns (which must change the work and not the
numbers), and the names it patches in l3m and TRL (which must exist, or the benchmark measures something else)."""

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "speed" / "bench_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_t_quantile_matches_the_tables(bench):
    assert bench.t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert bench.t_quantile(0.975, 9) == pytest.approx(2.262, abs=1e-3)
    assert bench.t_quantile(0.975, 1000) == pytest.approx(1.962, abs=1e-3)


def test_paired_ratio_is_the_geometric_mean_with_an_interval_around_it(bench):
    num, den = [2.0, 4.0, 8.0], [1.0, 1.0, 2.0]
    r = bench.paired_ratio(num, den)
    assert r["ratio"] == pytest.approx((2 * 4 * 4) ** (1 / 3))
    assert r["ci95"][0] < r["ratio"] < r["ci95"][1]
    assert (r["min"], r["max"], r["rounds"]) == (2.0, 4.0, 3)
    same = bench.paired_ratio([3.0, 6.0], [1.5, 3.0])
    assert same["ratio"] == pytest.approx(2.0) and same["ci95"] == pytest.approx([2.0, 2.0])


def test_the_parts_multiply_to_the_whole_ratio(bench):
    rng = random.Random(0)

    def rec():
        return {
            "wall_s": rng.uniform(5, 20),
            "tokens": rng.randint(100, 200),
            "phases_s": {"sampling": rng.uniform(1, 4)},
        }

    records = {s: [rec() for _ in range(12)] for s in ("l3m", "l3m_unshared", "trl_compact", "trl")}
    parts = [bench.compare(records, n, d)["step"]["ratio"] for n, d in bench.DECOMPOSITION]
    whole = bench.compare(records, "l3m", "trl")["step"]["ratio"]
    assert math.prod(parts) == pytest.approx(whole, rel=1e-12)


def test_the_names_the_benchmark_patches_exist():
    """The benchmark times and switches these; a rename would silently change what it measures."""
    trl = pytest.importorskip("trl")
    import trl.trainer.utils as trl_utils
    from trl import GRPOConfig, GRPOTrainer

    import l3m.sampling
    import l3m.trainer
    from l3m import L3MTrainer

    assert callable(trl_utils._use_triton) and callable(trl_utils.add_fused_lm_head)
    for name in ("_generate_single_turn", "_calculate_rewards", "compute_loss", "_clip_grad_norm"):
        assert callable(getattr(GRPOTrainer, name)), name
    fields = {f.name for f in __import__("dataclasses").fields(GRPOConfig)}
    assert {"shuffle_dataset", "max_completion_length", "beta"} <= fields
    assert fields & {"use_transformers_continuous_batching", "use_transformers_paged"}
    assert callable(l3m.sampling._shared_prompt_cache) and callable(l3m.trainer.evaluate_constraints)
    for name in ("sample", "_can_share_prefix", "compute_loss"):
        assert callable(getattr(L3MTrainer, name)), name
    assert trl.__version__


def test_trl_completion_only_scoring_changes_the_work_not_the_numbers(tiny_model, monkeypatch):
    """``trl_compact`` runs TRL's fused LM head over the completion positions only (its GPU path): the same
    log-probabilities and gradients as its CPU path, which projects every position."""
    pytest.importorskip("trl")
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 12))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :-5] = -100  # the completion: the last 5 positions

    def run(compact: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
        monkeypatch.setattr(trl_utils, "_use_triton", lambda dev: compact)
        out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.log_probs.detach(), grads

    (lp_full, g_full), (lp_compact, g_compact) = run(False), run(True)
    assert lp_full.abs().sum() > 0
    torch.testing.assert_close(lp_compact, lp_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_compact, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_short_run_pairs_the_same_prompts_on_both_sides(tiny_model, tmp_path):
    pytest.importorskip("trl")
    argv = ["--model", str(tiny_model), "--sides", "trl,trl_compact,l3m,l3m_unshared", "--rounds", "2"]
    argv += ["--warmup", "1", "--prompts", "2", "--k", "2", "--max-new-tokens", "4", "--out", str(tmp_path)]
    # a subprocess: the sides are spawned processes, which import the script by its path
    run = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert res["same_prompts"] and res["rounds_timed"] == 2
    assert res["sides"]["trl_compact"]["worker"]["trl_completion_only_scoring"]
    assert not res["sides"]["trl"]["worker"]["trl_completion_only_scoring"]
    assert not res["sides"]["l3m_unshared"]["worker"]["l3m_prefix_sharing"]
    d = res["decomposition"]
    assert math.prod(d["factors"]) == pytest.approx(d["whole"])
