"""Frozen-backbone reward models: the score head fitted by Bradley-Terry logistic regression (l3m.reward_head)."""

import json

import torch
import yaml
from test_reward_training import toy_pairs

from l3m.cli import main
from l3m.reward_head import fit_bradley_terry_head, pooled_features
from l3m.reward_training import load_reward_backbone, reward_text
from l3m.rewards import RewardModel


def test_fit_recovers_a_planted_direction_and_picks_the_penalty_by_cross_validation():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 20
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    f_r = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, d)  # unequal scales
    f_c = f_r + torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, d)
    logits = (f_c - f_r) @ w_true / torch.linspace(0.1, 10, d).pow(2).sum().sqrt()
    swap = torch.rand(n, generator=g, dtype=torch.float64) > torch.sigmoid(3 * logits)  # BT-distributed labels
    f_c[swap], f_r[swap] = f_r[swap].clone(), f_c[swap].clone()
    w, info = fit_bradley_terry_head(f_c, f_r)
    assert {r["l2"] for r in info["cross_validation"]} >= {1e-3, 1e-1}
    best = max(r["cv_accuracy"] for r in info["cross_validation"])
    assert best > 0.7 and info["train_accuracy"] > 0.7
    # a fresh sample from the same model: the fitted head ranks it as the true one does
    f_r2 = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, d)
    f_c2 = f_r2 + torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, d)
    agree = (((f_c2 - f_r2) @ w > 0) == ((f_c2 - f_r2) @ w_true > 0)).double().mean()
    assert agree > 0.8


def test_pooled_features_are_what_the_head_sees(tiny_model):
    """Scores of the model equal its head applied to the pooled features: the pooling position is the model's."""
    model, tok = load_reward_backbone(str(tiny_model))
    pairs = toy_pairs(6, seed=3)
    texts = [reward_text(tok, p, "chosen") for p in pairs]
    feats = pooled_features(model, tok, texts, max_length=64, batch_size=4, progress=False)
    tok.padding_side = "right"
    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        want = model(**enc).logits[:, 0].double()
    got = feats @ model.score.weight[0].detach().double()
    assert torch.allclose(got, want, atol=1e-4)
    assert model.score.__class__ is torch.nn.Linear  # the head is put back


def test_cli_head_only_reward_model_learns_and_scores_through_reward_model(tmp_path, tiny_model):
    rows = [
        {
            "prompt": p.prompt,
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in toy_pairs(120, seed=0)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "rm"
    cfg = {
        "model": str(tiny_model),
        "data": {"train": str(data), "heldout_fraction": 0.25},
        "training": {
            "output_dir": str(out),
            "head_only": True,
            "max_length": 64,
            "use_cpu": True,
            "disable_tqdm": True,
            "per_device_train_batch_size": 16,
        },
    }
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train-reward", str(path)]) == 0
    summary = json.loads((out / "reward_eval.json").read_text())
    assert summary["head_only"] and summary["steps"] == 0 and summary["train_pairs"] == 90
    # the separable toy task: a random 2-layer backbone's features already tell the word lists apart
    assert summary["head_fit"]["train_accuracy"] >= 0.9
    assert summary["heldout"]["n_pairs"] == 30 and summary["heldout"]["accuracy"] >= 0.8
    # the saved model is a plain reward model: RewardModel scores what the fit scored
    rm = RewardModel(str(out))
    r = torch.tensor(rm([q.prompt_text for q in toy_pairs(20, 5)], [q.chosen for q in toy_pairs(20, 5)]))
    assert torch.isfinite(r).all() and r.std() > 0
