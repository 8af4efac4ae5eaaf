import pytest
import torch

from l3m import (
    FunctionConstraint,
    L3MUserError,
    LengthConstraint,
    NonFiniteError,
    RewardConstraint,
    SampleBatch,
    TruncationConstraint,
)
from l3m.constraints import build_constraints, evaluate_constraints, leave_one_out_baseline, validate_constraint_specs


def batch(lengths, completions=None, truncated=None):
    n = len(lengths)
    return SampleBatch(
        prompts=["p"] * n,
        completions=completions or ["x" * length for length in lengths],
        completion_ids=[[0] * length for length in lengths],
        lengths=torch.tensor(lengths),
        group_ids=torch.arange(n // 2).repeat_interleave(2),
        truncated=None if truncated is None else torch.tensor(truncated),
    )


def char_count(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_length_constraint_values_and_scale():
    b = batch([10, 30, 50, 70])
    hi = LengthConstraint(40, "max")
    lo = LengthConstraint(20, "min", scale=10)
    raw, c = evaluate_constraints([hi, lo], b)
    assert c[:, 0].tolist() == [-30, -10, 10, 30]
    assert c[:, 1].tolist() == pytest.approx([1.0, -1.0, -3.0, -5.0])
    assert raw[:, 0].tolist() == [10, 30, 50, 70]


def test_reward_at_least_and_at_most():
    b = batch([2, 4], completions=["ab", "abcd"])
    at_least = RewardConstraint(char_count, at_least=3)
    at_most = RewardConstraint(char_count, at_most=3, name="short")
    _, c = evaluate_constraints([at_least, at_most], b)
    assert c[:, 0].tolist() == [1.0, -1.0]
    assert c[:, 1].tolist() == [-1.0, 1.0]
    assert at_least.name == "char_count" and at_most.name == "short"


def test_reward_called_once_per_step_when_shared():
    calls = []

    def reward(prompts, completions, **kw):
        calls.append(1)
        return [1.0] * len(completions)

    evaluate_constraints(
        [RewardConstraint(reward, at_least=0), RewardConstraint(reward, at_most=2, name="b")], batch([1, 2])
    )
    assert len(calls) == 1


def test_function_constraint_default_is_c_equals_f():
    _, c = evaluate_constraints([FunctionConstraint(char_count)], batch([1, 3]))
    assert c[:, 0].tolist() == [1.0, 3.0]


def test_non_finite_reward_raises_with_the_offending_sample():
    def bad(prompts, completions, **kw):
        return [1.0, float("nan")]

    with pytest.raises(NonFiniteError) as err:
        evaluate_constraints([RewardConstraint(bad, at_least=0)], batch([1, 2], ["ok", "bad one"]))
    assert err.value.completion == "bad one"


def test_leave_one_out_baseline():
    values = torch.tensor([[1.0], [3.0], [10.0], [20.0], [30.0], [0.0]])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    with pytest.raises(ValueError):
        leave_one_out_baseline(values, groups)
    groups = torch.tensor([0, 0, 1, 1, 1, 1])
    base = leave_one_out_baseline(values, groups)
    assert base[:, 0].tolist() == pytest.approx([3.0, 1.0, 50 / 3, 40 / 3, 30 / 3, 60 / 3])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "lenght", "max": 3}, "did you mean 'length'"),
        ({"kind": "length", "min": 50, "max": 10}, "greater than max"),
        ({"kind": "length"}, "needs 'min', 'max'"),
        ({"kind": "length", "maxx": 3}, "did you mean 'max'"),
        ({"kind": "reward", "function": "m:f"}, "at_least"),
        ({"kind": "reward", "at_least": 1}, "exactly one of 'model' or 'function'"),
        ({"kind": "length", "max": "ten"}, "must be a number"),
        ({"kind": "reward", "model": "m", "at_least": 0, "max_length": 0}, "'max_length' must be a positive integer"),
        ({"kind": "reward", "model": "m", "at_least": 0, "batch_size": "8"}, "'batch_size' must be a positive integer"),
        ({"kind": "length", "max": 3, "gradient": "stop"}, "unknown field 'gradient'"),
        ({"kind": "function", "function": "m:f", "gradient": "stop"}, "unknown field 'gradient'"),
        ({"kind": "truncated"}, "needs 'at_most'"),
        ({"kind": "truncated", "at_least": 0.1}, "takes 'at_most'.*not 'at_least'"),
        ({"kind": "truncated", "at_most": 1.5}, r"'at_most' of a truncated constraint is a share in \[0, 1\]"),
        ({"kind": "truncated", "at_most": -0.1}, r"share in \[0, 1\]"),
        ({"kind": "truncated", "at_most": "5%"}, "'at_most' must be a number"),
        ({"kind": "truncated", "at_most": True}, "'at_most' must be a number"),
        ({"kind": "truncated", "at_most": 0.05, "scale": 0}, "'scale' must be > 0"),
        ({"kind": "truncated", "at_most": 0.05, "max": 3}, "unknown field 'max'"),
        ({"kind": "truncate", "at_most": 0.05}, "did you mean 'truncated'"),
    ],
)
def test_bad_specs_get_clear_errors(spec, message):
    with pytest.raises(L3MUserError, match=message):
        validate_constraint_specs([spec])


