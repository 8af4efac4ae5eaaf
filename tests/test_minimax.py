import json

import pytest
import torch
from helpers import tiny_args

from l3m import L3MConfig, L3MTrainer, LengthConstraint
from l3m.constraints import leave_one_out_baseline
from l3m.errors import L3MUserError
from l3m.minimax import dual_ascent_step


def mm_args(tmp_path, **kw):
    mm = dict(method="minimax", max_new_tokens=10, beta=0.1, multiplier_lr=0.05, multiplier_init=0.5)
    return tiny_args(tmp_path, **{**mm, **kw})


def two_constraints():
    # the first is violated (mean length > 2 tokens is likely), the second holds by a wide margin
    return [LengthConstraint(2, "max", name="short", scale=4), LengthConstraint(1000, "max", name="loose", scale=10)]


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "constraints/short/lambda" in h]


def test_dual_ascent_step():
    lam = torch.tensor([0.5, 0.2, 0.0])
    c = torch.tensor([1.0, -10.0, -1.0])
    assert dual_ascent_step(lam, c, 0.1).tolist() == pytest.approx([0.6, 0.0, 0.0])
    assert dual_ascent_step(lam, c, 0.1, "log").tolist() == pytest.approx(
        [0.5 * 2.718281828**0.1, 0.2 / 2.718281828, 0]
    )


def test_config_defaults_for_minimax(tmp_path):
    assert mm_args(tmp_path).task_loss is False
    assert L3MConfig(output_dir=str(tmp_path)).task_loss is True
    assert mm_args(tmp_path, task_loss=True).task_loss is True
    with pytest.raises(ValueError, match="method"):
        mm_args(tmp_path, method="ppo")
    with pytest.raises(ValueError, match="multiplier_init > 0"):
        mm_args(tmp_path, multiplier_update="log", multiplier_init=0.0)


@pytest.mark.parametrize("update", ["projected", "log"])
def test_multipliers_follow_the_ascent_rule(tmp_path, talking_model, counting_rows, update):
    args = mm_args(tmp_path, max_steps=5, multiplier_update=update)
    trainer = L3MTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=two_constraints())
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 5
    lam = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for h in logs:
        c = torch.tensor([h["constraints/short/value"], h["constraints/loose/value"]], dtype=torch.float64)
        lam = torch.clamp(lam + 0.05 * c, min=0) if update == "projected" else lam * torch.exp(0.05 * c)
        assert [h["constraints/short/lambda"], h["constraints/loose/lambda"]] == pytest.approx(lam.tolist(), rel=1e-6)
    assert logs[0]["constraints/short/value"] > 0  # violated: its multiplier grows
    assert logs[-1]["constraints/short/lambda"] > 0.5
    if update == "projected":
        assert all(h["constraints/loose/lambda"] == 0.0 for h in logs)  # projected onto lambda >= 0
    else:
        assert 0 < logs[-1]["constraints/loose/lambda"] < 0.5
    assert trainer.l3m_state["multipliers"] == pytest.approx(lam.tolist(), rel=1e-6)
    # the barrier's numbers are replaced by the Lagrangian's; no task term by default
    assert "barrier" not in logs[0] and "mu" not in logs[0] and "task_nll" not in logs[0]
    assert {"kl", "objective", "minimax/penalty"} <= set(logs[0])


def test_multipliers_are_checkpointed_and_restored(tmp_path, talking_model, counting_rows):
    args = mm_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first = L3MTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=two_constraints())
    first.train()
    logs = step_logs(first)
    ckpt = tmp_path / "out" / "checkpoint-2"
    saved = json.loads((ckpt / "l3m_state.json").read_text())
    lam2 = [logs[1]["constraints/short/lambda"], logs[1]["constraints/loose/lambda"]]
    assert saved["multipliers"] == pytest.approx(lam2, rel=1e-9)
    assert lam2[0] != pytest.approx(0.5)  # it has moved from multiplier_init

    resumed = L3MTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=two_constraints())
    assert resumed.l3m_state["multipliers"] == [0.5, 0.5]
    resumed.train(resume_from_checkpoint=str(ckpt))
    after = [h for h in step_logs(resumed) if h["step"] > 2]
    h3 = after[0]
    assert [h["step"] for h in after] == [3, 4]
    want = max(0.0, lam2[0] + 0.05 * h3["constraints/short/value"])  # continues from the saved multiplier
    assert h3["constraints/short/lambda"] == pytest.approx(want, rel=1e-9)
    # the samples are seeded by step, so the resumed run repeats the first run's steps 3-4
    assert [h["constraints/short/lambda"] for h in after] == pytest.approx(
        [h["constraints/short/lambda"] for h in logs[2:]], rel=1e-5
    )


