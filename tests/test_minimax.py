import json

import pytest
import torch
from helpers import tiny_args

from l3m import L3MConfig, LengthConstraint
from l3m.constraints import leave_one_out_baseline
from l3m.errors import L3MUserError
from l3m.logprobs import response_logprobs
from l3m.minimax import MinimaxConfig, MinimaxTrainer, dual_ascent_step


def mm_args(tmp_path, **kw):
    """``tiny_args``'s settings in a :class:`MinimaxConfig`, with the baseline's knobs set for the tiny model."""
    base = dict(max_new_tokens=10, beta=0.1, multiplier_lr=0.05, multiplier_init=0.5)
    return tiny_args(tmp_path, config_class=MinimaxConfig, **{**base, **kw})


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
    defaults = MinimaxConfig(output_dir=str(tmp_path))
    assert defaults.task_loss is False and defaults.ref_model is None
    assert (defaults.beta, defaults.multiplier_lr, defaults.multiplier_init) == (0.05, 0.1, 1.0)
    assert defaults.multiplier_update == "projected"
    assert isinstance(defaults, L3MConfig)
    assert mm_args(tmp_path, task_loss=True).task_loss is True
    for field in ("task_loss", "beta", "method"):  # the minimax knobs are not the L3M's
        with pytest.raises(TypeError, match=field):
            L3MConfig(output_dir=str(tmp_path), **{field: 1})
    with pytest.raises(ValueError, match="multiplier_init > 0"):
        mm_args(tmp_path, multiplier_update="log", multiplier_init=0.0)
    with pytest.raises(ValueError, match="multiplier_update"):
        mm_args(tmp_path, multiplier_update="exp")
    with pytest.raises(ValueError, match="beta"):
        mm_args(tmp_path, beta=-0.1)


@pytest.mark.parametrize("update", ["projected", "log"])
def test_multipliers_follow_the_ascent_rule(tmp_path, talking_model, counting_rows, update):
    args = mm_args(tmp_path, max_steps=5, multiplier_update=update)
    trainer = MinimaxTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=two_constraints())
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
    first = MinimaxTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=two_constraints())
    first.train()
    logs = step_logs(first)
    ckpt = tmp_path / "out" / "checkpoint-2"
    saved = json.loads((ckpt / "l3m_state.json").read_text())
    lam2 = [logs[1]["constraints/short/lambda"], logs[1]["constraints/loose/lambda"]]
    assert saved["multipliers"] == pytest.approx(lam2, rel=1e-9)
    assert lam2[0] != pytest.approx(0.5)  # it has moved from multiplier_init

    resumed = MinimaxTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=two_constraints())
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
    trainer.sample_and_weight([batch])
    inputs = trainer._prepare_inputs(batch)
    groups = [(inputs["sample_input_ids"], inputs["sample_mask"], inputs["sample_attention_mask"])]
    pad_id, temp = trainer.processing_class.pad_token_id, [trainer.args.temperature]
    with torch.no_grad():
        seq_logp = torch.stack([r.sum() for r in response_logprobs(trainer.model.eval(), groups, pad_id, temp)])
    return inputs, seq_logp


def kl_weights(trainer, inputs, seq_logp):
    """The KL part of the samples' weights: all of them less the constraints' ``sum_i lambda_i (c_i - b_i)``."""
    return trainer.sample_weights(inputs, seq_logp) - inputs["sample_weights"].to(seq_logp.dtype)


def test_kl_weight_is_zero_when_policy_equals_reference(tmp_path, talking_model, counting_rows):
    trainer = MinimaxTrainer(
        str(talking_model), args=mm_args(tmp_path), train_dataset=counting_rows, constraints=two_constraints()
    )
    inputs, seq_logp = _one_step_inputs(trainer)
    assert inputs["sample_weights"].abs().sum() > 0  # the constraints' part of the weights
    kl_w = kl_weights(trainer, inputs, seq_logp)
    assert kl_w.abs().max() < 1e-4
    assert abs(trainer._metrics["kl"][-1]) < 1e-4


