"""The faster code paths give the numbers of the plain ones: shared-prompt sampling (``l3m.sampling.generate``), the
shared-prompt forward/backward (``l3m.logprobs.shared_prefix_logprobs``) and the one-call forward of sharded weights;
and the loss is the surrogate of method.md, with samples scored at their sampling temperature."""

import pytest
import torch
from helpers import tiny_args

from l3m import L3MTrainer, LengthConstraint
from l3m.data import pad
from l3m.logprobs import response_logprobs, shared_prefix_logprobs
from l3m.minimax import MinimaxConfig, MinimaxTrainer
from l3m.sampling import _shared_prompt_cache, generate, generation_config


def make_trainer(tmp_path, model_dir, rows, **kw):
    args = tiny_args(tmp_path, **{"per_device_train_batch_size": 3, "max_new_tokens": 10, **kw})
    return L3MTrainer(str(model_dir), args=args, train_dataset=rows, constraints=[LengthConstraint(5, "max")])


def sampled_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.sample_and_weight([batch])
    return batch


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return loss.detach(), grads


def test_generate_with_a_shared_prompt_cache_draws_what_generate_draws(tmp_path, talking_model, counting_rows):
    """l3m's sampler draws exactly what a plain ``generate(..., num_return_sequences=k)`` at the same settings draws,
    and takes nothing from the model's own generation config (here a repetition penalty) but its end tokens."""
    trainer = make_trainer(tmp_path, talking_model, counting_rows, num_generations=3, max_new_tokens=16)
    feats = [trainer.train_dataset[i] for i in (0, 7, 19)]  # prompts of different lengths: left padding matters
    pad_id = trainer.processing_class.pad_token_id
    ids = pad([f["prompt_ids"] for f in feats], pad_id, "left")
    mask = pad([[1] * len(f["prompt_ids"]) for f in feats], 0, "left")
    assert mask.sum(1).unique().numel() > 1
    model = trainer.model.eval()
    model.generation_config.repetition_penalty = 3.0  # a setting of the model's that l3m must not inherit
    config = generation_config(16, 1.0, trainer.eos_token_ids, pad_id)
    torch.manual_seed(5)
    got = generate(model, ids, mask, 3, config)
    plain = dict(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        max_new_tokens=16,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_return_sequences=3,
        eos_token_id=trainer.eos_token_ids,
        pad_token_id=pad_id,
    )
    torch.manual_seed(5)
    with torch.no_grad():
        want = model.generate(**plain, repetition_penalty=1.0)[:, ids.shape[1] :]
        torch.manual_seed(5)
        penalised = model.generate(**plain)[:, ids.shape[1] :]  # inherits the model's repetition penalty
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert not torch.equal(penalised, want)  # the penalty changes the draws: the test above can fail
    assert model.generation_config.repetition_penalty == 3.0  # the model's own config is restored
    with torch.no_grad():
        assert _shared_prompt_cache(model, ids, mask, 3) is not None  # the shared path was the one taken


