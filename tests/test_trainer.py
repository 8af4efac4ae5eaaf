import json

import pytest
import torch
import yaml
from helpers import tiny_args

from l3m import L3MTrainer, LengthConstraint
from l3m.cli import main
from l3m.data import load_examples, pad
from l3m.logprobs import response_logprobs
from l3m.sampling import sample_examples

METRIC_KEYS = {
    "step",
    "mu",
    "loss",
    "task_nll",
    "barrier",
    "objective",
    "sample/mean_length",
    "sample/clipped_ratio",
    "time/generation_s",
    "constraints/length_max/value",
    "constraints/length_max/lambda",
    "constraints/length_max/mean_raw",
    "constraints/length_max/holds",
}


def test_response_logprobs_match_a_plain_forward(tmp_path, tiny_model, counting_rows):
    trainer = L3MTrainer(str(tiny_model), args=tiny_args(tmp_path), train_dataset=counting_rows)
    model = trainer.model.eval()
    feats = [trainer.train_dataset[i] for i in (0, 5, 23)]
    ids = pad([f["input_ids"] for f in feats], 0)
    mask = pad([f["response_mask"] for f in feats], 0)
    attn = pad([[1] * len(f["input_ids"]) for f in feats], 0)
    short = pad([f["prompt_ids"] + [11, 12, 13] for f in feats[:2]], 0)
    short_mask = pad([[0] * len(f["prompt_ids"]) + [1, 1, 1] for f in feats[:2]], 0)
    short_attn = pad([[1] * (len(f["prompt_ids"]) + 3) for f in feats[:2]], 0)
    with torch.no_grad():
        groups = [(ids, mask, attn), (short, short_mask, short_attn)]
        got = response_logprobs(model, groups, trainer.processing_class.pad_token_id)
        for k, (i, m, a) in enumerate([(ids, mask, attn)] * 3 + [(short, short_mask, short_attn)] * 2):
            r = k if k < 3 else k - 3
            n = int(a[r].sum())
            logits = model(input_ids=i[r : r + 1, :n]).logits[0, :-1].log_softmax(-1)
            want = logits.gather(-1, i[r, 1:n].unsqueeze(-1)).squeeze(-1)[m[r, 1:n].bool()]
            assert torch.allclose(got[k].sum(), want.sum(), atol=1e-4), k


def test_cli_train_tiny_config_writes_loadable_checkpoint_and_metrics(tmp_path, tiny_model, counting_rows):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))
    cfg = {
        "model": str(tiny_model),
        "data": {"train": str(data)},
        "constraints": [{"kind": "length", "max": 6}],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 20,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_new_tokens": 8,
            "save_steps": 10,
            "use_cpu": True,
            "disable_tqdm": True,
            "learning_rate": 1e-3,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    for d in (run, run / "checkpoint-20", run / "checkpoint-10"):
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.num_hidden_layers == 2
        assert (d / "model.safetensors").is_file()
    state = json.loads((run / "checkpoint-20" / "l3m_state.json").read_text())
    assert state["global_step"] == 20 and "length_max" in state["constraints"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 20
    assert METRIC_KEYS <= set(steps[0]), METRIC_KEYS - set(steps[0])
    assert all(x["objective"] == pytest.approx(x["task_nll"] + x["barrier"]) for x in steps)
    assert all(0 <= x["sample/clipped_ratio"] <= 1 for x in steps)
    mus = [x["mu"] for x in steps]
    assert mus[0] == 1.0 and mus[-1] == pytest.approx(0.01) and all(a > b for a, b in zip(mus, mus[1:]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["constraints"][0]["name"] == "length_max" and summary["steps"] == 20
    final = json.loads((run / "l3m_state.json").read_text())
    assert final["global_step"] == 20
    assert final["constraints"]["length_max"]["value"] == pytest.approx(steps[-1]["constraints/length_max/value"])


def mean_length(model_dir, rows, k=4, n=24):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    s = sample_examples(model, tok, load_examples(rows[:n]), k=k, max_new_tokens=40, progress=False, seed=1)
    return float(s.lengths.float().mean())


def test_length_constraint_pulls_mean_below_limit_and_lambda_falls(tmp_path, talking_model, counting_rows):
    before = mean_length(talking_model, counting_rows)
    limit = round(0.5 * before)
    assert limit >= 2, f"the SFT'd tiny model's mean length is {before}: too short for the test"
    args = tiny_args(
        tmp_path,
        max_steps=30,
        per_device_train_batch_size=8,
        num_generations=4,
        max_new_tokens=24,
        learning_rate=2e-3,
        logging_steps=1,
    )
    trainer = L3MTrainer(
        str(talking_model),
        args=args,
        train_dataset=counting_rows * 4,
        constraints=[LengthConstraint(limit, "max", scale=4)],
    )
    trainer.train()
    hist = [h for h in trainer.state.log_history if "sample/mean_length" in h]
    lengths = [h["sample/mean_length"] for h in hist]
    lams = [h["constraints/length_max/lambda"] for h in hist]
    assert lengths[0] > limit  # it starts infeasible
    first_ok = next(i for i, h in enumerate(hist) if h["constraints/length_max/holds"] == 1.0)
    assert first_ok <= 10, f"the constraint took {first_ok} steps to hold: {lengths}"
    # lambda is large (1/(m mu)) while the constraint is violated and falls back once it holds
    held = [lam for lam, h in zip(lams, hist) if h["constraints/length_max/holds"] == 1.0]
    violated = [lam for lam, h in zip(lams, hist) if h["constraints/length_max/holds"] == 0.0]
    assert sorted(held)[len(held) // 2] < sorted(violated)[len(violated) // 2], (lams, lengths)
    # The task data wants longer answers (mean 12.5 words), so the constrained optimum sits on the boundary:
    # from then on the mean length hovers at the limit, within the noise of 32 samples per step.
    second_half = lengths[len(lengths) // 2 :]
    assert sum(second_half) / len(second_half) <= 1.1 * limit, lengths
    trainer.save_model(str(tmp_path / "after"))
    after = mean_length(tmp_path / "after", counting_rows)
    assert after <= 1.2 * limit and after < 0.65 * before, (before, after, limit)


def test_constraint_with_wide_margin_behaves_like_sft(tmp_path, tiny_model, counting_rows):
    rows = counting_rows * 4
    sft = L3MTrainer(str(tiny_model), args=tiny_args(tmp_path / "a", max_steps=8), train_dataset=rows)
    sft.train()
    l3m = L3MTrainer(
        str(tiny_model),
        args=tiny_args(tmp_path / "b", max_steps=8),
        train_dataset=rows,
        constraints=[LengthConstraint(10_000, "max")],
    )
    l3m.train()
    a = [h["task_nll"] for h in sft.state.log_history if "task_nll" in h]
    b = [h["task_nll"] for h in l3m.state.log_history if "task_nll" in h]
    lam = [h["constraints/length_max/lambda"] for h in l3m.state.log_history if "task_nll" in h]
    assert len(a) == len(b) == 8
    assert max(lam) < 1e-3
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.01, (a, b)
    pa = torch.cat([p.detach().flatten() for p in sft.model.parameters()])
    pb = torch.cat([p.detach().flatten() for p in l3m.model.parameters()])
    p0 = torch.cat(
        [
            p.detach().flatten()
            for p in L3MTrainer(str(tiny_model), args=tiny_args(tmp_path / "c"), train_dataset=rows).model.parameters()
        ]
    )
    assert (pa - pb).norm() < 0.05 * (pa - p0).norm()  # the updates are nearly identical
