"""Tail averaging (``average_tail``): the saved weights are the mean of the last iterates, also after a resume."""

import pytest
import torch
from helpers import tiny_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from l3m import L3MTrainer, LengthConstraint
from l3m.averaging import AVERAGE_FILE


class RecordWeights(TrainerCallback):
    """The trainable weights after every optimiser step (registered before the averaging callback runs)."""

    def __init__(self, model):
        self.model, self.after = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = {
            n: p.detach().float().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }


def args_for(tmp_path, **kw):
    return tiny_args(tmp_path, max_steps=4, max_new_tokens=8, learning_rate=1e-2, **kw)


def test_saved_model_is_the_mean_of_the_last_iterates(tmp_path, talking_model, counting_rows):
    args = args_for(tmp_path, average_tail=0.5)
    trainer = L3MTrainer(
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
    import json

    assert json.loads((tmp_path / "out" / "l3m_state.json").read_text())["weights_averaged"] == 2


def test_resumed_run_averages_the_same_iterates(tmp_path, talking_model, counting_rows):
    kw = dict(average_tail=0.75, save_strategy="steps", save_steps=2)
    cons = lambda: [LengthConstraint(4, "max")]  # noqa: E731
    whole = L3MTrainer(
        str(talking_model), args=args_for(tmp_path, **kw), train_dataset=counting_rows, constraints=cons()
    )
    whole.train()
    want = {n: p.detach().clone() for n, p in whole.model.named_parameters()}
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert load_file(str(ckpt / AVERAGE_FILE))  # step 2 is the first averaged one (steps 2-4)
    resumed = L3MTrainer(
        str(talking_model), args=args_for(tmp_path, **kw), train_dataset=counting_rows, constraints=cons()
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.tail_average.count == 3
    for n, p in resumed.model.named_parameters():
        assert torch.allclose(p, want[n], atol=1e-5), n


def test_bad_average_tail_is_refused(tmp_path):
    with pytest.raises(ValueError, match="average_tail"):
        args_for(tmp_path, average_tail=1.5)
