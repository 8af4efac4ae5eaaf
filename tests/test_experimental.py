"""``l3m.experimental``: the barrier's relaxation point ``s = mu**barrier_s_power`` and tail averaging
(``average_tail``: the saved weights are the mean of the last iterates, also after a resume), and
``method: experimental`` in a run config."""

import json

import pytest
import torch
import yaml
from helpers import tiny_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from l3m import L3MConfig, LengthConstraint
from l3m.errors import L3MUserError
from l3m.experimental import ExperimentalL3MConfig, ExperimentalL3MTrainer
from l3m.experimental.tail_average import AVERAGE_FILE


def exp_args(tmp_path, **kw):
    """``tiny_args``'s settings in an :class:`ExperimentalL3MConfig`."""
    return tiny_args(tmp_path, config_class=ExperimentalL3MConfig, **kw)


# ------------------------------------------------------------------------------------------
# barrier_s_power


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_barrier_s_power_sets_lambda_of_a_violated_constraint(tmp_path, tiny_model, counting_rows, power):
    # a limit of 1 token: every sample of the random tiny model is longer, so the constraint is violated each step
    # and lambda = mu / s = mu**(1 - p) (m = 1): 1/mu with the paper's s = mu**2, at most 1/m = 1 with s = mu
    args = exp_args(tmp_path, max_steps=3, mu_min=0.01, barrier_s_power=power, logging_steps=1)
    trainer = ExperimentalL3MTrainer(
        str(tiny_model), args=args, train_dataset=counting_rows * 4, constraints=[LengthConstraint(1, "max")]
    )
    trainer.train()
    hist = [h for h in trainer.state.log_history if "mu" in h]
    assert [h["constraints/length_max/holds"] for h in hist] == [0.0, 0.0, 0.0]
    for h in hist:
        assert h["constraints/length_max/lambda"] == pytest.approx(h["mu"] ** (1 - power), rel=1e-5), h
    assert hist[-1]["constraints/length_max/lambda"] == pytest.approx(100.0 if power == 2 else 1.0, rel=1e-5)


def test_barrier_s_power_must_be_positive_and_is_not_an_l3m_option(tmp_path):
    assert exp_args(tmp_path).barrier_s_power == 2.0 and exp_args(tmp_path).average_tail == 0.0  # the paper's
    with pytest.raises(ValueError, match="barrier_s_power"):
        exp_args(tmp_path, barrier_s_power=0)
    for field in ("barrier_s_power", "average_tail"):
        with pytest.raises(TypeError, match=field):
            L3MConfig(output_dir=str(tmp_path), **{field: 1.0})


# ------------------------------------------------------------------------------------------
# average_tail


class RecordWeights(TrainerCallback):
    """The trainable weights after every optimiser step (registered before the averaging callback runs)."""

    def __init__(self, model):
        self.model, self.after = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = {
            n: p.detach().float().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }


def args_for(tmp_path, **kw):
    return exp_args(tmp_path, max_steps=4, max_new_tokens=8, learning_rate=1e-2, **kw)


def test_saved_model_is_the_mean_of_the_last_iterates(tmp_path, talking_model, counting_rows):
    args = args_for(tmp_path, average_tail=0.5)
    trainer = ExperimentalL3MTrainer(
        str(talking_model), args=args, train_dataset=counting_rows, constraints=[LengthConstraint(4, "max")]
    )
    rec = RecordWeights(trainer.model)
    trainer.callback_handler.callbacks.insert(0, rec)
    trainer.train()
    trainer.save_model()
    assert trainer.tail_average.count == 2  # ceil(0.5 * 4) iterates: after steps 3 and 4
    saved = AutoModelForCausalLM.from_pretrained(args.output_dir)
    want_any_differs = False
    for name, p in saved.named_parameters():
        want = (rec.after[3][name] + rec.after[4][name]) / 2
        assert torch.allclose(p.float(), want, atol=1e-6), name
        want_any_differs |= not torch.allclose(want, rec.after[4][name], atol=1e-5)
    assert want_any_differs  # the last iterate differs from the mean: the test can fail
    assert json.loads((tmp_path / "out" / "l3m_state.json").read_text())["weights_averaged"] == 2


