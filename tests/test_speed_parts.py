"""The faster code paths of L3MTrainer give the numbers of the plain ones: shared-prompt sampling, the
shared-prompt forward/backward, and the ``task_loss`` switch (benchmarks/speed/)."""

import math

import pytest
import torch
from helpers import tiny_args

from l3m import L3MTrainer, LengthConstraint
from l3m.data import pad
from l3m.errors import L3MUserError


def make_trainer(tmp_path, model_dir, rows, **kw):
    args = tiny_args(tmp_path, **{"per_device_train_batch_size": 3, "max_new_tokens": 10, **kw})
    return L3MTrainer(str(model_dir), args=args, train_dataset=rows, constraints=[LengthConstraint(5, "max")])


def sampled_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._sample_and_weight([batch])
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
    trainer = make_trainer(tmp_path, talking_model, counting_rows, num_generations=3, max_new_tokens=16)
    feats = [trainer.train_dataset[i] for i in (0, 7, 19)]  # prompts of different lengths: left padding matters
    ids = pad([f["prompt_ids"] for f in feats], trainer.processing_class.pad_token_id, "left")
    mask = pad([[1] * len(f["prompt_ids"]) for f in feats], 0, "left")
    assert mask.sum(1).unique().numel() > 1
    torch.manual_seed(5)
    got = trainer._generate(ids, mask)
    model = trainer.model.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        want = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=16,
            top_k=0,
            num_return_sequences=3,
            eos_token_id=trainer.eos_token_ids,
            pad_token_id=trainer.processing_class.pad_token_id,
        )[:, ids.shape[1] :]
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert trainer._shared_prompt_cache(model, ids, mask, 3) is not None  # the shared path was the one taken


