import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l3m import MuSchedule, lagrange_multipliers, relaxed_log_barrier, relaxed_log_barrier_grad

mus = st.floats(min_value=1e-3, max_value=10.0)
zs = st.floats(min_value=-50.0, max_value=50.0)


def reference_barrier(z: float, mu: float, s: float) -> float:
    """method.md section 2, written out independently."""
    if z <= -s:
        return -mu * math.log(-z)
    return mu * z / s - mu * math.log(s) + mu


def test_agrees_with_method_md_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        mu = float(torch.empty(1).uniform_(1e-2, 2.0, generator=g))
        s = mu**2
        z = torch.empty(64, dtype=torch.float64).uniform_(-5, 5, generator=g)
        z[:8] = -s + torch.empty(8, dtype=torch.float64).uniform_(-1e-3, 1e-3, generator=g)  # near the kink
        ref = torch.tensor([reference_barrier(float(v), mu, s) for v in z], dtype=torch.float64)
        ref_grad = torch.tensor([mu / max(-float(v), s) for v in z], dtype=torch.float64)
        assert torch.allclose(relaxed_log_barrier(z, mu), ref, atol=1e-6, rtol=0)
        assert torch.allclose(relaxed_log_barrier_grad(z, mu), ref_grad, atol=1e-6, rtol=0)
        for v in z[:5].tolist():  # the float path too
            assert abs(relaxed_log_barrier(v, mu) - reference_barrier(v, mu, s)) < 1e-6
            assert abs(relaxed_log_barrier_grad(v, mu) - mu / max(-v, s)) < 1e-6


@given(mu=mus)
def test_value_and_slope_continuous_at_minus_s(mu):
    s = mu**2
    eps = 1e-9 * s
    left, right = relaxed_log_barrier(-s - eps, mu), relaxed_log_barrier(-s + eps, mu)
    assert abs(left - right) < 1e-6 * max(1.0, abs(left))
    gl, gr = relaxed_log_barrier_grad(-s - eps, mu), relaxed_log_barrier_grad(-s + eps, mu)
    assert abs(gl - gr) <= 1e-6 * gl


@given(mu=mus, a=zs, b=zs, t=st.floats(0.0, 1.0))
def test_convex(mu, a, b, t):
    mid = relaxed_log_barrier(t * a + (1 - t) * b, mu)
    chord = t * relaxed_log_barrier(a, mu) + (1 - t) * relaxed_log_barrier(b, mu)
    assert mid <= chord + 1e-7 * max(1.0, abs(chord))


@given(mu=mus, a=zs, b=zs)
def test_increasing(mu, a, b):
    lo, hi = min(a, b), max(a, b)
    assert relaxed_log_barrier(lo, mu) <= relaxed_log_barrier(hi, mu) + 1e-9
    assert relaxed_log_barrier_grad(lo, mu) <= relaxed_log_barrier_grad(hi, mu) + 1e-9
    assert relaxed_log_barrier_grad(lo, mu) > 0


@settings(max_examples=200)
@given(mu=st.floats(0.05, 2.0), z=st.floats(-20.0, 20.0))
def test_derivative_matches_finite_differences(mu, z):
    s = mu**2
    h = 1e-6 * max(1.0, abs(z))
    if abs(z + s) < 10 * h:  # the second derivative jumps at the kink; central differences straddle it
        z = -s - 20 * h
    zt = torch.tensor([z - h, z + h], dtype=torch.float64)
    v = relaxed_log_barrier(zt, mu)
    fd = float((v[1] - v[0]) / (2 * h))
    g = relaxed_log_barrier_grad(z, mu)
    assert abs(fd - g) <= 1e-4 * max(1.0, abs(g))


def test_autograd_agrees_with_closed_form_derivative():
    z = torch.linspace(-3, 3, 101, dtype=torch.float64, requires_grad=True)
    relaxed_log_barrier(z, 0.3).sum().backward()
    assert torch.allclose(z.grad, relaxed_log_barrier_grad(z.detach(), 0.3), atol=1e-10)


def test_tends_to_characteristic_function_as_mu_vanishes():
    inside, outside = [-0.5, -0.01, -1e-3], [1e-3, 0.01, 0.5]
    prev_out = [relaxed_log_barrier(z, 0.01) for z in outside]
    for mu in (1e-3, 1e-4, 1e-5):
        for z in inside:  # in the log branch once s = mu**2 < -z: |B| = mu |log(-z)| -> 0
            assert abs(relaxed_log_barrier(z, mu)) <= mu * abs(math.log(-z)) + 1e-12
        now = [relaxed_log_barrier(z, mu) for z in outside]
        assert all(n > 5 * p for n, p in zip(now, prev_out))  # grows without bound outside
        prev_out = now
    assert abs(relaxed_log_barrier(-0.5, 1e-6)) < 1e-5
    assert relaxed_log_barrier(1e-3, 1e-6) > 1e3


def test_mu_schedule_decays_exponentially_to_mu_min():
    sched = MuSchedule(1.0, 0.01, total_steps=11)
    vals = [sched(t) for t in range(11)]
    assert vals[0] == 1.0 and math.isclose(vals[-1], 0.01)
    ratios = [b / a for a, b in zip(vals, vals[1:])]
    assert max(ratios) - min(ratios) < 1e-12 and math.isclose(ratios[0], 0.01**0.1)
    assert sched(50) == sched(10)


def test_multipliers_are_barrier_slope_over_m():
    c = torch.tensor([-2.0, -0.0001, 3.0], dtype=torch.float64)
    lam = lagrange_multipliers(c, mu=0.1)
    assert torch.allclose(lam, torch.tensor([0.1 / 2, 0.1 / 0.01, 0.1 / 0.01], dtype=torch.float64) / 3)
    # approximate complementary slackness in the log branch: lambda * (-C) = mu / m
    assert math.isclose(float(lam[0] * 2.0), 0.1 / 3)


def test_relaxation_point_s_other_than_mu_squared():
    """The s of the experimental barrier_s_power (s = mu**p): the same formula with that s; with s = mu a violated
    constraint's multiplier is mu / (m * mu) = 1 / m at every mu."""
    g = torch.Generator().manual_seed(1)
    for mu in (1.0, 0.3, 0.05):
        s = mu
        z = torch.empty(32, dtype=torch.float64).uniform_(-3, 3, generator=g)
        ref = torch.tensor([reference_barrier(float(v), mu, s) for v in z], dtype=torch.float64)
        assert torch.allclose(relaxed_log_barrier(z, mu, s), ref, atol=1e-9, rtol=0)
        assert torch.allclose(relaxed_log_barrier_grad(z, mu, s), mu / torch.clamp(-z, min=s), atol=1e-9, rtol=0)
        violated = torch.tensor([0.5, 2.0, 40.0], dtype=torch.float64)
        assert torch.allclose(lagrange_multipliers(violated, mu, s), torch.full((3,), 1 / 3, dtype=torch.float64))
        # the paper's s = mu**2 gives 1 / (m mu) instead: a wall that grows as mu falls
        assert torch.allclose(lagrange_multipliers(violated, mu), torch.full((3,), 1 / (3 * mu), dtype=torch.float64))
