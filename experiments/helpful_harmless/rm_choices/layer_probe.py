# ruff: noqa: E402
"""Which layer of a frozen SmolLM2-135M-Instruct separates HH-RLHF harmlessness preferences best?

Run once (7 min on one CPU thread) to choose the reward models' backbone depth; output in layer_probe.log.
    .venv/bin/python experiments/helpful_harmless/rm_choices/layer_probe.py harmless 450 160
For 450 training pairs (and 150 held-out pairs, split by prompt) it takes each text's last-token hidden state after
every decoder layer (and the mean over positions of the last layer), fits a Bradley-Terry logistic regression on
the chosen-minus-rejected differences for several L2 penalties, and prints held-out accuracy per layer.
"""

import sys
import time

import torch

torch.set_num_threads(1)
from transformers import AutoModelForCausalLM

from l3m.models import load_tokenizer, resolve_model_path
from l3m.reward_training import prepare_pairs, reward_text

which = sys.argv[1]
n = int(sys.argv[2])
maxlen = int(sys.argv[3])
srcs = {
    "harmless": ["../shared/data/preference/harmless/hh_rlhf_harmless_base_dev.jsonl.gz"],
    "helpful": [
        "../shared/data/preference/helpful/pandalm_testset_v1.json",
        "../shared/data/preference/helpful/autoj_testdata_pairwise.jsonl",
    ],
    "pku": ["../shared/data/preference/harmless/pku_saferlhf_realign_5k.json"],
}[which]
train, held, info = prepare_pairs({"train": srcs, "heldout_fraction": 0.25}, seed=0)
print(info["train_read"], len(train), len(held))
tok = load_tokenizer("default")
model = AutoModelForCausalLM.from_pretrained(resolve_model_path("default")).eval()


def feats(pairs):
    out = []
    t0 = time.time()
    for p in pairs:
        row = []
        for w in ("chosen", "rejected"):
            ids = tok(reward_text(tok, p, w), add_special_tokens=False)["input_ids"][-maxlen:]  # keep the end
            with torch.inference_mode():
                hs = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            row.append(torch.stack([h[0, -1] for h in hs[1:]] + [torch.stack(hs[1:])[:, 0].mean(1)[-1]]))
        out.append(torch.stack(row))
    print(f"{len(pairs)} pairs in {time.time() - t0:.0f}s")
    return torch.stack(out)  # [N, 2, L+1, H]


import random

random.Random(0).shuffle(train)
Ftr = feats(train[:n])
Fte = feats(held[: n // 3])
torch.save({"tr": Ftr, "te": Fte}, f"/tmp/probe/{which}_{n}_{maxlen}.pt")


def fit(Xd, wd):
    w = torch.zeros(Xd.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(Xd @ w).mean() + wd * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


for layer in list(range(0, Ftr.shape[2])):
    Xtr = Ftr[:, 0, layer] - Ftr[:, 1, layer]
    Xte = Fte[:, 0, layer] - Fte[:, 1, layer]
    s = Xtr.std(0) + 1e-6
    res = []
    for wd in (1e-4, 1e-3, 1e-2, 1e-1):
        w = fit(Xtr / s, wd)
        res.append(f"wd{wd:g}: tr {((Xtr / s) @ w > 0).float().mean():.2f} te {((Xte / s) @ w > 0).float().mean():.3f}")
    print("layer", layer, " | ".join(res), flush=True)