def test_shared_prefix_logprobs_match_whole_sequence_forward(tmp_path, tiny_model, counting_rows):
    trainer = make_trainer(tmp_path, tiny_model, counting_rows)
    model = trainer.model.eval()
    feats = [trainer.train_dataset[i] for i in (2, 11)]
    pad_id = trainer.processing_class.pad_token_id
    p_ids = pad([f["prompt_ids"] for f in feats], pad_id, "left")
    p_mask = pad([[1] * len(f["prompt_ids"]) for f in feats], 0, "left")
    conts = [
        (torch.tensor([11, 12, 13, 14]), 0),
        (torch.tensor([21]), 0),
        (torch.tensor([31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]), 1),
        (torch.tensor([51, 52]), 1),
    ]
    shared = trainer._shared_prefix_logprobs(model, p_ids, p_mask, conts)
    seqs = [feats[o]["prompt_ids"] + t.tolist() for t, o in conts]
    masks = [[0] * len(feats[o]["prompt_ids"]) + [1] * t.numel() for t, o in conts]
    plain = trainer._response_logprobs(
        model, [(pad(seqs, pad_id), pad(masks, 0), pad([[1] * len(s) for s in seqs], 0))]
    )
    for (_, o), seq, a, b in zip(conts, seqs, shared, plain):
        n = len(feats[o]["prompt_ids"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
        want = logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)[n - 1 :].sum()
        assert torch.allclose(a.sum(), want, atol=1e-4)
        assert torch.allclose(a.sum(), b.sum(), atol=1e-4)


@pytest.mark.parametrize("task_loss", [True, False])
def test_compute_loss_shared_prompts_gives_the_plain_loss_and_gradient(
    tmp_path, talking_model, counting_rows, task_loss
):
    # the talking model ends its samples at varied lengths: the samples' weights are not all zero
    trainer = make_trainer(tmp_path, talking_model, counting_rows, task_loss=task_loss, max_new_tokens=30)
    batch = sampled_batch(trainer)
    assert "sample_prompt_ids" in batch and batch["sample_completion_ids"].shape[0] == 6
    trainer.model.train()
    loss_a, grads_a = loss_and_grads(trainer, batch)
    assert not getattr(trainer, "_prefix_sharing_failed", False)
    trainer._prefix_sharing_failed = True  # force the plain path: every sequence whole
    loss_b, grads_b = loss_and_grads(trainer, batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert batch["sample_weights"].abs().sum() > 0 and grads_a.norm() > 0
    rel = float((grads_a - grads_b).norm() / grads_a.norm())
    assert rel < 1e-4, rel  # float32 rounding (in float64 the two agree to 1e-8: the log-softmax runs in float32)
    nll = trainer._metrics.get("task_nll", [])
    assert (len(nll) == 2) if task_loss else (nll == [])


def test_task_loss_false_drops_the_task_term_and_needs_a_constraint(tmp_path, tiny_model, counting_rows):
    with_task = make_trainer(tmp_path / "a", tiny_model, counting_rows)
    without = make_trainer(tmp_path / "b", tiny_model, counting_rows, task_loss=False)
    batch = sampled_batch(with_task)
    with_task.model.train()
    without.model.train()
    full = with_task.compute_loss(with_task.model, batch).detach()
    task_nll = with_task._metrics["task_nll"][-1]
    assert task_nll > 1.0  # a random model: the task term is large
    alone = without.compute_loss(without.model, batch).detach()
    assert float(full - alone) == pytest.approx(task_nll, rel=1e-4)
    without.constraints = []
    with pytest.raises(L3MUserError, match="task_loss"):
        without.compute_loss(without.model, batch)


def test_fixed_forward_calls_make_one_call_per_micro_batch_with_the_same_loss(tmp_path, talking_model, counting_rows):
    """Under ZeRO-3/FSDP every process must make the same forward calls (each gathers the sharded weights).
    ``fixed_forward_calls`` makes the loss one forward call per micro-batch, whatever the lengths, and gives the
    loss and gradient of the default (prefix-sharing, length-grouped) path."""
    trainer = make_trainer(tmp_path, talking_model, counting_rows, max_new_tokens=30)
    assert trainer._fixed_forward_calls() is False  # auto: off on one process
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
    trainer.args.fixed_forward_calls = True
    assert trainer._fixed_forward_calls() is True
    loss_b, grads_b = loss_and_grads(trainer, batch)
    hook.remove()
    assert len(calls) == 1
    assert torch.allclose(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert float((grads_a - grads_b).norm() / grads_a.norm()) < 1e-4


@pytest.mark.parametrize("score_temperature", [True, False])
def test_sample_logprobs_are_those_of_the_sampling_distribution(
    tmp_path, talking_model, counting_rows, score_temperature
):
    """Samples drawn at temperature T are scored with log softmax(logits / T) (the distribution they came from);
    the task rows stay at temperature 1. Both forward paths (shared prompts, whole sequences) agree."""
    t = 0.7
    trainer = make_trainer(
        tmp_path, talking_model, counting_rows, temperature=t, score_temperature=score_temperature, max_new_tokens=12
    )
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
        want_samples = direct(*s, t if score_temperature else 1.0)
        other = direct(*s, 1.0 if score_temperature else t)
    for got in (rows, plain):
        task = torch.stack([r.sum() for r in got[:n_task]])
        samples = torch.stack([r.sum() for r in got[n_task:]])
        assert torch.allclose(task, want_task, atol=1e-3)
        assert torch.allclose(samples, want_samples, atol=1e-3)
        assert not torch.allclose(samples, other, atol=1e-2)  # the temperature made a difference


def step_loss_and_grads(trainer, batch):
    """One ``training_step`` (as the training loop calls it): its loss and the gradient it left."""
    model = trainer.model
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(model, dict(batch))
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize(
    "setup",
    ["shared prompts", "separate prompts", "minimax", "stop gradient"],
)
def test_loss_chunks_give_the_one_pass_loss_gradient_and_metrics(tmp_path, talking_model, counting_rows, setup):
    """``loss_chunks`` back-propagates a micro-batch in chunks of prompts: with unequal chunks (3 prompts in 2) and
    task rows that do not line up with the prompts, the loss, the gradient and the logged means are the one-pass
    ones, and each chunk has its own backward."""
    kw = dict(per_device_train_batch_size=3, max_new_tokens=30)
    prompts = None
    if setup == "separate prompts":  # 4 task rows, 3 sampled prompts of their own
        kw.update(per_device_train_batch_size=4, prompt_batch_size=3)
        prompts = [{"prompt": f"say {w} please"} for w in ("one", "two words", "a longer prompt here", "x", "y z")]
    if setup == "minimax":
        kw.update(method="minimax", beta=0.1, multiplier_init=0.5, task_loss=True)
    constraints = [LengthConstraint(5, "max")]
    if setup == "stop gradient":  # one constraint of each gradient: both weights are split into the chunks
        constraints.append(LengthConstraint(2, "min", gradient="stop"))
    args = tiny_args(tmp_path, **kw)
    trainer = L3MTrainer(
        str(talking_model),
        args=args,
        train_dataset=counting_rows,
        prompt_dataset=prompts,
        constraints=constraints,
    )
    batch = sampled_batch(trainer)
    assert batch["sample_weights"].abs().sum() > 0
    assert (setup == "stop gradient") == ("sample_stop_weights" in batch)
    trainer.model.train()
    trainer._metrics.clear()
    loss_a, grads_a = step_loss_and_grads(trainer, batch)
    one_pass = {key: v[-1] for key, v in trainer._metrics.items()}
    assert "task_nll" in one_pass and (setup != "minimax" or "kl" in one_pass)

    trainer.args.loss_chunks = 2
    chunks = trainer._loss_chunks(batch)
    assert [c[1]["samples"] for c in chunks] == [1 / 3, 2 / 3]
    calls = []
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **k: (calls.append(1), backward(loss, **k))
    trainer._metrics.clear()
    loss_b, grads_b = step_loss_and_grads(trainer, batch)
    assert len(calls) == 2
    assert torch.allclose(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert float((grads_a - grads_b).norm() / grads_a.norm()) < 1e-5
    chunked = {key: v[-1] for key, v in trainer._metrics.items()}
    assert chunked.keys() == one_pass.keys() and all(len(v) == 1 for v in trainer._metrics.values())
    for key in one_pass:
        assert chunked[key] == pytest.approx(one_pass[key], rel=1e-5, abs=1e-6), key


def test_loss_chunks_train_end_to_end_and_bad_values_are_refused(tmp_path, tiny_model, counting_rows):
    from l3m import L3MConfig

    with pytest.raises(ValueError, match="loss_chunks"):
        L3MConfig(output_dir=str(tmp_path), loss_chunks=0)
    args = tiny_args(tmp_path, per_device_train_batch_size=2, max_steps=2, loss_chunks=4)
    trainer = L3MTrainer(
        str(tiny_model), args=args, train_dataset=counting_rows, constraints=[LengthConstraint(5, "max")]
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(math.isfinite(h.get("loss", 0.0)) for h in trainer.state.log_history)


def assert_trainer_loss_matches(trainer, batch, model, surrogate) -> None:
    """The trainer's loss and gradient on ``batch`` equal ``surrogate``'s (computed directly, not yet
    back-propagated), on the prompt-sharing path and on the plain one (every sequence whole)."""
    surrogate.backward()
    want_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    loss_a, grads_a = loss_and_grads(trainer, batch)
    assert torch.allclose(loss_a, surrogate.detach(), atol=1e-5)
    assert float((grads_a - want_grads).norm() / want_grads.norm()) < 1e-4
    trainer._prefix_sharing_failed = True
    loss_b, grads_b = loss_and_grads(trainer, batch)
    trainer._prefix_sharing_failed = False
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert float((grads_a - grads_b).norm() / grads_a.norm()) < 1e-4


def test_stop_gradient_surrogate_is_the_stop_decisions_log_probability(tmp_path, talking_model, counting_rows):
    """``gradient: stop``: the surrogate multiplies each sample's weight by the log-probability of its stop-or-go
    decisions (``log P(end token)`` at its end, ``log (1 - P(end token))`` before), computed here from a plain
    forward pass; loss and gradient agree on the prompt-sharing path and the plain one."""
    args = tiny_args(tmp_path, per_device_train_batch_size=3, max_new_tokens=30, task_loss=False, temperature=0.7)
    con = LengthConstraint(5, "max", gradient="stop")
    trainer = L3MTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=[con])
    batch = sampled_batch(trainer)
    w = batch["sample_stop_weights"]
    assert w.abs().sum() > 0 and batch["sample_weights"].abs().sum() == 0
    model = trainer.model.train()
    eos = trainer.eos_token_ids
    model.zero_grad()
    want = []
    for i in range(w.numel()):
        ids, mask = batch["sample_input_ids"][i], batch["sample_mask"][i]
        ids = ids[batch["sample_attention_mask"][i].bool()]
        resp = mask[: ids.numel()].bool()
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1] / 0.7  # the sampling temperature
        pos = resp[1:].nonzero().flatten()  # positions whose next token is a response token
        logp = logits[pos].log_softmax(-1)
        p_stop = logp[:, eos].logsumexp(-1).exp()
        ends = torch.isin(ids[1:][pos], torch.tensor(eos))
        assert int(ends.sum()) <= 1 and (not ends.any() or bool(ends[-1]))
        want.append(torch.where(ends, p_stop.log(), torch.log1p(-p_stop)).sum())
    surrogate = (w * torch.stack(want)).mean()
    assert_trainer_loss_matches(trainer, batch, model, surrogate)


@pytest.mark.parametrize(
    ("min_p", "direction", "passed"),
    [
        (0.0, "logodds", 0.0),
        (0.02, "logodds", 0.0),
        (0.02, "stop_prob", 0.0),
        (0.0, "logodds", 3.0),
        (0.02, "stop_prob", 3.0),
    ],
)
def test_shift_gradient_surrogate_moves_every_stop_log_odds_alike(
    tmp_path, talking_model, counting_rows, min_p, direction, passed
):
    """``gradient: shift``: the surrogate is ``g * mean_t s_t`` with ``s_t`` the stop log-odds at each sampled
    decision and ``g = mean_j w_j sum_t (1[stop] - P_t(stop))``, computed here from a plain forward pass; ``g`` is
    the derivative of the weighted constraint under a uniform shift of the stop log-odds (checked against the
    analytic score of each sample's decisions); the mean counts the decisions with P(stop) >= shift_min_stop_prob;
    loss and gradient agree on both paths; loss_chunks is refused. With ``shift_direction: stop_prob`` each decision
    gets the weight ``u_t = min(1 / (1 - P_t), cap)`` over its mean on the counted decisions, in ``g`` and the mean;
    with ``shift_passed_end_weight`` w, ``u_t`` is also multiplied by ``1 + w (1 - prod_{tau < t} (1 - P_tau))``."""
    cap = 1.03  # 1 / (1 - P) with P = 0.03: this tiny model stops with P up to 0.05, so the cap is exercised
    args = tiny_args(
        tmp_path,
        per_device_train_batch_size=3,
        max_new_tokens=30,
        task_loss=False,
        temperature=0.7,
        shift_min_stop_prob=min_p,
        shift_direction=direction,
        shift_max_weight=cap,
        shift_passed_end_weight=passed,
    )
    con = LengthConstraint(5, "max", gradient="shift")
    trainer = L3MTrainer(str(talking_model), args=args, train_dataset=counting_rows, constraints=[con])
    batch = sampled_batch(trainer)
    w = batch["sample_shift_weights"]
    assert w.abs().sum() > 0 and batch["sample_weights"].abs().sum() == 0 and "sample_stop_weights" not in batch
    model = trainer.model.train()
    eos = trainer.eos_token_ids
    model.zero_grad()
    rows, n, n_all = [], 0, 0
    for i in range(w.numel()):
        ids, mask = batch["sample_input_ids"][i], batch["sample_mask"][i]
        ids = ids[batch["sample_attention_mask"][i].bool()]
        resp = mask[: ids.numel()].bool()
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1] / 0.7
        pos = resp[1:].nonzero().flatten()
        logp = logits[pos].log_softmax(-1)
        log_stop = logp[:, eos].logsumexp(-1)
        s = log_stop - torch.log1p(-log_stop.exp())
        ends = torch.isin(ids[1:][pos], torch.tensor(eos)).float()
        keep = s.detach().sigmoid() >= min_p
        rows.append((s, ends, keep))
        n += int(keep.sum())
        n_all += pos.numel()
    assert 0 < n <= n_all and (n == n_all) == (min_p == 0), (n, n_all)  # the floor leaves some decisions out
    raw = [torch.ones_like(s.detach()) for s, _, _ in rows]
    if direction == "stop_prob":
        raw = [(1 / (1 - s.detach().sigmoid())).clamp(max=cap) for s, _, _ in rows]
        assert any(bool((r == cap).any()) for r in raw) and any(bool((r < cap).any()) for r in raw)
    if passed:
        for j, (s, _, _) in enumerate(rows):
            go = 1 - s.detach().sigmoid()
            survival = torch.tensor([float(go[:t].prod()) for t in range(go.numel())])  # before decision t
            assert survival[0] == 1 and bool((survival[1:] < 1).all())
            raw[j] = raw[j] * (1 + passed * (1 - survival))
    mean_u = sum(r[k].sum() for r, (_, _, k) in zip(raw, rows)) / n
    us = [r / mean_u for r in raw]
    scores, logodds = [], []
    for (s, ends, keep), u in zip(rows, us):
        # d/d delta of log P(decisions) when every s_t gets + delta u_t: sum_t u_t (1[stop] - sigmoid(s_t)) at 0
        delta = torch.zeros((), requires_grad=True)
        moved = s.detach() + delta * u
        dec = (ends * torch.nn.functional.logsigmoid(moved)).sum()
        dec = dec + ((1 - ends) * torch.nn.functional.logsigmoid(-moved)).sum()
        (d_dec,) = torch.autograd.grad(dec, delta)
        scores.append(d_dec)
        logodds.append((u * s)[keep].sum())
    g = (w * torch.stack(scores)).mean()
    surrogate = g * torch.stack(logodds).sum() / n
    assert_trainer_loss_matches(trainer, batch, model, surrogate)
    with pytest.raises(L3MUserError, match="loss_chunks"):
        L3MTrainer(
            str(talking_model),
            args=tiny_args(tmp_path, loss_chunks=2),
            train_dataset=counting_rows,
            constraints=[LengthConstraint(5, "max", gradient="shift")],
        )


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
