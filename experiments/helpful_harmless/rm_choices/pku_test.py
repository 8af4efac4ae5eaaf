# ruff: noqa: E402
"""Does adding PKU-SafeRLHF pairs to HH-RLHF help a 7-layer head-only harmless reward model on HH's held-out pairs?

.venv/bin/python experiments/helpful_harmless/rm_choices/pku_test.py      # output: pku_test.log
"""

import random

import torch

torch.set_num_threads(1)
from l3m.preference_data import load_preference_sources
from l3m.reward_head import fit_bradley_terry_head, pooled_features
from l3m.reward_training import load_reward_backbone, prepare_pairs, reward_text

hh_tr, hh_te, _ = prepare_pairs(
    {"train": ["../shared/data/preference/harmless/hh_rlhf_harmless_base_dev.jsonl.gz"], "heldout_fraction": 0.2},
    seed=0,
)
pku = load_preference_sources(["../shared/data/preference/harmless/pku_saferlhf_realign_5k.json"]).pairs
random.Random(0).shuffle(pku)
pku = pku[:1500]
model, tok = load_reward_backbone("default", num_layers=7)


def F(pairs):
    t = [reward_text(tok, p, w) for p in pairs for w in ("chosen", "rejected")]
    f = pooled_features(model, tok, t, 256, 8, progress=False)
    return f[0::2], f[1::2]


a, b, c = F(hh_tr), F(hh_te), F(pku)
torch.save({"hh_tr": a, "hh_te": b, "pku": c}, "/tmp/rm/feats7.pt")
for name, (fc, fr, g) in {
    "hh": (a[0], a[1], [p.prompt_text for p in hh_tr]),
    "hh+pku": (torch.cat([a[0], c[0]]), torch.cat([a[1], c[1]]), [p.prompt_text for p in hh_tr + pku]),
}.items():
    w, info = fit_bradley_terry_head(fc, fr, g)
    acc = float((((b[0] - b[1]) @ w) > 0).double().mean())
    print(name, "l2", info["l2"], "train", round(info["train_accuracy"], 3), "HH held-out", round(acc, 3), flush=True)
