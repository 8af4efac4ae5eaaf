"""The samplers (``hf``, ``static``, ``paged``): the same greedy outputs, the same structures, samples drawn from the
distribution they are scored under, and training runs that resume exactly with each."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_args
from transformers import TrainerCallback

from l3m import L3MConfig, L3MTrainer, LengthConstraint
from l3m.data import load_examples, pad, prompt_ids
from l3m.logprobs import response_logprobs
from l3m.models import load_causal_lm, load_tokenizer
from l3m.sampling import SAMPLERS, generate, generation_config, sample_examples, split_completions

IGNORED = ("time/", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _prompts(tok, rows):
    ids = [prompt_ids(tok, ex.prompt) for ex in load_examples(rows)]
    assert len({len(x) for x in ids}) > 1  # prompts of different lengths: the left padding is at stake
    return pad(ids, tok.pad_token_id, "left"), pad([[1] * len(x) for x in ids], 0, "left")


@pytest.fixture(scope="module")
def talker(talking_model):
    return load_tokenizer(str(talking_model)), load_causal_lm(str(talking_model))


def test_unknown_samplers_are_refused(talker):
    tok, model = talker
    with pytest.raises(ValueError, match="sampler must be one of hf, static, paged"):
        L3MConfig(output_dir="x", sampler="vllm")
    ids, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="sampler must be one of"):
        generate(model, ids, mask, 2, generation_config(4, 1.0, [tok.eos_token_id], tok.pad_token_id), "fast")


@pytest.fixture(scope="module")
def lively(tiny_model):
    """The tiny random model with its weights scaled up: its greedy responses vary from prompt to prompt and from
    token to token (unscaled, a random model repeats one token)."""
    model = load_causal_lm(str(tiny_model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10.0)
    return load_tokenizer(str(tiny_model)), model


def test_the_samplers_give_the_same_greedy_outputs(lively, counting_rows):
    tok, model = lively
    ids, mask = _prompts(tok, counting_rows[::4])
    greedy = generation_config(10, 1.0, [tok.eos_token_id], tok.pad_token_id)
    greedy.do_sample = False  # test only: the samplers' decoding paths compared without random numbers
    first = split_completions(generate(model, ids, mask, 2, greedy, "hf"), [tok.eos_token_id])
    # a second end token, one the model says in some responses but not all: some end, at different lengths
    where: dict[int, dict[int, int]] = {}  # token -> {response: the first position it is said at}
    for r, row in enumerate(first.ids):
        for j, t in enumerate(row):
            where.setdefault(t, {}).setdefault(r, j)
    said = [t for t in where if len(where[t]) < len(first.ids)]
    end = max(said, key=lambda t: (len(set(where[t].values())), len(where[t])))
    greedy.eos_token_id = ends = [tok.eos_token_id, end]
    out = {s: split_completions(generate(model, ids, mask, 2, greedy, s), ends) for s in SAMPLERS}
    for s in SAMPLERS:
        assert out[s].ids == out["hf"].ids, s
        assert out[s].end_ids == out["hf"].end_ids, s
    # the comparison can fail: the responses differ, some end (at different lengths) and some are cut off
    comps = out["hf"]
    assert len(set(map(tuple, comps.ids))) > 2
    assert any(comps.truncated) and not all(comps.truncated)
    assert len({n for n, cut in zip(comps.lengths, comps.truncated) if not cut}) > 1


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampled_responses_have_the_same_structure(talker, counting_rows, sampler):
    tok, model = talker
    examples = load_examples(counting_rows[:5])
    k, cap = 3, 6
    kw = dict(k=k, max_new_tokens=cap, batch_size=2, progress=False, sampler=sampler)
    b = sample_examples(model, tok, examples, **kw)
    n = len(examples) * k
    assert len(b.completions) == len(b.completion_ids) == len(b.prompts) == n
    assert b.group_ids.tolist() == [i // k for i in range(n)]
    assert b.prompts == [examples[i // k].prompt_text for i in range(n)]
    assert b.lengths.tolist() == [len(x) for x in b.completion_ids]
    assert all(tok.eos_token_id not in x for x in b.completion_ids)  # the end token is not part of the response
    assert b.truncated.tolist() == [x == cap for x in b.lengths.tolist()]
    assert b.truncated.any() and not b.truncated.all()
    # under a seed the samples repeat; another seed draws others
    again, other = sample_examples(model, tok, examples, **kw), sample_examples(model, tok, examples, seed=1, **kw)
    assert again.completion_ids == b.completion_ids
    assert other.completion_ids != b.completion_ids
    groups = [b.completion_ids[i : i + k] for i in range(0, n, k)]
    assert any(len({tuple(x) for x in g}) > 1 for g in groups)  # a prompt's k samples are drawn apart


def test_l3m_evaluate_samples_with_the_sampler_it_is_given(tmp_path, talking_model, counting_rows):
    from l3m.cli import main

    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows[:3]))
    tok, model = load_tokenizer(str(talking_model)), load_causal_lm(str(talking_model))
    got = {}
    for sampler in ("hf", "paged"):
        out = tmp_path / sampler
        argv = ["evaluate", "--model", str(talking_model), "--data", str(data), "--constraints", str(tmp_path / "c")]
        (tmp_path / "c").write_text(json.dumps([{"kind": "length", "max": 4}]))
        assert main([*argv, "--sampler", sampler, "--max-new-tokens", "6", "-o", str(out), "--quiet"]) == 0
        got[sampler] = [
            x["completion_ids"] for x in json.loads(out.with_suffix(".json").read_text())["results"][0]["samples"]
        ]
        direct = sample_examples(
            model, tok, load_examples(counting_rows[:3]), max_new_tokens=6, progress=False, sampler=sampler
        )
        assert got[sampler] == direct.completion_ids
    assert got["hf"] != got["paged"]  # the two samplers draw different random numbers: the setting reached them


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samples_are_drawn_from_the_distribution_they_are_scored_under(talker, counting_rows, monkeypatch, sampler):
    """Every token a sampler draws comes from ``torch.multinomial(probs)``: the probability it had there equals the
    one l3m scores it with, ``softmax(logits / T)`` (a top-k, top-p or repetition penalty would change it)."""
    tok, model = talker
    ids, mask = _prompts(tok, counting_rows[::6])
    temp, k = 0.7, 2
    drawn = []
    original = torch.multinomial

    def recording(probs, num_samples, *args, **kwargs):
        out = original(probs, num_samples, *args, **kwargs)
        drawn.append(probs.gather(-1, out[..., :1]).squeeze(-1).log().float().cpu())
        return out

    monkeypatch.setattr(torch, "multinomial", recording)
    torch.manual_seed(0)
    config = generation_config(10, temp, [tok.eos_token_id], tok.pad_token_id)
    comps = split_completions(generate(model, ids, mask, k, config, sampler), [tok.eos_token_id])
    monkeypatch.undo()
    scored = comps.scored_ids()
    seqs = [ids[j // k][mask[j // k].bool()].tolist() + s for j, s in enumerate(scored)]
    resp = [[0] * (len(q) - len(s)) + [1] * len(s) for q, s in zip(seqs, scored)]
    with torch.no_grad():
        rows = response_logprobs(
            model, [(pad(seqs, tok.pad_token_id), pad(resp, 0), pad([[1] * len(q) for q in seqs], 0))], 0, [temp]
        )
    want = [r[r != 0] for r in rows]
    assert [len(w) for w in want] == [len(s) for s in scored]
    if sampler == "paged":  # one row per scheduled sequence and step: each scored token is one of the draws
        got = torch.cat(drawn).sort().values.tolist()
        unmatched = got[:]
        for w in torch.cat(want).sort().values.tolist():
            hit = next((i for i, g in enumerate(unmatched) if abs(g - w) < 1e-4), None)
            assert hit is not None, w
            unmatched.pop(hit)
        assert len(unmatched) <= ids.shape[0]  # at most one discarded draw per prompt (its prefill)
    else:  # one row per sample and step (rows that ended go on drawing: their first draws are compared)
        table = torch.stack(drawn, 1)
        for j, w in enumerate(want):
            assert torch.allclose(table[j, : len(w)], w, atol=1e-4), (j, table[j, : len(w)], w)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _train(tmp_path, model, rows, sampler: str, stop_at: int | None = None, resume: bool = False):
    args = tiny_args(
        tmp_path,
        output_dir=str(tmp_path),
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
        sampler=sampler,
        constraint_ema=0.5,
    )
    cons = [LengthConstraint(4, "max"), LengthConstraint(2, "min")]
    trainer = L3MTrainer(str(model), args=args, train_dataset=rows, constraints=cons)
    if stop_at:
        trainer.add_callback(StopAt(stop_at))
    trainer.train(resume_from_checkpoint=True if resume else None)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"loss"' in x]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_training_with_each_sampler_resumes_exactly(tmp_path, talking_model, counting_rows, sampler):
    """Three steps straight, and two steps then a resume for the third: the same metrics, row for row."""
    rows = counting_rows[:12]
    straight = _train(tmp_path / "straight", talking_model, rows, sampler)
    _train(tmp_path / "resumed", talking_model, rows, sampler, stop_at=2)
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()
    resumed = _train(tmp_path / "resumed", talking_model, rows, sampler, resume=True)
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        keys = {k for k in a if not k.startswith(IGNORED)}
        assert keys == {k for k in b if not k.startswith(IGNORED)}
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
    # the samples mattered: lengths varied and the constraints pushed
    assert len({r["sample/mean_length"] for r in straight}) > 1
    assert any(r["constraints/length_max/lambda"] > 0 for r in straight)


# --------------------------------------------------------------------------------------------- two processes
# This file is also the worker script of the test below:
#   accelerate launch ... tests/test_samplers.py worker MODEL OUT BS ACCUM SAMPLER


def _worker(model: str, out: str, bs: int, accum: int, sampler: str) -> None:
    torch.set_num_threads(1)
    rows = [{"instruction": f"Repeat the word 'go' {n} times.", "output": " ".join(["go"] * n)} for n in range(1, 25)]
    args = L3MConfig(
        output_dir=out,
        max_steps=2,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=accum,
        num_generations=2,
        max_new_tokens=10,
        learning_rate=1e-3,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        sampler=sampler,
    )
    L3MTrainer(model, args=args, train_dataset=rows, constraints=[LengthConstraint(4, "max")]).train()


@pytest.mark.parametrize("sampler", ["static", "paged"])  # hf: tests/test_multiprocess.py
def test_two_processes_sample_what_one_process_samples(tmp_path, talking_model, sampler):
    """One process with two accumulation micro-batches and two processes with one each draw the same samples (each
    micro-batch is seeded by its global index) and so log the same metrics."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is not installed beside this Python"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    env["PYTHONPATH"] = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    me, model = str(Path(__file__).resolve()), str(talking_model)
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, me, "worker", model, str(one), "4", "2", sampler],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    launch += [me, "worker", model, str(two), "4", "1", sampler]
    multi = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "MULTI_CPU" in (two / "distributed.txt").read_text()  # it really ran as two gloo processes

    def steps(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    a, b = steps(one), steps(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    keys = ["loss", "sample/mean_length", "sample/clipped_ratio", "constraints/length_max/value", "mu"]
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert any(0 < r["sample/clipped_ratio"] < 1 for r in a)  # some samples ended, some were cut off


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    os.makedirs(sys.argv[3], exist_ok=True)
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        Path(sys.argv[3], "distributed.txt").write_text(f"{state.distributed_type} {state.num_processes}\n")
    from l3m.cli import _leave_process_group

    _leave_process_group()  # as l3m's CLI leaves it: the group destroyed, no native teardown for gloo to abort in