def test_kl_weights_against_a_different_reference(tmp_path, talking_model, tiny_model, counting_rows):
    """With another reference, the weights are beta * (k_j - leave-one-out mean of k), k = log pi - log pi_ref,
    both scored at the sampling temperature."""
    from transformers import AutoModelForCausalLM

    t = 0.7
    trainer = MinimaxTrainer(
        str(talking_model),
        args=mm_args(tmp_path, beta=0.3, temperature=t),
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
            lp = (ref(input_ids=ids[r : r + 1, :n]).logits[0, :-1] / t).log_softmax(-1)
            tok = lp.gather(-1, ids[r, 1:n].unsqueeze(-1)).squeeze(-1)
            ref_logp.append(float(tok[mask[r, 1:n].bool()].sum()))
    k = seq_logp.double() - torch.tensor(ref_logp, dtype=torch.float64)
    want = 0.3 * (k - leave_one_out_baseline(k.unsqueeze(1), inputs["sample_group_ids"]).squeeze(1))
    got = kl_weights(trainer, inputs, seq_logp)
    assert want.abs().max() > 0.1  # the two models really differ
    assert torch.allclose(got.double(), want, atol=1e-3)


def test_lora_reference_is_the_base_model(tmp_path, talking_model, counting_rows):
    from peft import LoraConfig

    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    trainer = MinimaxTrainer(
        str(talking_model),
        args=mm_args(tmp_path),
        train_dataset=counting_rows,
        constraints=two_constraints(),
        peft_config=lora,
    )
    assert trainer.ref_model is None  # no copy: the adapters are switched off instead
    inputs, seq_logp = _one_step_inputs(trainer)  # LoRA's B starts at zero: policy == base model
    assert kl_weights(trainer, inputs, seq_logp).abs().max() < 1e-4


def test_minimax_needs_a_constraint(tmp_path, tiny_model, counting_rows):
    with pytest.raises(L3MUserError, match="at least one constraint"):
        MinimaxTrainer(str(tiny_model), args=mm_args(tmp_path), train_dataset=counting_rows)


def test_task_loss_false_drops_the_task_term_and_needs_a_constraint(tmp_path, talking_model, counting_rows):
    """``task_loss`` (minimax only): with it the loss is the task NLL plus the samples' surrogate; without it
    (the default) the samples' surrogate alone, and with no constraint there is nothing to optimise."""
    # the talking model ends its samples at varied lengths: the samples' weights are not all zero
    kw = dict(per_device_train_batch_size=3, max_new_tokens=30, beta=0.1, multiplier_init=0.5)
    with_task = MinimaxTrainer(
        str(talking_model),
        args=mm_args(tmp_path / "a", task_loss=True, **kw),
        train_dataset=counting_rows,
        constraints=[LengthConstraint(5, "max")],
    )
    without = MinimaxTrainer(
        str(talking_model),
        args=mm_args(tmp_path / "b", **kw),
        train_dataset=counting_rows,
        constraints=[LengthConstraint(5, "max")],
    )
    batch = next(iter(with_task.get_train_dataloader()))
    with_task.sample_and_weight([batch])
    assert batch["sample_weights"].abs().sum() > 0  # the samples' term is not zero
    with_task.model.train()
    without.model.train()
    full = with_task.compute_loss(with_task.model, batch).detach()
    task_nll = with_task._metrics["task_nll"][-1]
    assert task_nll > 0.1
    alone = without.compute_loss(without.model, batch).detach()
    assert abs(float(alone)) > 0.1  # the samples' term alone
    assert "task_nll" not in without._metrics
    assert float(full - alone) == pytest.approx(task_nll, rel=1e-4)
    without.constraints = []
    with pytest.raises(L3MUserError, match="task_loss"):
        without.compute_loss(without.model, batch)
