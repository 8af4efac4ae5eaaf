import json
import math
import random

import pytest
import torch
import yaml

from l3m.cli import main
from l3m.preference_data import PreferencePair
from l3m.reward_training import (
    PairCollator,
    RewardConfig,
    RewardTrainer,
    evaluate_reward_model,
    load_reward_backbone,
    reward_text,
    tokenize_pairs,
)
from l3m.rewards import RewardModel, format_for_reward

GOOD = ["sunny", "kind", "bright", "calm", "happy", "gentle"]
BAD = ["stormy", "cruel", "dark", "angry", "sad", "harsh"]


def toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """A separable preference set: the preferred response uses words from one list, the other from another."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Describe day {i} in a few words."}]
        k = rng.randint(2, 4)
        out.append(PreferencePair(prompt, " ".join(rng.choices(GOOD, k=k)), " ".join(rng.choices(BAD, k=k))))
    return out


def flipped(pairs):
    return [PreferencePair(p.prompt, p.rejected, p.chosen) for p in pairs]


def rm_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "rm"),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=40,
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        save_strategy="no",
    )
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def toy_sets(tiny_model, tmp_path_factory):
    """Train/held-out toy pairs, oriented so that the untrained reward model gets most of them wrong."""
    train, held = toy_pairs(64, seed=0), toy_pairs(32, seed=1)
    init_dir = tmp_path_factory.mktemp("rm-init") / "model"
    model, tok = load_reward_backbone(str(tiny_model))
    model.save_pretrained(init_dir)
    tok.save_pretrained(init_dir)
    acc = evaluate_reward_model(init_dir, train)["accuracy"]
    if acc > 0.5:
        train, held = flipped(train), flipped(held)
    init_acc = evaluate_reward_model(init_dir, held)["accuracy"]
    return train, held, init_acc


def test_bradley_terry_loss_falls_and_heldout_accuracy_rises(tmp_path, tiny_model, toy_sets):
    train, held, init_acc = toy_sets
    assert init_acc <= 0.6
    trainer = RewardTrainer(str(tiny_model), args=rm_args(tmp_path), train_dataset=train)
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h and "accuracy" in h]
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert first > 0.6 and last < 0.5 * first, (first, last)
    assert sum(h["accuracy"] for h in hist[-3:]) / 3 >= 0.9
    out = trainer.save_reward_model(str(tmp_path / "saved"))
    res = evaluate_reward_model(out, held)
    assert res["n_pairs"] == 32 and res["accuracy"] >= 0.9 > init_acc + 0.25, res
    assert res["ci95"][0] <= res["accuracy"] <= res["ci95"][1]


def test_trained_scores_are_what_a_reward_constraint_sees(tmp_path, tiny_model, toy_sets):
    """The trainer scores format_for_reward's text; the saved model, through RewardModel, gives the same rewards."""
    from l3m.constraints import SampleBatch, build_constraints

    train, held, _ = toy_sets
    trainer = RewardTrainer(str(tiny_model), args=rm_args(tmp_path, max_steps=3), train_dataset=train)
    trainer.train()
    tok = trainer.processing_class
    assert reward_text(tok, held[0], "chosen") == format_for_reward(tok, held[0].prompt_text, held[0].chosen)
    feats, dropped = tokenize_pairs(tok, held[:4], max_length=512)
    assert dropped == 0
    batch = PairCollator(tok.pad_token_id)(feats)
    model = trainer.model.eval()
    with torch.no_grad():
        r_c, r_r = trainer._rewards(model, batch)
    out = trainer.save_reward_model(str(tmp_path / "saved"))
    rm = RewardModel(out)
    got_c = rm([p.prompt_text for p in held[:4]], [p.chosen for p in held[:4]])
    got_r = rm([p.prompt_text for p in held[:4]], [p.rejected for p in held[:4]])
    assert torch.allclose(torch.tensor(got_c), r_c, atol=1e-4) and torch.allclose(torch.tensor(got_r), r_r, atol=1e-4)
    (con,) = build_constraints([{"kind": "reward", "model": out, "at_least": 0.0, "name": "toy"}])
    sb = SampleBatch(
        prompts=[held[0].prompt_text] * 2,
        completions=[held[0].chosen, held[0].rejected],
        completion_ids=[[1], [1]],
        lengths=torch.tensor([1, 1]),
        group_ids=torch.tensor([0, 0]),
    )
    raw = con.raw(sb, {})
    assert torch.allclose(raw, torch.tensor([got_c[0], got_r[0]]), atol=1e-5)


