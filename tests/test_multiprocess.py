"""Two processes (gloo on CPU) give the same C_i, lambda_i and loss as one process on the same global batch.

One process with ``per_device_train_batch_size=4, gradient_accumulation_steps=2`` and two processes with
``per_device_train_batch_size=4`` see the same global batch of 8 prompts each step, dealt out in the same order.
Sampling is seeded per global micro-batch (``L3MTrainer._micro_index``), so both draw the same responses; the
constraint sums are all-reduced, so both compute the same C_i and lambda_i; DDP averages the gradients as
accumulation does, so the models stay the same step after step.

This file is also the worker script: ``accelerate launch ... tests/test_multiprocess.py worker MODEL OUT BS ACCUM``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

STEPS = 4
COMPARED = [
    "loss",
    "task_nll",
    "grad_norm",
    "barrier",
    "objective",
    "mu",
    "sample/mean_length",
    "sample/mean_logprob",
    "constraints/length_max/value",
    "constraints/length_max/lambda",
    "constraints/length_max/mean_raw",
    "constraints/vowels/value",
    "constraints/vowels/lambda",
    "constraints/vowels/mean_raw",
]


def vowels(prompts, completions, **kwargs):
    """A reward that varies from sample to sample even for a random model: the number of vowels in the response."""
    return [float(sum(ch in "aeiou" for ch in c.lower())) for c in completions]


def _worker(model: str, out: str, bs: int, accum: int) -> None:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    from l3m import L3MConfig, L3MTrainer, LengthConstraint, RewardConstraint

    rows = [{"instruction": f"Repeat the word 'go' {n} times.", "output": " ".join(["go"] * n)} for n in range(1, 25)]
    args = L3MConfig(
        output_dir=out,
        max_steps=STEPS,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=accum,
        num_generations=2,
        max_new_tokens=10,
        learning_rate=1e-3,
        constraint_ema=0.5,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        report_to="none",
        eval_strategy="steps",
        eval_steps=2,
        eval_prompts=5,  # not a multiple of the processes: one process samples a repeat, which is dropped
    )
    constraints = [LengthConstraint(4, "max"), RewardConstraint(vowels, at_least=18.0)]

    class PerRank(TrainerCallback):
        """Every process writes the C_i and lambda_i it used, to check that all processes agree."""

        def on_step_end(self, args, state, control, **kwargs):
            with open(os.path.join(out, f"rank{trainer.accelerator.process_index}.jsonl"), "a") as f:
                row = {c.name: [c.state.value, c.state.lam] for c in trainer.constraints}
                row["heldout"] = [[c["value"] for c in h["constraints"]] for h in trainer.heldout.history]
                f.write(json.dumps({"step": state.global_step, **row}) + "\n")

    trainer = L3MTrainer(
        model, args=args, train_dataset=rows * 2, eval_dataset=rows[:5], constraints=constraints, callbacks=[PerRank()]
    )
    trainer.train()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }


_EVAL = "eval/constraints/length_max/value"


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def test_two_processes_match_one_process(tmp_path, tiny_model):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is not installed beside this Python"
    one, two = tmp_path / "one", tmp_path / "two"
    me = str(Path(__file__).resolve())
    single = subprocess.run(
        [sys.executable, me, "worker", str(tiny_model), str(one), "4", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        me,
        "worker",
        str(tiny_model),
        str(two),
        "4",
        "1",
    ]
    multi = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "MULTI_CPU" in (two / "distributed.txt").read_text()  # it really ran as two gloo processes

    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in COMPARED:
            assert _close(ra[key], rb[key]), (ra["step"], key, ra[key], rb[key])
    # the constraints are active: lambda is not negligible, and C_i moves from step to step
    assert max(r["constraints/vowels/lambda"] for r in a) > 0.1
    assert len({r["constraints/vowels/value"] for r in a}) == STEPS

    # both processes used the same C_i and lambda_i at every step: bit for bit, as they come from one all-reduce
    r0 = (two / "rank0.jsonl").read_text().splitlines()
    r1 = (two / "rank1.jsonl").read_text().splitlines()
    assert len(r0) == STEPS and r0 == r1
    # the held-out checks ran at steps 2 and 4 on all 5 prompts (each once), and every process holds their result
    for out in (one, two):
        evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
        checks = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if _EVAL in r]
        assert [r["step"] for r in evals] == [r["step"] for r in checks] == [2, 4]
        assert all(r[f"{_EVAL[:-6]}/ci_low"] <= r[_EVAL] <= r[f"{_EVAL[:-6]}/ci_high"] for r in checks)
    assert [len(json.loads(x)["heldout"]) for x in r0] == [0, 0, 1, 1]  # a step's check runs after its step ends


def test_two_process_cli_run_checkpoints_and_resumes_exactly(tmp_path, tiny_model, counting_rows):
    """``accelerate launch -m l3m.cli train``: checkpoints hold every process's RNG state and the barrier state, and
    a two-process resume from checkpoint-2 logs the same steps 3-4 as the run that went through."""
    import yaml

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))
    run = tmp_path / "run"
    cfg = {
        "model": str(tiny_model),
        "data": {"train": str(data)},
        "constraints": [{"kind": "reward", "function": f"{__name__}:vowels", "at_least": 18}],
        "training": {
            "output_dir": str(run),
            "max_steps": 4,
            "save_steps": 2,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_new_tokens": 10,
            "learning_rate": 1e-3,
            "constraint_ema": 0.5,
            "use_cpu": True,
            "disable_tqdm": True,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), _env()["PYTHONPATH"]])}

    def launch(*extra):
        cmd = [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "l3m.cli",
            "train",
            str(path),
            *extra,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch()
    first = _rows(run)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        names = {p.name for p in (run / ckpt).iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "l3m_state.json"} <= names
    assert not list(run.glob("tmp-checkpoint-*"))

    shutil.rmtree(run / "checkpoint-4")
    launch("training.resume_from_checkpoint=true")
    again = _rows(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for ra, rb in zip(first, again):
        for key in ("loss", "task_nll", "grad_norm", "constraints/vowels/value", "constraints/vowels/lambda"):
            assert ra[key] == rb[key], (ra["step"], key)


def test_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in folder.glob("*.yaml")}
    assert kinds == {
        "ddp": "DistributedType.MULTI_GPU",
        "deepspeed_zero2": "DistributedType.DEEPSPEED",
        "deepspeed_zero3": "DistributedType.DEEPSPEED",
        "fsdp": "DistributedType.FSDP",
    }


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _model, _out, _bs, _accum = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    os.makedirs(_out, exist_ok=True)
    _worker(_model, _out, _bs, _accum)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        Path(_out, "distributed.txt").write_text(f"{state.distributed_type} {state.num_processes}\n")
    # leave the process group before exiting: left to interpreter shutdown, gloo's threads sometimes abort a
    # process ("terminate called without an active exception") on a loaded machine after all the work is done
    from l3m.cli import _leave_process_group

    _leave_process_group()  # as l3m's CLI leaves it: the group destroyed, no native teardown for gloo to abort in
