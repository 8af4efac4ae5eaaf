"""Checkpoints that are never half-written, and the trainer state that travels with them.

transformers writes a checkpoint into ``checkpoint-N`` directly, so a process killed while saving leaves a
half-written folder that ``get_last_checkpoint`` takes for the latest. :class:`AtomicCheckpointMixin` writes it into
``tmp-checkpoint-N/checkpoint-N`` and renames it only once everything is in it (model, optimiser, scheduler, the RNG
states of every process, the trainer state and the trainer's own files); ``tmp-`` folders match neither
``get_last_checkpoint`` nor checkpoint rotation. On resume the trainer's own state is restored and the rows of
``metrics.jsonl`` logged after the checkpoint are dropped (the resumed run logs those steps again).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STATE_FILE = "l3m_state.json"
METRICS_FILE = "metrics.jsonl"
STAGING_PREFIX = "tmp-"


def write_json(path: str, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so that a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def truncate_metrics(path: str, step: int) -> int:
    """Drop the rows of a metrics.jsonl logged after ``step``; returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
        if row.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


class AtomicCheckpointMixin:
    """For a ``transformers.Trainer`` subclass: atomic checkpoints carrying ``state_dict()`` as ``l3m_state.json``.

    The subclass provides ``checkpoint_state() -> dict`` (what to save), ``restore_state(saved: dict, checkpoint)``
    (what to do with it on resume) and may override ``save_extra(folder)`` for more files.
    """

    def checkpoint_state(self) -> dict:
        return {}

    def restore_state(self, saved: dict | None, checkpoint: str) -> None:
        pass

    def save_extra(self, folder: str) -> None:
        pass

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        staging = getattr(self, "_staging_name", None)
        return os.path.join(run_dir, staging) if staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_name = STAGING_PREFIX + name
        try:
            super()._save_checkpoint(model, trial)  # writes into `staged`; rotation there finds one checkpoint: a no-op
        finally:
            self._staging_name = None
        if self.args.should_save:
            write_json(os.path.join(staged, STATE_FILE), self.checkpoint_state())
            self.save_extra(staged)
            best = self.state.best_model_checkpoint
            if best and os.path.abspath(best).startswith(os.path.abspath(staging_root) + os.sep):
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if self.args.should_save:
            if os.path.exists(final):  # an older copy of this step, from a run resumed before it
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # transformers calls this once on resume with every backend (DDP, DeepSpeed, FSDP), unlike
        # _load_from_checkpoint, which DeepSpeed bypasses: the trainer's own state is restored here
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        saved = None
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
        self.restore_state(saved, checkpoint)
        if not self.is_world_process_zero():
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            step = json.load(f)["global_step"]
        truncate_metrics(os.path.join(self.args.output_dir, METRICS_FILE), step)
        for leftover in os.listdir(self.args.output_dir):
            if leftover.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR):
                logger.warning("removing %s, a checkpoint left half-written by an earlier run", leftover)
                shutil.rmtree(os.path.join(self.args.output_dir, leftover), ignore_errors=True)
