"""Bad input, numerical safety, infeasibility, PEFT and precision switches, and loading safety.

Complements tests/test_data.py and tests/test_cli.py (which check the data readers and config errors one by one):
here the same kinds of failure go through ``l3m train`` as a user would meet them, and through the trainer.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from safetensors.torch import load_file

from l3m import FunctionConstraint, L3MConfig, L3MTrainer, LengthConstraint, NonFiniteError, RewardConstraint
from l3m.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "l3m"


def tiny_args(out: Path, **kw) -> L3MConfig:
    """The shared tiny-model settings, writing into ``out`` itself."""
    return helpers.tiny_args(out, **{"output_dir": str(out), "max_new_tokens": 8, **kw})


def write_config(tmp_path: Path, model, data, constraints=None, name="cfg.yaml", **training) -> Path:
    cfg = {
        "model": str(model),
        "data": {"train": str(data)},
        "constraints": constraints or [],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_new_tokens": 8,
            "use_cpu": True,
            "disable_tqdm": True,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            **training,
        },
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def data_file(tmp_path, counting_rows) -> Path:
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in counting_rows))
    return f


def _l3m() -> list[str]:
    exe = shutil.which("l3m", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "l3m.cli"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


# ----------------------------------------------------------------------------------------------
# bad data and config, as a new user meets them


def test_corrupt_data_file_through_l3m_train(tmp_path, tiny_model):
    bad = tmp_path / "corrupt.jsonl"
    bad.write_text('{"prompt": "q1", "completion": "a1"}\n\n{"prompt": "q2", "completion": "a2"\n')
    cfg = write_config(tmp_path, tiny_model, bad)
    proc = subprocess.run([*_l3m(), "train", str(cfg)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"{bad}:3: malformed JSON line" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") <= 2  # one paragraph


@pytest.mark.parametrize(
    "text, message",
    [
        ("[]\n", "holds no records"),  # an empty JSON array
        ("\n\n", "holds no records"),  # a file of blank lines
        ('{"prompt": "q", "response": "a"}\n', "rows.jsonl:1: the record has no reference response"),  # misnamed
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n',
            "rows.jsonl:1: the record has no reference response (or an empty one)",
        ),  # an empty response
    ],
)
def test_bad_data_sets_stop_before_training(tmp_path, tiny_model, capsys, text, message):
    f = tmp_path / "rows.jsonl"
    f.write_text(text)
    assert main(["train", str(write_config(tmp_path, tiny_model, f))]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was trained or written


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"peft": {"r": 4, "lora_alpah": 8}}, "unknown key 'lora_alpah' (did you mean 'lora_alpha'"),
        ({"data": {"trian": "x.jsonl"}}, "unknown key 'trian' (did you mean 'train'"),
        (
            {"constraints": [{"kind": "reward", "function": "m:f", "at_lest": 1}]},
            "unknown field 'at_lest' (did you mean 'at_least'",
        ),
        ({"training": {"learnig_rate": 1e-3}}, "unknown key 'learnig_rate' (did you mean 'learning_rate'"),
    ],
)
def test_misspelled_keys_in_every_section_suggest_the_right_one(tmp_path, data_file, capsys, patch, message):
    cfg = yaml.safe_load(write_config(tmp_path, "default", data_file).read_text())
    for section, value in patch.items():
        if isinstance(value, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(value)
        else:
            cfg[section] = value
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    assert message in capsys.readouterr().err


def test_long_prompts_are_truncated_with_a_counted_warning_and_training_runs(tmp_path, tiny_model, caplog):
    rows = [
        {"prompt": "please read this carefully " * 60 + f"and answer {i}", "completion": "ok " * (i + 1)}
        for i in range(6)
    ] + [{"prompt": "short", "completion": "fine"}] * 2
    with caplog.at_level(logging.WARNING, logger="l3m"):
        trainer = L3MTrainer(
            str(tiny_model),
            args=tiny_args(tmp_path, max_steps=1, max_prompt_length=32, max_length=48),
            train_dataset=rows,
            constraints=[LengthConstraint(4, "max")],
        )
    assert "train data: truncated 6 prompt(s) longer than max_prompt_length" in caplog.text
    assert max(len(f["prompt_ids"]) for f in trainer.prompt_feats) == 32
    assert max(len(f["input_ids"]) for f in trainer.train_dataset.items) <= 48
    trainer.train()
    (row,) = [h for h in trainer.state.log_history if "loss" in h]
    assert torch.isfinite(torch.tensor(row["loss"]))


def test_empty_sampled_responses_are_scored_and_trained_on(tmp_path, tiny_model):
    """A policy that ends every response at once: the responses are empty strings of length 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)

    def end_first(module, args, logits):  # the model itself puts its end-of-turn token first, always
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[tok.eos_token_id] = 100.0
        return logits + bias

    model.lm_head.register_forward_hook(end_first)
    seen: list[str] = []

    def record(prompts, completions, **kwargs):
        seen.extend(completions)
        return [float(len(c)) for c in completions]

    rows = [{"prompt": f"say something {i}", "completion": "something"} for i in range(8)]
    trainer = L3MTrainer(
        model,
        args=tiny_args(tmp_path, max_steps=2),
        train_dataset=rows,
        processing_class=tok,
        constraints=[LengthConstraint(3, "min"), FunctionConstraint(record, name="chars")],
    )
    trainer.train()
    assert len(seen) == 2 * 4 * 2 and set(seen) == {""}
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert [r["sample/mean_length"] for r in rows] == [0.0, 0.0]
    assert all(r["constraints/length_min/value"] == 3.0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


# ----------------------------------------------------------------------------------------------
# numerical safety: a bad reward or loss stops the run before the optimiser step

FLAKY_REWARD = """
import os

def flaky(prompts, completions, trainer_state=None, **kwargs):
    bad_at = os.environ.get("L3M_TEST_BAD_AT")
    if bad_at and trainer_state.global_step >= int(bad_at):
        if os.environ.get("L3M_TEST_RAISE"):
            raise ValueError("boom: the reward server is down")
        return [1.0] * (len(completions) - 1) + [float("nan")]
    return [float(len(c) % 7) for c in completions]
"""


def test_nan_reward_through_l3m_train_stops_saves_and_resumes(tmp_path, tiny_model, data_file):
    (tmp_path / "user_reward.py").write_text(FLAKY_REWARD)
    cfg = write_config(
        tmp_path,
        tiny_model,
        data_file,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        constraints=[{"kind": "reward", "function": f"{tmp_path / 'user_reward.py'}:flaky", "at_least": 2}],
    )
    proc = subprocess.run(
        [*_l3m(), "train", str(cfg)], env=_env(L3M_TEST_BAD_AT="2"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    err = proc.stderr
    assert "l3m: error: training stopped at step 2: constraint 'flaky' returned a non-finite value (nan)" in err
    assert "No optimiser step was taken" in err and "checkpoint-2, is intact" in err and "Traceback" not in err
    run = tmp_path / "run"
    dump = json.loads((run / "nonfinite-step-2.json").read_text())
    assert dump["prompt"].startswith("Repeat the word") and isinstance(dump["completion"], str)
    assert dump["last_checkpoint"].endswith("checkpoint-2")
    assert not (run / "checkpoint-3").exists() and not (run / "model.safetensors").exists()

    # the printed command resumes the run, once the reward is fixed
    command = shlex.split(err.split("resume with: ", 1)[1].strip())
    assert command[:2] == ["l3m", "train"] and command[-1] == "training.resume_from_checkpoint=true"
    proc = subprocess.run([*_l3m(), *command[1:]], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4]


def test_nan_reward_takes_no_optimiser_step(tmp_path, tiny_model, counting_rows, monkeypatch):
    monkeypatch.setenv("L3M_TEST_BAD_AT", "2")
    (tmp_path / "user_reward.py").write_text(FLAKY_REWARD)
    from l3m.constraints import load_callable

    flaky = load_callable(f"{tmp_path / 'user_reward.py'}:flaky")
    trainer = L3MTrainer(
        str(tiny_model),
        args=tiny_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=counting_rows,
        constraints=[RewardConstraint(flaky, at_least=2)],
    )
    with pytest.raises(NonFiniteError, match="non-finite value"):
        trainer.train()
    assert trainer.state.global_step == 2
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    now = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)  # the weights are those of step 2, untouched
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2}


def test_reward_function_that_raises_stops_with_samples_and_traceback(
    tmp_path, tiny_model, data_file, capsys, monkeypatch
):
    monkeypatch.setenv("L3M_TEST_BAD_AT", "1")
    monkeypatch.setenv("L3M_TEST_RAISE", "1")
    (tmp_path / "user_reward.py").write_text(FLAKY_REWARD)
    cfg = write_config(
        tmp_path,
        tiny_model,
        data_file,
        save_strategy="steps",
        save_steps=1,
        constraints=[{"kind": "reward", "function": f"{tmp_path / 'user_reward.py'}:flaky", "at_least": 2}],
    )
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "training stopped at step 1: a constraint function raised ValueError: boom" in err
    assert "checkpoint-1, is intact" in err and "training.resume_from_checkpoint=true" in err
    dump = json.loads((tmp_path / "run" / "reward-error-step-1.json").read_text())
    assert len(dump["samples"]) == 4 * 2 and all(set(s) == {"prompt", "completion"} for s in dump["samples"])
    assert "user_reward.py" in dump["traceback"] and "ValueError: boom" in dump["traceback"]


def test_non_finite_loss_raises_before_the_optimiser_step(tmp_path, tiny_model, counting_rows):
    def huge(prompts, completions, **kwargs):  # finite rewards whose weighted log-probabilities overflow float32
        return [3e38 if i % 2 else 0.0 for i in range(len(completions))]

    trainer = L3MTrainer(
        str(tiny_model),
        args=tiny_args(tmp_path, max_steps=2),
        train_dataset=counting_rows,
        constraints=[FunctionConstraint(huge)],
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="the loss is .* at step 0; no optimiser step taken"):
        trainer.train()
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------
# a reward model with a tokenizer of its own


def make_tiny_reward_model(path: Path) -> Path:
    """A randomly initialised GPT-2 sequence classifier with a 40-word WordLevel tokenizer: nothing like the
    policy's 49k-token vocabulary, so policy token ids fed to it would fail."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    words = [
        "[PAD]",
        "[UNK]",
        "Human",
        "Assistant",
        ":",
        "go",
        "Repeat",
        "the",
        "word",
        "'",
        "times",
        ".",
        "a",
        "is",
        "it",
        "of",
        "and",
        "to",
        "in",
        "I",
        "you",
        "that",
        ",",
        "!",
        "?",
        "for",
        "on",
        "with",
        "as",
        "be",
    ]
    words += [str(n) for n in range(1, 11)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=1024, num_labels=1, pad_token_id=0
    )
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_with_its_own_tokenizer(tmp_path, tiny_model, data_file):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from l3m.rewards import RewardModel, format_for_reward

    rm_path = make_tiny_reward_model(tmp_path / "rm")
    prompts = ["Repeat the word 'go' 3 times.", "Repeat the word 'go' 1 times."]
    completions = ["go go go", "well , it is a word of mine and I like it very much indeed"]
    got = RewardModel(str(rm_path))(prompts, completions)
    rm_tok = AutoTokenizer.from_pretrained(rm_path)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
    with torch.no_grad():
        want = [
            float(rm(**rm_tok(format_for_reward(rm_tok, p, c), return_tensors="pt")).logits[0, 0])
            for p, c in zip(prompts, completions)
        ]
    assert got == pytest.approx(want, abs=1e-5) and got[0] != got[1]

    cfg = write_config(
        tmp_path,
        tiny_model,
        data_file,
        max_steps=2,
        constraints=[{"kind": "reward", "model": str(rm_path), "at_least": 0.0, "name": "rm"}],
    )
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["constraints/rm/mean_raw"])) for r in rows)


# ----------------------------------------------------------------------------------------------
# infeasibility


def test_infeasible_constraint_warns_once_with_numbers_and_in_the_summary(
    tmp_path, tiny_model, data_file, capsys, caplog
):
    cfg = write_config(
        tmp_path,
        tiny_model,
        data_file,
        max_steps=6,
        infeasible_patience=3,
        constraints=[{"kind": "length", "min": 40, "max": 1000}],
    )  # 40 tokens > max_new_tokens
    with caplog.at_level(logging.WARNING, logger="l3m"):
        assert main(["train", str(cfg)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "consecutive steps" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, though it stays violated for 6 steps
    assert warnings[0].startswith("constraint 'length_min' has been violated for 3 consecutive steps (C = 32")
    assert "mu = " in warnings[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    by_name = {c["name"]: c for c in summary["constraints"]}
    assert by_name["length_min"]["warned_infeasible"] and not by_name["length_max"]["warned_infeasible"]
    w = by_name["length_min"]["infeasible_warning"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert w["step"] == 3 and w["violated_steps"] == 3 and w["value"] == 32.0
    assert w["mu"] == pytest.approx(rows[2]["mu"])
    out = " ".join(capsys.readouterr().out.split())  # the summary table may wrap lines
    assert "warning: length_min" in out and "violated for 3 consecutive steps by step 3" in out


# ----------------------------------------------------------------------------------------------
# PEFT, mixed precision, activation (gradient) checkpointing


def test_lora_bf16_checkpointing_then_merge(tmp_path, tiny_model, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = write_config(
        tmp_path,
        tiny_model,
        data_file,
        max_steps=3,
        learning_rate=5e-2,
        bf16=True,
        activation_checkpointing=True,
        constraints=[{"kind": "length", "max": 6}],
    )
    data = yaml.safe_load(cfg.read_text())
    data["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert (run / "adapter_model.safetensors").is_file() and not (run / "model.safetensors").exists()
    lora = load_file(run / "adapter_model.safetensors")
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)  # B starts at zero: gradients went through the checkpoints

    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert not any("lora" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run)
    ids = torch.tensor([[1, 500, 600, 700, 800]])
    with torch.no_grad():
        a, m, b0 = (x.eval()(ids).logits for x in (with_adapter, merged, base))
    assert torch.allclose(a, m, atol=1e-4)
    assert not torch.allclose(m, b0, atol=1e-3)


def test_merge_refuses_a_pickled_adapter_and_a_non_adapter(tmp_path, tiny_model, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    (adapter / "adapter_model.bin").write_bytes(b"not loaded")
    assert main(["merge", str(adapter), str(tmp_path / "out")]) == 1
    assert "holds no adapter_model.safetensors" in capsys.readouterr().err
    assert main(["merge", str(tiny_model), str(tmp_path / "out")]) == 1
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_checkpointing_still_generates_with_the_cache(
    tmp_path, tiny_model, counting_rows, precision
):
    args = tiny_args(tmp_path, max_steps=2, activation_checkpointing=True, **{precision: True})
    trainer = L3MTrainer(
        str(tiny_model), args=args, train_dataset=counting_rows, constraints=[LengthConstraint(4, "max")]
    )
    calls: list[tuple[bool, int]] = []  # (training mode, tokens fed) per forward call of the transformer body

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        calls.append((module.training, x.shape[1]))

    trainer.model.model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer.train()
    inner = trainer.model
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing
    sampling = [n for training, n in calls if not training]
    # each generate call feeds the prompt once, then one new token per step from the KV cache
    assert sampling.count(1) >= 2 * (args.max_new_tokens - 1) and sum(n > 1 for n in sampling) == 2
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


# ----------------------------------------------------------------------------------------------
# security: no remote code, no pickles


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_source_loads_safetensors_only_and_never_trusts_remote_code_by_itself():
    problems = []
    paths = sorted(SRC.rglob("*.py"))
    assert SRC / "experimental" / "__init__.py" in paths  # subpackages are checked too
    for path in paths:
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            f = call.func
            where = f"{path.relative_to(SRC)}:{call.lineno}"
            trust = _kw(call, "trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                problems.append(f"{where}: trust_remote_code=True")
            if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", None) == "torch":
                w = _kw(call, "weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if (
                isinstance(f, ast.Attribute)
                and f.attr in ("load", "loads")
                and getattr(f.value, "id", None) in ("pickle", "dill", "joblib")
            ):
                problems.append(f"{where}: {f.value.id}.{f.attr}")
            if isinstance(f, ast.Attribute) and f.attr == "from_pretrained":
                owner = getattr(f.value, "id", "")
                if "Model" in owner and owner != "PeftModel":  # weights: safetensors only (or the GGUF converter)
                    safe = _kw(call, "use_safetensors")
                    if not (isinstance(safe, ast.Constant) and safe.value is True) and _kw(call, "gguf_file") is None:
                        problems.append(f"{where}: {owner}.from_pretrained without use_safetensors=True")
    assert not problems, problems


def test_transformers_and_peft_load_checkpoint_states_with_weights_only():
    """On resume, transformers reads optimizer.pt, scheduler.pt and rng_state.pth with torch.load: weights_only."""
    from peft.utils import save_and_load
    from transformers import Trainer

    for method in ("_load_rng_state", "_load_optimizer_and_scheduler", "_load_scaler", "_load_from_checkpoint"):
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(Trainer, method))))
        loads = [
            c
            for c in _calls(tree)
            if isinstance(c.func, ast.Attribute)
            and c.func.attr == "load"
            and getattr(c.func.value, "id", None) == "torch"
        ]
        assert all(getattr(_kw(c, "weights_only"), "value", None) is True for c in loads), method
    assert inspect.signature(save_and_load.torch_load).parameters["weights_only"].default is True


def test_pickled_weights_and_remote_code_are_never_run(tmp_path, tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    from l3m.models import load_causal_lm, load_tokenizer
    from l3m.rewards import RewardModel

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    AutoConfig.from_pretrained(tiny_model).save_pretrained(pickled)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(pickled)
    torch.save({"model.embed_tokens.weight": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load_causal_lm(str(pickled))
    with pytest.raises(OSError):
        RewardModel(str(pickled))(["q"], ["a"])
    assert not marker.exists()

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    model = load_causal_lm(str(remote))  # the config's auto_map is ignored: the built-in Llama class is used
    load_tokenizer(str(remote))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# the GPU check script, in its CPU mode


def test_gpu_check_script_runs_tiny_on_cpu(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [str(script), "--tiny", "--steps", "1", "--out", str(out)],
        env=_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step time" in proc.stdout and "generation share" in proc.stdout and "peak memory" in proc.stdout
    res = json.loads(out.read_text())
    assert res["timed_steps"] == 1 and res["step_seconds"] > 0 and 0 < res["generation_share"] < 1
    assert res["sampled_tokens_per_second"] > 0 and res["peak_memory_gib"] > 0 and res["activation_checkpointing"]


def _convert_slowly_and_count(src, out):
    """Stands in for the GGUF conversion (a unit test's edge): slow enough that racing callers overlap."""
    import time

    time.sleep(0.5)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    with open(out.parent / "conversions.log", "a") as fh:
        fh.write(f"{os.getpid()}\n")


def _default_model_path_in_child(queue):
    from l3m.models import default_model_path

    queue.put(str(default_model_path()))


def test_default_model_is_converted_once_when_processes_race(tmp_path, monkeypatch):
    """Processes started side by side on an empty cache: one converts, the others wait and reuse its copy."""
    import multiprocessing

    from l3m import models

    monkeypatch.setenv("L3M_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "_convert_gguf", _convert_slowly_and_count)
    ctx = multiprocessing.get_context("fork")  # the children inherit the patched module
    queue = ctx.Queue()
    procs = [ctx.Process(target=_default_model_path_in_child, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    paths = {queue.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / models.DEFAULT_MODEL)}
    assert len((tmp_path / "conversions.log").read_text().split()) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".convert-")) == []