def test_lora_reward_model_is_merged_on_save(tmp_path, tiny_model, toy_sets):
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    train, held, _ = toy_sets
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear")
    trainer = RewardTrainer(
        str(tiny_model),
        args=rm_args(tmp_path, max_steps=10, learning_rate=1e-2),
        train_dataset=train,
        peft_config=lora,
    )
    trainer.train()
    tok = trainer.processing_class
    batch = PairCollator(tok.pad_token_id)(tokenize_pairs(tok, held[:4], 512)[0])
    with torch.no_grad():
        r_c, _ = trainer._rewards(trainer.model.eval(), batch)
    out = trainer.save_reward_model(str(tmp_path / "merged"))
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    got = RewardModel(out)([p.prompt_text for p in held[:4]], [p.chosen for p in held[:4]])
    assert torch.allclose(torch.tensor(got), r_c, atol=1e-4)
    base, _ = load_reward_backbone(str(tiny_model))
    with torch.no_grad():
        r0, _ = trainer._rewards(base.eval(), batch)
    assert not torch.allclose(r0, r_c, atol=1e-3)  # the adapters (and the score head) did change the rewards


def test_cli_train_reward_on_trl_conversational_rows(tmp_path, tiny_model, toy_sets):
    train, held, _ = toy_sets
    rows = [
        {
            "prompt": p.prompt,
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in train + held
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {
        "model": str(tiny_model),
        "data": {"train": str(data), "heldout_fraction": 0.25},
        "training": {
            "output_dir": str(tmp_path / "rm"),
            "max_steps": 30,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "use_cpu": True,
            "disable_tqdm": True,
        },
    }
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train-reward", str(path)]) == 0
    summary = json.loads((tmp_path / "rm" / "reward_eval.json").read_text())
    assert summary["heldout"]["n_pairs"] == 24 and summary["train_pairs"] == 72
    assert summary["heldout"]["accuracy"] >= 0.8
    assert (tmp_path / "rm" / "model.safetensors").is_file() and (tmp_path / "rm" / "tokenizer_config.json").is_file()

    # `l3m evaluate-reward` scores the saved model on new pairs
    new = tmp_path / "new_pairs.json"  # TRL's plain format this time, with one tie
    plain = [{"prompt": p.prompt[0]["content"], "chosen": p.chosen, "rejected": p.rejected} for p in held]
    new.write_text(json.dumps(plain + [{"prompt": "a", "chosen": "same", "rejected": "same"}]))
    out = tmp_path / "acc.json"
    assert main(["evaluate-reward", str(tmp_path / "rm"), str(new), "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_pairs"] == len(held) and "dropped 1 ties" in res["read"] and res["max_length"] == 1024
    from l3m.preference_data import load_preference_pairs

    direct = evaluate_reward_model(str(tmp_path / "rm"), load_preference_pairs(str(new)).pairs)
    assert res["accuracy"] == direct["accuracy"] >= 0.8 and res["ci95"] == direct["ci95"]
    assert (
        main(["evaluate-reward", str(tmp_path / "rm"), str(new), "--limit", "10", "--max-length", "40", "-o", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n_pairs"] == 10 and res["max_length"] == 40


def test_cli_train_reward_config_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    assert main(["evaluate-reward", str(tmp_path / "no_model"), str(cfg)]) == 1
    assert "no_model" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"data": {"train": str(tmp_path / "missing.json")}}))
    assert main(["train-reward", str(cfg)]) == 1
    assert "missing.json' does not exist" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"data": {"train": str(cfg)}, "training": {"max_lenght": 3}}))
    assert main(["train-reward", str(cfg)]) == 1
    assert "did you mean 'max_length'" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"data": {"train": str(cfg), "heldout_seed": 0.5}}))
    assert main(["train-reward", str(cfg)]) == 1
    assert "data.heldout_seed must be an integer, got 0.5" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the paper's Figure 3 (l3m.report_rewards)


