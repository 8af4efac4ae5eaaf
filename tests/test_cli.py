import json
import os
import subprocess
import sys

import pytest
import yaml

from l3m.cli import main


def write_cfg(tmp_path, cfg):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    return str(f)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"constraints": [{"kind": "lenght", "max": 5}]}, "unknown constraint kind 'lenght' (did you mean 'length'"),
        ({"constraints": [{"kind": "length", "min": 9, "max": 5}]}, "min (9) is greater than max (5)"),
        ({"data": {"train": "missing.jsonl"}}, "data file 'missing.jsonl' does not exist"),
        ({"training": {"max_step": 5}}, "unknown key 'max_step' (did you mean 'max_steps'"),
        ({"modle": "x"}, "did you mean 'model'"),
        ({"data": {"heldout_seed": "one"}}, "data.heldout_seed must be an integer, got 'one'"),
        ({"model": "/no/such/model/dir"}, "model directory '/no/such/model/dir' does not exist"),
        # the method is a top-level key, and each method takes the fields of its own config class
        ({"method": "ppo"}, "method must be one of l3m, minimax, experimental, got 'ppo'"),
        ({"training": {"method": "minimax"}}, "training.method: the method is a top-level key (method: minimax)"),
        ({"training": {"barrier_s_power": 1}}, "training: unknown key 'barrier_s_power'"),
        ({"training": {"beta": 0.1}}, "training: unknown key 'beta'"),
        ({"method": "minimax", "training": {"bta": 0.1}}, "unknown key 'bta' (did you mean 'beta'"),
        ({"method": "experimental", "training": {"average_tial": 0.5}}, "(did you mean 'average_tail'"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, data_file, capsys, patch, message):
    cfg = {"model": "default", "data": {"train": data_file}, "training": {"output_dir": str(tmp_path / "o")}}
    if "data" in patch and "train" not in patch["data"]:
        patch = {"data": {"train": data_file, **patch["data"]}}
    cfg.update(patch)
    assert main(["train", write_cfg(tmp_path, cfg)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_data_row_names_file_and_line(tmp_path, capsys, tiny_model):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q2"}\n')
    cfg = {"model": str(tiny_model), "data": {"train": str(f)}, "training": {"output_dir": str(tmp_path / "o")}}
    assert main(["train", write_cfg(tmp_path, cfg)]) == 1
    assert "rows.jsonl:2" in capsys.readouterr().err


def test_unknown_hub_model_fails_before_loading(tmp_path, data_file):
    cfg = {
        "model": "no-such-org-l3m/no-such-model",
        "data": {"train": data_file},
        "training": {"output_dir": str(tmp_path / "o")},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "l3m.cli", "train", write_cfg(tmp_path, cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "model 'no-such-org-l3m/no-such-model' was not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_overrides_and_scientific_numbers():
    from l3m.runconfig import apply_overrides, fix_numbers

    cfg = fix_numbers(apply_overrides({"training": {}}, ["training.learning_rate=5e-5", "training.max_steps=3"]))
    assert cfg["training"] == {"learning_rate": 5e-5, "max_steps": 3}


def test_heldout_split_stays_put_when_the_training_seed_changes(tmp_path, tiny_model, counting_rows):
    from l3m.cli import build_run
    from l3m.runconfig import load_run_config

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))

    def heldout(**kw):
        cfg = {
            "model": str(tiny_model),
            "data": {"train": str(data), "heldout_fraction": 0.25, **kw.pop("data", {})},
            "training": {"output_dir": str(tmp_path / "o"), "use_cpu": True, **kw},
        }
        return [e.prompt_text for e in build_run(load_run_config(write_cfg(tmp_path, cfg), []))["heldout"]]

    assert heldout(seed=0) == heldout(seed=1)
    assert heldout(seed=1, data={"heldout_seed": 1}) != heldout(seed=1)


def test_method_picks_the_config_and_trainer_classes(tmp_path, tiny_model, counting_rows):
    """``method:`` at the top of a run config chooses the classes; ``training:`` sets the fields of that class."""
    from l3m import L3MConfig, L3MTrainer
    from l3m.cli import build_run
    from l3m.experimental import ExperimentalL3MConfig, ExperimentalL3MTrainer
    from l3m.minimax import MinimaxConfig, MinimaxTrainer
    from l3m.runconfig import load_run_config

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))

    def run(method, **training):
        cfg = {
            "model": str(tiny_model),
            "data": {"train": str(data)},
            "training": {"output_dir": str(tmp_path / "o"), "use_cpu": True, **training},
        }
        if method is not None:
            cfg["method"] = method
        return build_run(load_run_config(write_cfg(tmp_path, cfg), []))

    plain = run(None)
    assert plain["trainer_class"] is L3MTrainer and type(plain["args"]) is L3MConfig
    assert run("l3m")["trainer_class"] is L3MTrainer
    mm = run("minimax", beta=0.2, multiplier_update="log")
    assert mm["trainer_class"] is MinimaxTrainer and isinstance(mm["args"], MinimaxConfig)
    assert (mm["args"].beta, mm["args"].multiplier_update) == (0.2, "log")
    exp = run("experimental", barrier_s_power=1, average_tail=0.25)
    assert exp["trainer_class"] is ExperimentalL3MTrainer and isinstance(exp["args"], ExperimentalL3MConfig)
    assert (exp["args"].barrier_s_power, exp["args"].average_tail) == (1, 0.25)
    # a value the class refuses is a user error naming the section
    from l3m.errors import L3MUserError

    with pytest.raises(L3MUserError, match="training: .*barrier_s_power must be > 0"):
        run("experimental", barrier_s_power=0)
