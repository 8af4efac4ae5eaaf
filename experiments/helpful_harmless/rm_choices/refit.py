# ruff: noqa: E402
"""Refit stored layer-probe features with stronger L2 penalties: refit.py FEATURES.pt LAYERS"""

import sys

import torch

torch.set_num_threads(1)
d = torch.load(sys.argv[1])
Ftr, Fte = d["tr"], d["te"]


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


for layer in [int(x) for x in sys.argv[2].split(",")]:
    Xtr = Ftr[:, 0, layer] - Ftr[:, 1, layer]
    Xte = Fte[:, 0, layer] - Fte[:, 1, layer]
    s = torch.cat([Ftr[:, 0, layer], Ftr[:, 1, layer]]).std(0) + 1e-6
    res = []
    for wd in (0.1, 0.3, 1, 3, 10):
        w = fit(Xtr / s, wd)
        res.append(f"{wd:g}: {((Xte / s) @ w > 0).float().mean():.3f}")
    print("layer", layer, " | ".join(res), flush=True)