def test_model_entry_turns_constraint_intervals_into_reward_intervals():
    from l3m.constraints import RewardConstraint, SampleBatch
    from l3m.evaluation import bootstrap_ci, constraint_report
    from l3m.report_rewards import model_entry

    rewards = torch.tensor([0.1, 0.5, 1.0, 1.4, -0.3, 0.2, 2.0, 0.9, 0.4, 0.6])
    table = dict(zip([f"c{i}" for i in range(10)], rewards.tolist()))
    helpful = RewardConstraint(
        lambda prompts, completions, **kw: [table[c] for c in completions], at_least=0.8, name="helpful", scale=2.0
    )
    harmless = RewardConstraint(
        lambda prompts, completions, **kw: [-table[c] for c in completions], at_most=0.0, name="harmless"
    )
    sb = SampleBatch(
        prompts=["p"] * 10,
        completions=list(table),
        completion_ids=[[1]] * 10,
        lengths=torch.ones(10, dtype=torch.long),
        group_ids=torch.arange(5).repeat_interleave(2),
    )
    ev = {
        "model": "m",
        "constraints": constraint_report([helpful, harmless], sb, k=2),
        "task_logppl": {"mean": 1.2, "std": 0.3, "n": 5},
    }
    entry = model_entry(ev, "L3M", "P1", ["helpful", "harmless"])
    assert entry["rewards"] == pytest.approx([float(rewards.mean()), -float(rewards.mean())])
    per_prompt = rewards.reshape(5, 2).mean(1)
    assert entry["rewards_ci95"][0] == pytest.approx(list(bootstrap_ci(per_prompt)), abs=1e-6)
    assert entry["rewards_ci95"][1] == pytest.approx(list(bootstrap_ci(-per_prompt)), abs=1e-6)
    assert entry["verdicts"] == [ev["constraints"][0]["verdict"], ev["constraints"][1]["verdict"]]
    assert entry["task_logppl"] == {"mean": 1.2, "std": 0.3}