def test_resumed_run_averages_the_same_iterates(tmp_path, talking_model, counting_rows):
    kw = dict(average_tail=0.75, save_strategy="steps", save_steps=2)
    cons = lambda: [LengthConstraint(4, "max")]  # noqa: E731
    whole = ExperimentalL3MTrainer(
        str(talking_model), args=args_for(tmp_path, **kw), train_dataset=counting_rows, constraints=cons()
    )
    whole.train()
    want = {n: p.detach().clone() for n, p in whole.model.named_parameters()}
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert load_file(str(ckpt / AVERAGE_FILE))  # step 2 is the first averaged one (steps 2-4)
    resumed = ExperimentalL3MTrainer(
        str(talking_model), args=args_for(tmp_path, **kw), train_dataset=counting_rows, constraints=cons()
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.tail_average.count == 3
    for n, p in resumed.model.named_parameters():
        assert torch.allclose(p, want[n], atol=1e-5), n


def test_bad_average_tail_is_refused(tmp_path, tiny_model, counting_rows):
    with pytest.raises(ValueError, match="average_tail"):
        args_for(tmp_path, average_tail=1.5)
    with pytest.raises(L3MUserError, match="average_tail"):  # an average is not a selected checkpoint
        ExperimentalL3MTrainer(
            str(tiny_model),
            args=args_for(
                tmp_path,
                average_tail=0.5,
                select_checkpoint="best_feasible",
                eval_strategy="steps",
                save_strategy="steps",
                eval_steps=2,
                save_steps=2,
            ),
            train_dataset=counting_rows,
            eval_dataset=counting_rows[:4],
            constraints=[LengthConstraint(4, "max")],
        )


# ------------------------------------------------------------------------------------------
# method: experimental in a run config


def test_method_experimental_in_a_run_config_trains_through_run_train(tmp_path, tiny_model, counting_rows):
    """``method: experimental`` picks ExperimentalL3MConfig / ExperimentalL3MTrainer, whose fields ``training:``
    takes; under ``method: l3m`` (the default) the same fields are refused by name."""
    from l3m.cli import run_train
    from l3m.runconfig import load_run_config

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))
    training = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_new_tokens": 8,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "learning_rate": 1e-2,
        "barrier_s_power": 1,
        "average_tail": 0.5,
    }
    cfg = {
        "model": str(tiny_model),
        "method": "experimental",
        "data": {"train": str(data)},
        "constraints": [{"kind": "length", "max": 1}],  # violated at every step by the random tiny model
        "training": training,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = run_train(str(path), [], quiet=True)
    trainer = summary["_trainer"]
    assert type(trainer) is ExperimentalL3MTrainer and type(trainer.args) is ExperimentalL3MConfig
    assert (trainer.args.barrier_s_power, trainer.args.average_tail) == (1, 0.5)
    assert summary["steps"] == 4 and summary["weights_averaged"] == 2  # ceil(0.5 * 4) iterates
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["weights_averaged"] == 2
    assert json.loads((run / "l3m_state.json").read_text())["weights_averaged"] == 2
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "loss" in x]
    assert len(steps) == 4 and all(x["constraints/length_max/holds"] == 0.0 for x in steps)
    # s = mu: a violated constraint's lambda is mu / s = 1 = 1/m at every step (1/mu with the paper's s = mu**2)
    assert [x["constraints/length_max/lambda"] for x in steps] == pytest.approx([1.0] * 4, rel=1e-5)
    assert steps[-1]["mu"] < 0.1
    assert trainer.card_info()["method"] == "experimental"
    assert AutoModelForCausalLM.from_pretrained(run).config.num_hidden_layers == 2

    cfg["method"] = "l3m"
    for field in ("barrier_s_power", "average_tail"):
        cfg["training"] = {k: v for k, v in training.items() if k in ("output_dir", field)}
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(L3MUserError, match=f"training: unknown key '{field}'"):
            load_run_config(str(path))
    cfg["method"] = "ppo"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(L3MUserError, match="method must be one of l3m, minimax, experimental, got 'ppo'"):
        load_run_config(str(path))