def test_shared_prefix_logprobs_match_whole_sequence_forward(tmp_path, tiny_model, counting_rows):
    trainer = make_trainer(tmp_path, tiny_model, counting_rows)
    model = trainer.model.eval()
    feats = [trainer.train_dataset[i] for i in (2, 11)]
    pad_id = trainer.processing_class.pad_token_id
    p_ids = pad([f["prompt_ids"] for f in feats], pad_id, "left")
    p_mask = pad([[1] * len(f["prompt_ids"]) for f in feats], 0, "left")
    conts = [
        (torch.tensor([11, 12, 13, 14]), 0, 1.0),
        (torch.tensor([21]), 0, 1.0),
        (torch.tensor([31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]), 1, 1.0),
        (torch.tensor([51, 52]), 1, 1.0),
    ]
    with torch.no_grad():
        shared = shared_prefix_logprobs(model, p_ids, p_mask, conts, pad_id)
        seqs = [feats[o]["prompt_ids"] + t.tolist() for t, o, _ in conts]
        masks = [[0] * len(feats[o]["prompt_ids"]) + [1] * t.numel() for t, o, _ in conts]
        plain = response_logprobs(
            model, [(pad(seqs, pad_id), pad(masks, 0), pad([[1] * len(s) for s in seqs], 0))], pad_id
        )
    assert shared is not None and len(shared) == len(conts)
    for (_, o, _), seq, a, b in zip(conts, seqs, shared, plain):
        n = len(feats[o]["prompt_ids"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
        want = logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)[n - 1 :].sum()
        assert torch.allclose(a.sum(), want, atol=1e-4)
        assert torch.allclose(a.sum(), b.sum(), atol=1e-4)


def minimax_args(tmp_path, **kw):
    """``tiny_args``'s settings in a :class:`MinimaxConfig`."""
    return tiny_args(tmp_path, config_class=MinimaxConfig, **kw)


SETUPS = ["shared prompts", "separate prompts", "minimax without task loss"]


def setup_trainer(tmp_path, model_dir, rows, setup, **kw):
    """An L3M trainer whose task rows are the sampled prompts' own, one with a prompt set of its own (4 task rows,
    3 sampled prompts), or the minimax baseline with no task term (samples only)."""
    kw = {"per_device_train_batch_size": 3, "max_new_tokens": 30, **kw}
    if setup == "minimax without task loss":
        args = minimax_args(tmp_path, beta=0.1, multiplier_init=0.5, **kw)
        return MinimaxTrainer(str(model_dir), args=args, train_dataset=rows, constraints=[LengthConstraint(5, "max")])
    prompts = None
    if setup == "separate prompts":
        kw.update(per_device_train_batch_size=4, prompt_batch_size=3)
        prompts = [{"prompt": f"say {w} please"} for w in ("one", "two words", "a longer prompt here", "x", "y z")]
    return L3MTrainer(
        str(model_dir),
        args=tiny_args(tmp_path, **kw),
        train_dataset=rows,
        prompt_dataset=prompts,
        constraints=[LengthConstraint(5, "max")],
    )


@pytest.mark.parametrize("setup", SETUPS)
def test_compute_loss_shared_prompts_gives_the_plain_loss_and_gradient(tmp_path, talking_model, counting_rows, setup):
    # the talking model ends its samples at varied lengths: the samples' weights are not all zero
    trainer = setup_trainer(tmp_path, talking_model, counting_rows, setup)
    batch = sampled_batch(trainer)
    n_samples = 3 * trainer.args.num_generations
    assert "sample_prompt_ids" in batch and batch["sample_completion_ids"].shape[0] == n_samples
    trainer.model.train()
    trainer._metrics.clear()
    calls = []
    hook = trainer.model.register_forward_pre_hook(lambda *a: calls.append(1))
    loss_a, grads_a = loss_and_grads(trainer, batch)
    hook.remove()
    assert not getattr(trainer, "_prefix_sharing_failed", False)
    # prompts once, then the continuations (batched by length), plus the task rows apart with a prompt set
    assert len(calls) >= (3 if setup == "separate prompts" else 2), calls
    trainer._prefix_sharing_failed = True  # force the plain path: every sequence whole
    loss_b, grads_b = loss_and_grads(trainer, batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert batch["sample_weights"].abs().sum() > 0 and grads_a.norm() > 0
    nll = trainer._metrics.get("task_nll", [])
    assert (nll == []) if setup.startswith("minimax") else (len(nll) == 2)
    # the gradients, in float64: in float32 they differ by rounding (up to ~1e-4 of the norm: the log-softmax runs
    # in float32); in float64 the two paths agree to 1e-8
    trainer.model.double()
    grads = []
    for failed in (False, True):
        trainer._prefix_sharing_failed = failed
        grads.append(loss_and_grads(trainer, batch)[1])
    rel = float((grads[0] - grads[1]).norm() / grads[0].norm())
    assert rel < 1e-8, rel


def test_loss_is_the_task_nll_plus_the_weighted_sequence_logprobs(tmp_path, talking_model, counting_rows):
    """The loss and its gradient are ``mean_rows(NLL per response token) + mean_j w_j log pi_T(y_j|x_j)``, computed
    here from a plain forward pass of each sequence (the samples at the sampling temperature T, with their end
    token), on the prompt-sharing path and on the plain one. In float64, where rounding (the float32 log-softmax of
    token_logprobs) leaves about 1e-7 of the loss: in float32 a whole-sequence pass and the prompt-sharing one
    differ by up to 1e-4 per sequence log-probability."""
    t = 0.7
    trainer = make_trainer(tmp_path, talking_model, counting_rows, max_new_tokens=30, temperature=t)
    batch = sampled_batch(trainer)
    w = batch["sample_weights"].double()
    assert w.abs().sum() > 0
    model = trainer.model.double().train()
    model.zero_grad()

    def seq_logp(ids, mask, attn, temp):
        out = []
        for r in range(ids.shape[0]):
            seq = ids[r][attn[r].bool()]
            resp = mask[r][attn[r].bool()].bool()
            logits = model(input_ids=seq.unsqueeze(0)).logits[0, :-1] / temp
            lp = logits.log_softmax(-1).gather(-1, seq[1:].unsqueeze(-1)).squeeze(-1)
            out.append(lp[resp[1:]].sum())
        return torch.stack(out)

    task = seq_logp(batch["input_ids"], batch["response_mask"], batch["attention_mask"], 1.0)
    n_tok = batch["response_mask"].sum(1).double()
    samples = seq_logp(batch["sample_input_ids"], batch["sample_mask"], batch["sample_attention_mask"], t)
    surrogate = (-task / n_tok).mean() + (w * samples).mean()
    surrogate.backward()
    surrogate = float(surrogate.detach())
    want_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    for sharing_failed in (False, True):
        trainer._prefix_sharing_failed = sharing_failed
        loss, grads = loss_and_grads(trainer, batch)
        assert abs(float(loss) - surrogate) < 1e-6, (float(loss), surrogate, sharing_failed)
        rel = float((grads - want_grads).norm() / want_grads.norm())
        assert rel < 1e-5, (rel, sharing_failed)


def test_sharded_weights_make_one_forward_call_per_micro_batch_with_the_same_loss(
    tmp_path, talking_model, counting_rows
):
    """Under ZeRO-3/FSDP every process must make the same forward calls (each gathers the sharded weights): the
    loss is then one forward call per micro-batch, whatever the lengths, with the loss and gradient of the default
    (prefix-sharing, length-grouped) path."""
    trainer = make_trainer(tmp_path, talking_model, counting_rows, max_new_tokens=30)
    assert trainer._weights_sharded() is False  # one process: never sharded
    batch = sampled_batch(trainer)
    lengths = batch["sample_attention_mask"].sum(1)
    assert lengths.unique().numel() > 1  # the data-dependent case: samples of different lengths
    trainer.model.train()
    calls = []
    hook = trainer.model.register_forward_pre_hook(lambda *a: calls.append(1))
    loss_a, grads_a = loss_and_grads(trainer, batch)
    default_calls = len(calls)
    assert default_calls > 1  # prompts once, then the continuations: more than one call
    calls.clear()
    trainer._weights_sharded = lambda: True
    loss_b, grads_b = loss_and_grads(trainer, batch)
    hook.remove()
    assert len(calls) == 1
    assert torch.allclose(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert float((grads_a - grads_b).norm() / grads_a.norm()) < 1e-4


def test_sample_logprobs_are_those_of_the_sampling_distribution(tmp_path, talking_model, counting_rows):
    """Samples drawn at temperature T are scored with log softmax(logits / T) (the distribution they came from);
    the task rows stay at temperature 1. Both forward paths (shared prompts, whole sequences) agree."""
    t = 0.7
    trainer = make_trainer(tmp_path, talking_model, counting_rows, temperature=t, max_new_tokens=12)
    batch = sampled_batch(trainer)
    model = trainer.model.eval()
    n_task = batch["input_ids"].shape[0]
    with torch.no_grad():
        rows = trainer._loss_logprobs(model, batch, True, True)
        trainer._prefix_sharing_failed = True
        plain = trainer._loss_logprobs(model, batch, True, True)

        def direct(ids, mask, attn, temp):
            out = []
            for r in range(ids.shape[0]):
                seq = ids[r][attn[r].bool()]
                resp = mask[r][attn[r].bool()].bool()
                logits = model(input_ids=seq.unsqueeze(0)).logits[0, :-1] / temp
                lp = logits.log_softmax(-1).gather(-1, seq[1:].unsqueeze(-1)).squeeze(-1)
                out.append(lp[resp[1:]].sum())
            return torch.stack(out)

        want_task = direct(batch["input_ids"], batch["response_mask"], batch["attention_mask"], 1.0)
        s = (batch["sample_input_ids"], batch["sample_mask"], batch["sample_attention_mask"])
        want_samples = direct(*s, t)
        other = direct(*s, 1.0)
    for got in (rows, plain):
        task = torch.stack([r.sum() for r in got[:n_task]])
        samples = torch.stack([r.sum() for r in got[n_task:]])
        assert torch.allclose(task, want_task, atol=1e-3)
        assert torch.allclose(samples, want_samples, atol=1e-3)
        assert not torch.allclose(samples, other, atol=1e-2)  # the temperature made a difference


def test_prompt_batch_size_without_a_prompt_set_samples_more_training_prompts(tmp_path, talking_model, counting_rows):
    """``prompt_batch_size`` other than the batch size, with no prompt set: each step samples that many of the
    training prompts (not only the task rows' own), the task rows get their own forward pass, and training runs."""
    k = 2
    trainer = make_trainer(
        tmp_path, talking_model, counting_rows, per_device_train_batch_size=2, prompt_batch_size=5, num_generations=k
    )
    assert trainer._separate_prompts
    batch = sampled_batch(trainer)
    assert batch["input_ids"].shape[0] == 2  # the task loss's batch is unchanged
    assert batch["sample_input_ids"].shape[0] == 5 * k
    train_prompts = {tuple(f["prompt_ids"]) for f in trainer.train_dataset.items}
    sampled = {tuple(p[m.bool()].tolist()) for p, m in zip(batch["sample_prompt_ids"], batch["sample_prompt_mask"])}
    assert len(sampled) == 5 and sampled <= train_prompts
    trainer.model.train()
    loss, grads = loss_and_grads(trainer, batch)
    assert torch.isfinite(loss) and grads.norm() > 0
    # the default (and an explicit value equal to the batch size) samples the task rows' own prompts
    same = make_trainer(tmp_path, talking_model, counting_rows, per_device_train_batch_size=2, prompt_batch_size=2)
    assert not same._separate_prompts
    trainer.args.max_steps = 2
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="prompt_batch_size"):
        tiny_args(tmp_path, prompt_batch_size=0)