def test_plot_reward_plane_writes_figure_3(tmp_path):
    import matplotlib.image

    from l3m.errors import L3MUserError
    from l3m.report_rewards import markdown_reward_table, plot_reward_plane

    points = [{"name": f"P{i}", "b": [0.5 + 0.3 * i, 0.2 + 0.2 * i]} for i in range(3)]
    models = [
        {
            "model": "SFT",
            "method": "SFT",
            "point": None,
            "rewards": [0.3, 0.1],
            "task_logppl": {"mean": 1.0, "std": 0.3},
        }
    ]
    for i, p in enumerate(points):
        for method, d in (("L3M", 0.05), ("MM", -0.1)):
            r = [p["b"][0] + d, p["b"][1] + d]
            models.append(
                {
                    "model": f"{method}@{p['name']}",
                    "method": method,
                    "point": p["name"],
                    "rewards": r,
                    "rewards_ci95": [[r[0] - 0.1, r[0] + 0.1], [r[1] - 0.1, r[1] + 0.1]],
                    "verdicts": ["holds", "undecided"],
                    "task_logppl": {"mean": 1.0 + 0.1 * i, "std": 0.2},
                }
            )
    # one model over seeds whose mean lies an ulp outside its range (the initial model: one evaluation, every seed)
    r = [math.nextafter(0.2, 0.0), math.nextafter(-0.1, 0.0)]
    models.append(
        {"model": "initial", "method": "initial", "point": None, "rewards": r}
        | {"rewards_range": [[0.2, 0.2], [-0.1, -0.1]]}
    )
    results = {"axes": ["helpful", "harmless"], "points": points, "models": models}
    out = plot_reward_plane(results, tmp_path / "fig" / "figure3.png")
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 500 and img.shape[1] > 1200
    assert len({tuple(px) for px in img[::7, ::7, :3].reshape(-1, 3).round(2).tolist()}) > 20  # not a blank canvas
    table = markdown_reward_table(results)
    assert table.count("\n") == 2 + len(models) and "MM@P2" in table and "→ holds" in table
    with pytest.raises(L3MUserError, match="unknown point"):
        plot_reward_plane({**results, "models": [{**models[1], "point": "P9"}]}, tmp_path / "x.png")

    # `l3m report --eval results.json` recognises a reward experiment's results and draws Figure 3 in the page
    res_file = tmp_path / "results.json"
    res_file.write_text(json.dumps(results))
    assert main(["report", "--eval", str(res_file), "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "![reward plane](reward_plane.png)" in page and "MM@P2" in page
    assert (tmp_path / "rep" / "reward_plane.png").stat().st_size > 10_000


@pytest.mark.slow
def test_helpful_harmless_experiment_smoke_seeds_and_resume(tmp_path, tiny_model):
    """experiments/helpful_harmless/run.py --smoke over two seeds, with the tiny model as policy and RM backbone:
    the splits, the points from the SFT models' selection rewards, one row per model over seeds, and a second
    run that reuses everything it can and redoes what a changed point changes."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import SHARED_DATA

    if not (SHARED_DATA / "preference").is_dir():
        pytest.skip(f"shared preference data not found at {SHARED_DATA}")
    script = Path(__file__).resolve().parents[1] / "experiments" / "helpful_harmless" / "run.py"
    results, runs = tmp_path / "results", tmp_path / "runs"
    run_cmd = [sys.executable, str(script), "--smoke", "--seeds", "0", "1", "--model", str(tiny_model)]
    run_cmd += ["--rm-model", str(tiny_model), "--results", str(results), "--runs", str(runs)]
    run_cmd += ["--set", "max_prompt_length=200", "--sft-steps", "3", "--mm", "multiplier_lr=0.5"]
    proc = subprocess.run(run_cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((results / "results.json").read_text())
    assert [m["model"] for m in res["models"]] == ["initial", "SFT", "L3M@P1", "MM@P1"]
    l3m_row = res["models"][2]
    assert l3m_row["seeds"] == [0, 1] and set(l3m_row["verdicts_per_seed"]) == {"0", "1"}
    assert l3m_row["minus_mm"]["n"] == 2 and l3m_row["minus_sft"]["ci95"] is not None
    # the points sit above the SFT models' mean rewards on the selection prompts, in reward standard deviations
    sel = [json.loads((results / "evals" / "selection" / f"seed{s}" / "sft.json").read_text()) for s in (0, 1)]
    assert all(e["split"] == "selection" for e in sel)
    for i, a in enumerate(res["axes"]):
        mean = sum(next(c["mean_raw"] for c in e["evaluation"]["constraints"] if c["name"] == a) for e in sel) / 2
        assert res["points"][0]["b"][i] == pytest.approx(mean + 0.25 * res["reward_models"][a]["scale"], abs=1e-3)
    # every model is scored on the test prompts, with its samples saved
    test_ev = json.loads((results / "evals" / "test" / "seed1" / "mm_P1.json").read_text())
    assert test_ev["split"] == "test" and test_ev["b"] == res["points"][0]["b"]
    assert len(test_ev["evaluation"]["samples"]) == 2 * test_ev["evaluation"]["n_prompts"]
    splits = json.loads((results / "splits.json").read_text())
    task = {n: set(v) for n, v in splits["task"].items()}
    assert not (task["train"] & task["test"] or task["selection"] & task["test"] or task["train"] & task["selection"])
    assert len(set(splits["prompt_sha256"].values())) == 3
    # the configs: per seed; the MM starts from (and is held to) its own seed's SFT model; --set and --mm reach them
    l3m = yaml.safe_load((results / "configs" / "seed1" / "l3m_P1.yaml").read_text())
    mm = yaml.safe_load((results / "configs" / "seed1" / "mm_P1.yaml").read_text())
    sft_cfg = yaml.safe_load((results / "configs" / "seed1" / "sft.yaml").read_text())
    assert mm["model"] == mm["training"]["ref_model"] == sft_cfg["training"]["output_dir"]
    assert mm["method"] == "minimax" and "method" not in l3m and l3m["training"]["seed"] == 1
    assert l3m["training"]["max_prompt_length"] == sft_cfg["training"]["max_prompt_length"] == 200
    assert mm["training"]["multiplier_lr"] == 0.5 and "multiplier_lr" not in l3m["training"]
    assert sft_cfg["training"]["max_steps"] == 3 and l3m["training"]["max_steps"] == 2
    assert {c["name"]: Path(c["model"]).name for c in l3m["constraints"]}["harmless"] == "rm_harmless_ft"
    assert (results / "figure3.png").stat().st_size > 10_000 and "L3M@P1" in (results / "results.md").read_text()
    # a second run with other points: reward models, SFT models and their evaluations are kept, the rest redone
    stages = json.loads((results / "stages.json").read_text())
    earlier = {"points": [{"name": "P1", "b": [-9.0, -9.0], "delta_in_std": [0.25, 0.25]}]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    proc = subprocess.run([*run_cmd, "--points-from", str(tmp_path / "earlier.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((results / "stages.json").read_text())
    assert all(again[k] == stages[k] for k in ("rm_helpful", "rm_harmless_ft", "seed0/sft", "seed1/sft"))
    assert again["seed0/l3m_P1"]["process_wall_s"] != stages["seed0/l3m_P1"]["process_wall_s"]
    res = json.loads((results / "results.json").read_text())
    assert res["points"] == earlier["points"]
    assert json.loads((results / "evals" / "test" / "seed0" / "l3m_P1.json").read_text())["b"] == [-9.0, -9.0]
    assert all(v == ["holds", "holds"] for v in res["models"][2]["verdicts_per_seed"].values())


def test_long_pairs_keep_their_ends_or_are_dropped(tiny_model):
    """max_length cuts a long pair's texts to their last tokens (as RewardModel scores them), or drops the pair."""
    from l3m.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    prefix = "Tell me everything about the weather today, please. " * 20
    long = PreferencePair([{"role": "user", "content": prefix}], "sunny and calm", "stormy and cruel")
    short = toy_pairs(1, seed=3)[0]
    full = {w: tok(reward_text(tok, long, w), add_special_tokens=False)["input_ids"] for w in ("chosen", "rejected")}
    n = 64
    assert min(len(v) for v in full.values()) > n
    feats, dropped = tokenize_pairs(tok, [long, short], max_length=n, long_pairs="truncate")
    assert dropped == 0 and len(feats) == 2
    assert feats[0]["chosen_input_ids"] == full["chosen"][-n:]
    assert feats[0]["rejected_input_ids"] == full["rejected"][-n:]
    feats, dropped = tokenize_pairs(tok, [long, short], max_length=n, long_pairs="drop")
    assert dropped == 1 and [f["index"] for f in feats] == [1]
    # a pair whose responses differ only before the kept ends cannot be learned from: dropped either way
    same_end = PreferencePair(long.prompt, "no. " + "the same ending. " * 30, "yes. " + "the same ending. " * 30)
    assert tokenize_pairs(tok, [same_end], max_length=n, long_pairs="truncate")[1] == 1
    with pytest.raises(ValueError, match="long_pairs"):
        RewardConfig(output_dir="x", long_pairs="cut")