def test_build_from_specs(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cons = build_constraints(
        [
            {"kind": "length", "min": 5, "max": 40},
            {"kind": "reward", "function": "myrewards:brevity", "at_least": -100, "name": "brevity"},
            {"kind": "function", "function": f"{tmp_path / 'myrewards.py'}:brevity", "name": "fn"},
            {"kind": "truncated", "at_most": 0.25},
        ]
    )
    assert [c.name for c in cons] == ["length_min", "length_max", "brevity", "fn", "truncated"]
    assert [type(c) for c in cons][-1] is TruncationConstraint
    raw, c = evaluate_constraints(cons, batch([10, 20], ["a" * 10, "b" * 20], truncated=[False, True]))
    assert c[:, 2].tolist() == [-90.0, -80.0]
    assert c[:, 3].tolist() == [-10.0, -20.0]
    assert raw[:, 4].tolist() == [0.0, 1.0]
    assert c[:, 4].tolist() == pytest.approx([-0.25, 0.75])
    with pytest.raises(L3MUserError, match="no function 'nope'"):
        build_constraints([{"kind": "function", "function": "myrewards:nope"}])


def test_truncation_constraint_values_mean_is_the_cut_off_share():
    con = TruncationConstraint(0.25)
    assert con.name == "truncated" and con.direction == "at_most" and con.threshold == 0.25
    raw, c = evaluate_constraints([con], batch([5, 64, 7, 64], truncated=[False, True, False, True]))
    assert raw[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert c[:, 0].tolist() == pytest.approx([-0.25, 0.75, -0.25, 0.75])
    assert float(raw.mean()) == 0.5 and float(c.mean()) == pytest.approx(0.25)  # half cut off: violated
    _, c = evaluate_constraints([TruncationConstraint(0.6, name="cut", scale=0.5)], batch([5, 64], truncated=[0, 1]))
    assert c[:, 0].tolist() == pytest.approx([-1.2, 0.8])
    assert "cut: mean cut-off share <= 0.6" in repr(TruncationConstraint(0.6, name="cut"))


def test_truncation_constraint_from_yaml_entry():
    (con,) = build_constraints([{"kind": "truncated", "at_most": 0.05, "name": "cutoff", "scale": 0.1}])
    assert isinstance(con, TruncationConstraint)
    assert (con.name, con.threshold, con.scale, con.kind) == ("cutoff", 0.05, 0.1, "truncated")
    _, c = evaluate_constraints([con], batch([3, 9], truncated=[True, False]))
    assert c[:, 0].tolist() == pytest.approx([9.5, -0.5])


def test_truncation_constraint_needs_the_truncated_flags():
    con = TruncationConstraint(0.05)
    with pytest.raises(L3MUserError, match="no 'truncated' flags"):
        evaluate_constraints([con], batch([1, 2]))
    with pytest.raises(L3MUserError, match="3 'truncated' flags for 2 responses"):
        evaluate_constraints([con], batch([1, 2], truncated=[True, False, True]))


@pytest.mark.parametrize("at_most", [-0.01, 1.01, "0.1", True])
def test_truncation_constraint_bound_must_be_a_share(at_most):
    with pytest.raises(L3MUserError, match=r"'at_most' must be a share in \[0, 1\]"):
        TruncationConstraint(at_most)


def test_sample_batch_truncated_defaults_to_none():
    b = SampleBatch(["p"], ["x"], [[1]], torch.tensor([1]), torch.tensor([0]))
    assert b.truncated is None and b.extra == {}


def test_constraints_take_no_gradient_option():
    with pytest.raises(TypeError):
        LengthConstraint(10, "max", gradient="stop")
    with pytest.raises(TypeError):
        FunctionConstraint(char_count, gradient="stop")
    assert "gradient" not in repr(LengthConstraint(10, "max"))
