"""Sampling is exact: one sampler for training and evaluation, drawing from the distribution it scores under."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_args

from l3m import FunctionConstraint, L3MConfig, L3MTrainer, LengthConstraint
from l3m.data import load_examples, pad, prompt_ids
from l3m.evaluation import evaluate_model
from l3m.models import load_causal_lm, load_tokenizer
from l3m.sampling import generate, generation_config, sample_examples, split_completions


def _prompts(tok, rows, n=3):
    ids = [prompt_ids(tok, ex.prompt) for ex in load_examples(rows[:n])]
    return pad(ids, tok.pad_token_id, "left"), pad([[1] * len(x) for x in ids], 0, "left")


def test_the_models_own_generation_settings_do_not_change_the_samples(talking_model, counting_rows):
    """A repetition penalty, an n-gram ban or a minimum length in the model's generation_config would change the
    distribution the samples come from, not the one they are scored under: l3m's sampler ignores them."""
    tok = load_tokenizer(str(talking_model))
    ids, mask = _prompts(tok, counting_rows)
    config = generation_config(12, 1.0, [tok.eos_token_id], tok.pad_token_id)
    outs = []
    for extra in ({}, {"repetition_penalty": 2.0, "no_repeat_ngram_size": 2, "min_new_tokens": 10}):
        model = load_causal_lm(str(talking_model))
        for key, value in extra.items():
            setattr(model.generation_config, key, value)
        torch.manual_seed(0)
        outs.append(generate(model, ids, mask, 3, config))
        if extra:  # the model's own settings are back in place afterwards
            assert model.generation_config.repetition_penalty == 2.0
    assert torch.equal(outs[0], outs[1])
    # the settings would have changed the samples had generate used them: the check above can fail
    model = load_causal_lm(str(talking_model))
    torch.manual_seed(0)
    penalised = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=config, repetition_penalty=2.0, num_return_sequences=3
    )[:, ids.shape[1] :]
    assert not torch.equal(penalised, outs[0][:, : penalised.shape[1]])


def test_truncated_sampling_is_refused():
    for kw in ({"top_p": 0.9}, {"top_k": 50}):
        with pytest.raises(ValueError, match="top_p=.*top_k=.*scored under"):
            L3MConfig(output_dir="x", **kw)


def test_completions_end_before_the_end_token():
    comps = split_completions(torch.tensor([[5, 6, 2, 7], [5, 6, 7, 8], [2, 0, 0, 0]]), [2])
    assert comps.ids == [[5, 6], [5, 6, 7, 8], []]
    assert comps.lengths == [2, 4, 0] and comps.truncated == [False, True, False]
    assert comps.scored_ids() == [[5, 6, 2], [5, 6, 7, 8], [2]]


class Recorder:
    """A constraint function that records what it is given (c = 0: it never pushes)."""

    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kw):
        self.calls += list(zip(completions, completion_ids))
        return [0.0] * len(completions)


def test_training_and_evaluation_give_constraint_functions_the_same_ids(tmp_path, talking_model, counting_rows):
    """``completion_ids`` are the response's tokens without the end token, in training and in ``l3m evaluate``."""
    tok = load_tokenizer(str(talking_model))
    seen = {}
    for where in ("training", "evaluation"):
        rec = Recorder()
        cons = [FunctionConstraint(rec, name="recorder"), LengthConstraint(100, "max")]
        if where == "training":
            trainer = L3MTrainer(
                str(talking_model), args=tiny_args(tmp_path), train_dataset=counting_rows[:4], constraints=cons
            )
            batch = next(iter(trainer.get_train_dataloader()))
            trainer.sample_and_weight([batch])
            lengths = None
        else:
            heldout = load_examples(counting_rows[:4])
            res = evaluate_model(load_causal_lm(str(talking_model)), tok, cons, heldout, k=2, progress=False)
            lengths = res["lengths"]["values"]
        seen[where] = rec.calls
        ended = 0
        for j, (text, ids) in enumerate(rec.calls):
            assert tok.eos_token_id not in ids, (where, ids)
            assert tok.decode(ids, skip_special_tokens=True) == text
            if lengths is not None:
                assert len(ids) == lengths[j]
            ended += len(ids) < 12
        assert ended > 0, f"{where}: no sample ended before the cap, so the end token was never at stake"
    assert len(seen["training"]) == len(seen["evaluation"]) == 8


def test_sample_weights_are_lambda_times_c_minus_the_leave_one_out_baseline(tmp_path, talking_model, counting_rows):
    """Recompute each sample's surrogate weight sum_i lambda_i (c_i - b_i) from the samples, by hand."""
    rec = Recorder()
    cons = [LengthConstraint(3, "max", scale=2.0), LengthConstraint(2, "min"), FunctionConstraint(rec)]
    args = tiny_args(tmp_path, num_generations=3, max_steps=10, mu_init=0.5, mu_min=0.05)
    trainer = L3MTrainer(str(talking_model), args=args, train_dataset=counting_rows[:4], constraints=cons)
    trainer.state.max_steps, trainer.state.global_step = 10, 3
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.sample_and_weight([batch])
    tok = trainer.processing_class
    lengths = [len(ids) for _, ids in rec.calls]
    n, k, m = len(lengths), 3, 3
    c = [[(x - 3) / 2.0, 2 - x, 0.0] for x in lengths]  # c_i per sample: (len - 3) / scale, 2 - len, the function's 0
    mu = 0.5 * (0.05 / 0.5) ** (3 / 9)
    weights = []
    for j in range(n):
        w = 0.0
        group = [i for i in range(n) if i // k == j // k and i != j]
        for i in range(m):
            C = sum(row[i] for row in c) / n
            lam = mu / (m * max(-C, mu * mu))
            baseline = sum(c[o][i] for o in group) / len(group)
            w += lam * (c[j][i] - baseline)
        weights.append(w)
    assert batch["sample_weights"].tolist() == pytest.approx(weights, rel=1e-5, abs=1e-6)
    assert any(abs(w) > 1e-3 for w in weights)  # the lengths differ within a prompt: the weights are not all 0
    # the sequences the weights multiply are the prompt, the response and its end token
    seqs = batch["sample_input_ids"][batch["sample_mask"].bool()].tolist()
    assert sum(lengths) + sum(x < 12 for x in lengths) == len(seqs)
    assert [c.state.lam for c in cons][0] == pytest.approx(mu / (m * max(-sum(r[0] for r in c) / n, mu * mu)))
    assert math.isfinite(cons[0].state.value) and tok.pad_token_id is not None


def test_evaluation_samples_k_per_prompt_with_cut_off_flags(talking_model, counting_rows):
    tok = load_tokenizer(str(talking_model))
    model = load_causal_lm(str(talking_model))
    b = sample_examples(model, tok, load_examples(counting_rows[:3]), k=2, max_new_tokens=4, progress=False)
    assert b.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.truncated.tolist() == [n == 4 for n in b.lengths.tolist()]
