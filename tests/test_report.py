import json

import pytest
import yaml

from l3m.cli import main
from l3m.errors import L3MUserError
from l3m.evaluation import length_stats
from l3m.report import (
    against_first,
    averaged_steps,
    load_evaluations,
    make_report,
    moving_average,
    read_metrics,
    run_barrier_s_power,
)


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, talking_model, counting_rows):
    """A 6-step constrained run of the tiny model through `l3m train` with the experimental options (metrics.jsonl,
    summary.json, the model card)."""
    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in counting_rows))
    cfg = {
        "model": str(talking_model),
        "method": "experimental",
        "data": {"train": str(data)},
        "constraints": [{"kind": "length", "min": 2, "max": 6, "name": "len"}],
        "training": {
            "output_dir": str(tmp / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_new_tokens": 8,
            "save_strategy": "no",
            "use_cpu": True,
            "disable_tqdm": True,
            "learning_rate": 1e-3,
            "average_tail": 0.5,  # the saved model averages the last 3 steps: the report marks them
            "barrier_s_power": 1.0,  # the report draws this barrier beside the paper's
        },
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return tmp / "run"


def test_read_metrics_has_every_step(tiny_run):
    rows = read_metrics(tiny_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all("constraints/len_min/lambda" in r and "mu" in r for r in rows)


def _fake_eval(name, lengths, rng=None, ppl=(1.0, 0.2)):
    return {
        "model": name,
        "k": 2,
        "n_prompts": len(lengths) // 2,
        "max_new_tokens": 64,
        "range": rng,
        "task_logppl": {"n": 10, "mean": ppl[0], "std": ppl[1]},
        "lengths": {**length_stats(lengths, 64), "values": lengths},
        "constraints": [],
    }


def test_report_cli_writes_pngs_and_markdown(tiny_run, tmp_path, capsys):
    ev = tmp_path / "ev.json"
    ev.write_text(
        json.dumps(
            {
                "results": [
                    _fake_eval("sft", [10, 20, 30, 40] * 5),
                    _fake_eval("l3m", [5, 8, 9, 12] * 5, [5, 15], (1.05, 0.25)),
                ]
            }
        )
    )
    out = tmp_path / "rep"
    assert main(["report", str(tiny_run), "--eval", str(ev), "-o", str(out), "--title", "tiny"]) == 0
    figures = ("training_curves.png", "barrier.png", "lengths_perplexity.png", "length_histograms.png")
    for name in figures:
        assert _is_png(out / name), name
    md = (out / "report.md").read_text()
    assert md.startswith("# tiny")
    for name in figures:
        assert f"]({name})" in md
    assert md.count("*Figure") == 4  # a caption for each figure
    assert "| sft |" in md and "| l3m |" in md and "1.050 ± 0.250" in md
    assert "report written to" in capsys.readouterr().out


def test_report_compares_each_model_with_the_first_reference_by_reference(tmp_path):
    sft = _fake_eval("sft", [10, 12] * 5, ppl=(1.0, 0.5))
    l3m = _fake_eval("l3m", [20, 22] * 5, [20, 30], (1.1, 0.5))
    sft["task_logppl"]["per_example"] = [0.5, 1.5, 1.0, 1.0]
    l3m["task_logppl"]["per_example"] = [0.6, 1.7, 1.0, 1.1]  # differences 0.1, 0.2, 0, 0.1
    other = _fake_eval("other", [5, 6] * 5, ppl=(0.9, 0.5))  # no per-example scores: a ratio, no paired difference
    rows = against_first([sft, l3m, other])
    assert [r["model"] for r in rows] == ["l3m", "other"] and all(r["against"] == "sft" for r in rows)
    assert rows[0]["ratio"] == pytest.approx(1.1) and rows[0]["paired_diff"] == pytest.approx(0.1)
    assert rows[0]["paired_se"] == pytest.approx((0.02 / 3 / 4) ** 0.5)  # sample variance 0.02/3, over n = 4
    assert rows[1]["ratio"] == pytest.approx(0.9) and "paired_diff" not in rows[1]
    assert against_first([sft]) == []
    md = make_report([], [sft, l3m, other], tmp_path).read_text()
    assert "| l3m | 1.100 (+10.0%) | +0.100 ± 0.041 |" in md and "| other | 0.900 (-10.0%) | — |" in md
    assert "change against the first model" in md
    assert _is_png(tmp_path / "lengths_perplexity.png")


def test_report_without_evaluations_still_plots_training_and_barrier(tiny_run, tmp_path):
    path = make_report([tiny_run], [], tmp_path)
    assert _is_png(tmp_path / "training_curves.png") and _is_png(tmp_path / "barrier.png")
    assert not (tmp_path / "lengths_perplexity.png").exists() and not (tmp_path / "length_histograms.png").exists()
    assert "Training curves" in path.read_text()


def test_report_user_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(L3MUserError, match="metrics.jsonl"):
        read_metrics(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(L3MUserError, match="not JSON"):
        load_evaluations([bad])


def test_moving_average_is_the_mean_of_the_last_values():
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0, 9.0], window=5) == [2.0, 3.0, 5.0]  # fewer values at the start


def test_report_marks_the_averaged_steps(tiny_run, tmp_path):
    assert json.loads((tiny_run / "summary.json").read_text())["weights_averaged"] == 3
    assert averaged_steps(tiny_run) == 3
    assert averaged_steps(tmp_path) == 0  # no summary.json: the last iterate
    md = make_report([tiny_run], [], tmp_path / "rep").read_text()
    assert "Grey band: the last steps, whose weights the saved model averages" in md


def test_barrier_figure_draws_the_runs_barrier_when_it_is_not_the_papers(tmp_path):
    paper = make_report([], [], tmp_path / "p").read_text()
    own = make_report([], [], tmp_path / "o", barrier_s_power=1.0).read_text()
    assert "s = μ^1" not in paper and "Dashed" not in paper
    assert "s = μ^1 (`barrier_s_power`)" in own and "= 1 at every μ" in own
    # the figure itself differs: the dashed curves are drawn
    assert (tmp_path / "p" / "barrier.png").read_bytes() != (tmp_path / "o" / "barrier.png").read_bytes()


def test_barrier_figure_takes_s_power_from_the_runs_configs(tiny_run, tmp_path):
    """An experimental run's barrier_s_power comes from its saved config (the model card); a run of the core
    method, or one with no card, has the paper's s = mu^2."""
    import shutil

    from l3m.model_card import read_card, write_model_card

    assert read_card(tiny_run)[0]["l3m"]["method"] == "experimental"
    assert run_barrier_s_power(tiny_run) == 1.0
    core = tmp_path / "core_run"
    core.mkdir()
    shutil.copy(tiny_run / "metrics.jsonl", core / "metrics.jsonl")
    assert run_barrier_s_power(core) == 2.0  # no card
    write_model_card(core, {"method": "l3m", "training": {"steps": 6, "mu_init": 1.0}})
    assert run_barrier_s_power(core) == 2.0
    own = make_report([tiny_run], [], tmp_path / "own").read_text()
    assert "Dashed: the barrier these runs used, s = μ^1 (`barrier_s_power`)" in own and "= 1 at every μ" in own
    paper = make_report([core], [], tmp_path / "paper").read_text()
    assert "Dashed" not in paper and "s = μ^1" not in paper
    both = make_report([core, tiny_run], [], tmp_path / "both").read_text()
    assert f"Dashed: the barrier runs `{tiny_run.name}` used, s = μ^1" in both
    assert (tmp_path / "own" / "barrier.png").read_bytes() == (tmp_path / "both" / "barrier.png").read_bytes()
    assert (tmp_path / "own" / "barrier.png").read_bytes() != (tmp_path / "paper" / "barrier.png").read_bytes()
    # an explicit power overrides the runs'
    assert "Dashed" not in make_report([tiny_run], [], tmp_path / "set", barrier_s_power=2.0).read_text()
