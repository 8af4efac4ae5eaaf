"""The compact training console (no model is loaded)."""

from transformers import TrainerControl, TrainerState

from l3m.console import CompactLogCallback, QuietProgressCallback, format_log_line, postfix_from_logs

LOGS = {
    "loss": 1.5,
    "grad_norm": 2.0,
    "learning_rate": 1e-5,
    "mu": 0.05,
    "task_nll": 1.2341,
    "constraints/length_max/value": -0.39,
    "constraints/length_max/lambda": 0.08,
    "constraints/length_max/mean_raw": 28.13,
    "constraints/length_max/holds": 1.0,
    "constraints/polite/value": 0.12,
    "constraints/polite/lambda": 1.7,
    "constraints/polite/mean_raw": 0.38,
    "constraints/polite/holds": 0.0,
    "epoch": 0.5,
}


def state(step=12, max_steps=16, main=True):
    s = TrainerState(max_steps=max_steps, global_step=step)
    s.is_world_process_zero = main
    return s


def test_format_log_line():
    line = format_log_line(LOGS, 12, 16)
    assert line == (
        "step 12/16 | mu 0.05 | task 1.234 | length_max: 28.1 (C -0.39, λ 0.08) ok | polite: 0.38 (C 0.12, λ 1.7) NO"
    )


def test_format_log_line_falls_back_to_loss_and_reads_eval():
    line = format_log_line({"loss": 2.0, "constraints/length_max/holds": 0.5}, 3, 10)
    assert line == "step 3/10 | loss 2 | length_max: ok 50% of steps"
    ev = {
        "eval_loss": 1.1,
        "eval/constraints/length_max/value": -0.2,
        "eval/constraints/length_max/ci_low": -0.3,
        "eval/constraints/length_max/ci_high": -0.1,
        "eval/constraints/length_max/holds": 1.0,
        "eval/constraints/length_max/violated": 0.0,
    }
    assert (
        format_log_line(ev, 16, 16) == "step 16/16 | eval loss 1.1 | eval length_max: (C -0.2, 95% [-0.3, -0.1]) holds"
    )


def test_postfix_from_logs():
    assert postfix_from_logs(LOGS) == {"mu": "0.05", "length_max": "ok 28.1", "polite": "NO 0.38"}


def test_compact_callback_writes_one_line_on_main_process_only():
    lines = []
    cb = CompactLogCallback(write=lines.append)
    cb.on_log(None, state(main=False), TrainerControl(), logs=dict(LOGS))
    assert lines == []
    cb.on_log(None, state(), TrainerControl(), logs=dict(LOGS))
    assert lines == [format_log_line(LOGS, 12, 16)]


def test_compact_callback_default_writer(capsys):
    CompactLogCallback().on_log(None, state(), TrainerControl(), logs=dict(LOGS))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("step 12/16 | mu 0.05")


def test_quiet_progress_does_not_print_the_logs_dict(capsys):
    cb = QuietProgressCallback()
    st, ctl = state(step=0), TrainerControl()
    cb.on_train_begin(None, st, ctl)
    st.global_step = 1
    cb.on_step_end(None, st, ctl)
    cb.on_log(None, st, ctl, logs=dict(LOGS))
    assert cb.training_bar.postfix and "length_max=ok 28.1" in cb.training_bar.postfix
    cb.on_train_end(None, st, ctl)
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "task_nll" not in printed and "{'" not in printed
    assert cb.training_bar is None


def test_quiet_progress_status_function():
    calls = []

    def status():
        calls.append(1)
        return {"mu": "0.5", "length_max": "NO 41"}

    cb = QuietProgressCallback(status=status)
    st, ctl = state(step=0), TrainerControl()
    cb.on_train_begin(None, st, ctl)
    st.global_step = 1
    cb.on_step_end(None, st, ctl)
    cb.on_log(None, st, ctl, logs=dict(LOGS))  # the status function, not the logs, sets the postfix
    assert calls == [1] and "length_max=NO 41" in cb.training_bar.postfix
    cb.on_train_end(None, st, ctl)


def test_original_progress_callback_does_print_the_dict(capsys):
    """The check above can fail: transformers' own callback prints the raw dict."""
    from transformers.trainer_callback import ProgressCallback

    cb = ProgressCallback()
    st, ctl = state(step=0), TrainerControl()
    cb.on_train_begin(None, st, ctl)
    cb.on_log(None, st, ctl, logs=dict(LOGS))
    cb.on_train_end(None, st, ctl)
    assert "task_nll" in capsys.readouterr().out