def _one_step_inputs(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._sample_and_weight([batch])
    inputs = trainer._prepare_inputs(batch)
    groups = [(inputs["sample_input_ids"], inputs["sample_mask"], inputs["sample_attention_mask"])]
    with torch.no_grad():
        seq_logp = torch.stack([r.sum() for r in trainer._response_logprobs(trainer.model.eval(), groups)])
    return inputs, seq_logp


def test_kl_weight_is_zero_when_policy_equals_reference(tmp_path, talking_model, counting_rows):
    trainer = L3MTrainer(
        str(talking_model), args=mm_args(tmp_path), train_dataset=counting_rows, constraints=two_constraints()
    )
    inputs, seq_logp = _one_step_inputs(trainer)
    kl_w = trainer.minimax.kl_weights(inputs, seq_logp)
    assert kl_w.abs().max() < 1e-4
    total = trainer._sample_weights(inputs, seq_logp)
    assert torch.allclose(total, inputs["sample_weights"].to(total.dtype), atol=1e-4)
    assert abs(trainer._metrics["kl"][-1]) < 1e-4


def test_kl_weights_against_a_different_reference(tmp_path, talking_model, tiny_model, counting_rows):
    """With another reference, the weights are beta * (k_j - leave-one-out mean of k), k = log pi - log pi_ref."""
    from transformers import AutoModelForCausalLM

    trainer = L3MTrainer(
        str(talking_model),
        args=mm_args(tmp_path, beta=0.3),
        train_dataset=counting_rows,
        constraints=two_constraints(),
        ref_model=str(tiny_model),
    )
    inputs, seq_logp = _one_step_inputs(trainer)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids, mask, attn = inputs["sample_input_ids"], inputs["sample_mask"], inputs["sample_attention_mask"]
    ref_logp = []
    with torch.no_grad():
        for r in range(ids.shape[0]):
            n = int(attn[r].sum())
            lp = ref(input_ids=ids[r : r + 1, :n]).logits[0, :-1].log_softmax(-1)
            tok = lp.gather(-1, ids[r, 1:n].unsqueeze(-1)).squeeze(-1)
            ref_logp.append(float(tok[mask[r, 1:n].bool()].sum()))
    k = seq_logp.double() - torch.tensor(ref_logp, dtype=torch.float64)
    want = 0.3 * (k - leave_one_out_baseline(k.unsqueeze(1), inputs["sample_group_ids"]).squeeze(1))
    got = trainer.minimax.kl_weights(inputs, seq_logp)
    assert want.abs().max() > 0.1  # the two models really differ
    assert torch.allclose(got.double(), want, atol=1e-3)


def test_lora_reference_is_the_base_model(tmp_path, talking_model, counting_rows):
    from peft import LoraConfig

    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    trainer = L3MTrainer(
        str(talking_model),
        args=mm_args(tmp_path),
        train_dataset=counting_rows,
        constraints=two_constraints(),
        peft_config=lora,
    )
    assert trainer.minimax.ref_model is None  # no copy: the adapters are switched off instead
    inputs, seq_logp = _one_step_inputs(trainer)  # LoRA's B starts at zero: policy == base model
    assert trainer.minimax.kl_weights(inputs, seq_logp).abs().max() < 1e-4


def test_minimax_needs_a_constraint(tmp_path, tiny_model, counting_rows):
    with pytest.raises(L3MUserError, match="at least one constraint"):
        L3MTrainer(str(tiny_model), args=mm_args(tmp_path), train_dataset=counting_rows)
