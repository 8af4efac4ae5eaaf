"""Exact resume after ``kill -9``, and atomic checkpoints.

A run is killed with SIGKILL (no chance to clean up), once in the middle of a step and once in the middle of
writing a checkpoint; ``l3m train CFG training.resume_from_checkpoint=true`` then finishes it. Every metric of
every step, and the final weights, must equal those of an uninterrupted run with the same seed (CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

STEPS, SAVE_EVERY = 8, 3
IGNORED = ("time/", "train_runtime", "train_samples_per_second", "train_steps_per_second")

# A user reward function: the number of vowels in the response. With L3M_TEST_HANG_AT set, it stops for good once
# that many steps are done (after touching a marker file), so the test knows when to kill the process.
REWARD = """
import os, time, pathlib

def vowels(prompts, completions, trainer_state=None, **kwargs):
    hang = os.environ.get("L3M_TEST_HANG_AT")
    if hang and trainer_state.global_step >= int(hang):
        pathlib.Path(os.environ["L3M_TEST_MARKER"]).write_text(str(trainer_state.global_step))
        time.sleep(600)
    return [float(sum(ch in "aeiou" for ch in c.lower())) for c in completions]
"""

# Runs `l3m train` with transformers' RNG-state writer stalled inside the save of checkpoint-6: the model and the
# optimiser are written by then, the RNG state and the trainer state are not.
HANG_IN_SAVE = """
import os, pathlib, sys, time
from l3m.trainer import L3MTrainer

original = L3MTrainer._save_rng_state

def stalled(self, output_dir):
    if self.state.global_step == 6:
        pathlib.Path(os.environ["L3M_TEST_MARKER"]).write_text(output_dir)
        time.sleep(600)
    return original(self, output_dir)

L3MTrainer._save_rng_state = stalled
from l3m.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _l3m() -> list[str]:
    exe = shutil.which("l3m", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "l3m.cli"]


def _config(tmp_path: Path, tiny_model: Path, counting_rows: list[dict], out: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))
    (tmp_path / "user_reward.py").write_text(REWARD)
    cfg = {
        "model": str(tiny_model),
        "data": {"train": str(data)},
        "constraints": [
            {"kind": "length", "max": 6},
            {"kind": "reward", "function": f"{tmp_path / 'user_reward.py'}:vowels", "at_least": 18},
        ],
        "training": {
            "output_dir": str(out),
            "max_steps": STEPS,
            "save_steps": SAVE_EVERY,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_new_tokens": 10,
            "learning_rate": 1e-3,
            "use_cpu": True,
            "seed": 0,
            "disable_tqdm": True,
            "constraint_ema": 0.5,
            "infeasible_patience": 2,
        },
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kill_when_marked(cmd: list[str], marker: Path, env: dict, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (status {proc.returncode}) before reaching the kill point:\n"
                f"{proc.stderr.read()[-3000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run did not reach the kill point in time")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _assert_same_run(got: Path, want: Path) -> None:
    a, b = _steps(got), _steps(want)
    assert [r["step"] for r in a] == list(range(1, STEPS + 1)), "each step logged exactly once"
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        keys = {k for k in rb if not k.startswith(IGNORED)}
        assert keys == {k for k in ra if not k.startswith(IGNORED)}
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-6), (ra["step"], k, ra[k], rb[k])
    wa, wb = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
    sa, sb = (json.loads((d / "l3m_state.json").read_text()) for d in (got, want))
    assert sa["ema"] == pytest.approx(sb["ema"], rel=1e-6) and sa["warned"] == sb["warned"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, counting_rows) -> Path:
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    cfg = _config(tmp, tiny_model, counting_rows, out)
    proc = subprocess.run([*_l3m(), "train", str(cfg)], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = _steps(out)
    # the run exercises what a resume must restore: a moving EMA estimate and a non-trivial multiplier
    assert len({r["constraints/vowels/value"] for r in steps}) == STEPS
    assert max(r["constraints/length_max/lambda"] for r in steps) > 0.1
    return out


def test_kill_9_mid_step_then_resume_equals_uninterrupted_run(tmp_path, tiny_model, counting_rows, reference):
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_model, counting_rows, out)
    marker = tmp_path / "hung"
    _kill_when_marked([*_l3m(), "train", str(cfg)], marker, _env(L3M_TEST_HANG_AT="5", L3M_TEST_MARKER=str(marker)))
    # killed while sampling for step 6: checkpoint-3 is the latest, and steps 4-5 were logged after it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert [r["step"] for r in _steps(out)] == [1, 2, 3, 4, 5]

    proc = subprocess.run(
        [*_l3m(), "train", str(cfg), "training.resume_from_checkpoint=true"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(out, reference)


def test_kill_9_while_saving_a_checkpoint_never_publishes_it(tmp_path, tiny_model, counting_rows, reference):
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_model, counting_rows, out)
    wrapper = tmp_path / "hang_in_save.py"
    wrapper.write_text(HANG_IN_SAVE)
    marker = tmp_path / "saving"
    _kill_when_marked([sys.executable, str(wrapper), str(cfg)], marker, _env(L3M_TEST_MARKER=str(marker)))
    # the half-written checkpoint lies under its temporary name, which transformers never takes for a checkpoint
    half = Path(marker.read_text())
    assert half.parent.name == "tmp-checkpoint-6" and (half / "model.safetensors").is_file()
    assert not (half / "rng_state.pth").exists()
    from transformers.trainer_utils import get_last_checkpoint

    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert json.loads((out / "checkpoint-3" / "l3m_state.json").read_text())["global_step"] == 3

    proc = subprocess.run(
        [*_l3m(), "train", str(cfg), "training.resume_from_checkpoint=true"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("tmp-checkpoint-*")), "the half-written checkpoint is cleaned up on resume"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    for ckpt in ("checkpoint-3", "checkpoint-6", "checkpoint-8"):
        assert {
            "model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
            "l3m_state.json",
        } <= {p.name for p in (out / ckpt).iterdir()}
    _assert_same_run(out, reference)


def test_truncate_metrics_drops_rows_after_the_step_and_lines_cut_short(tmp_path):
    from l3m.checkpointing import METRICS_FILE, STATE_FILE, truncate_metrics

    assert (METRICS_FILE, STATE_FILE) == ("metrics.jsonl", "l3m_state.json")  # the names the docs give
    path = tmp_path / METRICS_FILE
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # killed mid-line
    assert truncate_metrics(str(path), 3) == 3  # steps 4 and 5, and the broken line
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:4]
    assert truncate_metrics(str(path), 3) == 0 and truncate_metrics(str(tmp_path / "none.jsonl"), 3) == 0
    assert not list(tmp_path.glob("*.tmp"))
