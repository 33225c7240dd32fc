"""EF21 family: identities (C = id is GD, EF21-W == EF21 for top_k, EControl eta=0 == EF21),
the paper's quadratic fixture, the g == mean g_i invariant under partial participation, the
behaviour that motivates EF21 (naive top-k stalls; EF21 converges with a fraction of the bytes),
and the theory steps (`lr: theory`) with the smoothness constants they need."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.config import parse_scenario
from fedsim.errors import ConfigError
from fedsim.objectives import estimate_smoothness, nonconvex_reg
from strategies import STRATEGIES
from strategies.compress import identity, natural, qsgd, rand_k, top_k
from strategies.ef21 import (
    TheoryStep,
    compressed_gd,
    econtrol,
    ef21,
    gd,
    smoothness_sums,
    theory_constants,
    theory_lr,
    theory_step,
)
from strategies.ef21_w import ef21_w
from strategies.feedback import ef14
from strategies.feedback import ef21 as ef21_compressor
from strategies.uplink import compress_uplink
from tests.conftest import small_scenario

IDENT = identity()
TOP1 = top_k(k=1)
G_I = "g"   # EF21's per-client g_i and the server's g


def _paper_quadratic():
    """docs/algorithms.md#ef21-quadratic: f_i = x^T A_i x / 2 - b_i^T x, i.e. h = diag A_i, c = b_i / h."""
    h = np.array([[1.0, 3.0], [2.0, 0.5]])
    b = np.array([[1.0, -1.0], [0.0, 2.0]])
    return testing.QuadraticProblem(h, b / h)


def _gd(problem, lr, steps, x0=None):
    x = torch.zeros(problem.dim, dtype=torch.float64) if x0 is None else x0
    w = torch.as_tensor(problem.sizes / problem.sizes.sum())[:, None]
    for _ in range(steps):
        x = x - lr * (w * problem.h * (x - problem.c)).sum(0)
    return x


def test_theory_constants_at_alpha_one_tenth_and_the_quadratic_step():
    theta, beta, ratio = theory_constants(0.1)
    assert (theta, beta, ratio) == pytest.approx((0.0513167019, 17.5381496825, 18.4868329805), abs=1e-10)
    # 2-client quadratic: L = lambda_max(mean A_i) = 1.75, L_QM = sqrt((3^2 + 2^2)/2), alpha(top-1 of 2) = 1/2
    assert theory_lr(1.75, np.sqrt(6.5), 0.5) == pytest.approx(0.1265012371, abs=1e-10)


@pytest.mark.parametrize("make", [
    lambda: ef21(lr=0.3, compressor=IDENT),
    lambda: ef21_w(lr=0.3, compressor=IDENT, smoothness=[1.0, 9.0, 0.2, 3.0, 1.0]),
    lambda: econtrol(lr=0.3, compressor=IDENT, eta=0.5),
])
def test_identity_compressor_is_distributed_gradient_descent(make):
    # Prepare: unequal client sizes, full participation
    problem = testing.heterogeneous_quadratic(num_clients=5, dim=4, seed=3, sizes=[1, 2, 3, 4, 10])
    # Execute
    loop = testing.run(make(), problem, rounds=25)
    # Assert: 25 rounds == 25 GD steps on f = sum_i (n_i / n) f_i
    torch.testing.assert_close(loop.state.server["x"], _gd(problem, 0.3, 25), rtol=0, atol=1e-12)


def test_two_rounds_by_hand_with_top_1_and_bytes():
    """Round 0 sends grad_i(0) = -b_i densely: g = (-0.5, -0.5), x1 = gamma (0.5, 0.5).
    Round 1: grad_1(x1) - g_1 = (0.5, 1.5) gamma -> top-1 (0, 1.5 gamma);
    grad_2(x1) - g_2 = (1, 0.25) gamma -> (gamma, 0); g += mean; x2 = x1 - gamma g."""
    gam = 0.2
    loop = testing.run(ef21(lr=gam, compressor=TOP1), _paper_quadratic(), rounds=2)
    x1 = gam * torch.tensor([0.5, 0.5], dtype=torch.float64)
    g = torch.tensor([-0.5 + 0.5 * gam, -0.5 + 0.75 * gam], dtype=torch.float64)
    torch.testing.assert_close(loop.state.server["x"], x1 - gam * g, rtol=0, atol=1e-15)
    # up: 2 clients x 2 float64 values, then 2 x ceil((64 + 1) / 8); down: x as float64
    assert loop.state.bytes.per_round == [(32, 32), (18, 32)]


def test_top_1_on_the_paper_quadratic_reaches_the_optimum():
    # Prepare: theory step of docs/algorithms.md#ef21-quadratic
    problem = _paper_quadratic()
    # Execute: round 0 is the init, rounds 1..3000 are the paper's iterations
    loop = testing.run(ef21(lr=0.1265012371, compressor=TOP1), problem, rounds=3001)
    # Assert
    x = loop.state.server["x"]
    torch.testing.assert_close(x, torch.tensor([1 / 3, 2 / 7], dtype=torch.float64), rtol=0, atol=1e-12)
    grad = (problem.h * (x - problem.c)).mean(0)
    assert float(grad.norm()) < 1e-13


@pytest.mark.parametrize("participation", [None, testing.bernoulli([0.3, 0.5, 0.9, 0.6], seed=4)])
def test_ef21_w_equals_ef21_for_top_k_with_uneven_weights(participation):
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=6, seed=5, sizes=[3, 1, 1, 5])
    comp = top_k(k=2)
    a = testing.run(ef21(lr=0.1, compressor=comp), problem, 60, participation=participation)
    b = testing.run(ef21_w(lr=0.1, compressor=comp, smoothness=[0.01, 100.0, 1.0, 7.0]), problem, 60,
                    participation=participation)
    torch.testing.assert_close(b.state.server["x"], a.state.server["x"], rtol=1e-12, atol=1e-12)


def test_server_g_is_the_mean_of_all_client_g_i_under_partial_participation():
    # Prepare: EF21-PP, everybody seen at least once in 40 rounds
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=5, seed=6, sizes=[1, 2, 3, 1, 2, 3])
    part = testing.bernoulli([0.3] * 6, seed=2)
    # Execute
    loop = testing.run(ef21(lr=0.1, compressor=top_k(k=2)), problem, 40, participation=part)
    # Assert: g == sum_i (n_i / n) g_i over ALL clients (stale ones included), not over responders
    g_i = loop.state.store.gather(torch.arange(6))[G_I]
    w = torch.as_tensor(problem.sizes / problem.sizes.sum())[:, None]
    torch.testing.assert_close(loop.state.server[G_I], (w * g_i).sum(0), rtol=0, atol=1e-13)


def test_absent_clients_keep_their_g_i():
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=3, seed=1)
    masks = [[True, True, True], [True, False, False]]
    part = testing.MaskParticipation(masks)
    loop = testing.run(ef21(lr=0.1, compressor=TOP1), problem, 2, participation=part)
    g = loop.state.store.gather(torch.arange(3))[G_I]
    grad0 = problem.h * (0 - problem.c)  # clients 1, 2 only sent their dense round-0 gradient
    torch.testing.assert_close(g[1:], grad0[1:], rtol=0, atol=0)
    assert not torch.equal(g[0], grad0[0])


def test_econtrol_with_eta_zero_is_ef21_and_tracks_its_error():
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=6, seed=7)
    comp = top_k(k=1)
    a = testing.run(ef21(lr=0.1, compressor=comp, init="compressed"), problem, 30)
    b = testing.run(econtrol(lr=0.1, compressor=comp, eta=0.0, init="compressed"), problem, 30)
    torch.testing.assert_close(b.state.server["x"], a.state.server["x"], rtol=0, atol=1e-14)
    c = testing.run(econtrol(lr=0.1, compressor=comp, eta=0.3), problem, 400)
    assert float((c.state.server["x"] - problem.optimum).abs().max()) < 1e-8


def test_ef21_sgd_uses_the_minibatch_oracle():
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=4, seed=2, noise=0.5)
    loop = testing.run(ef21(lr=0.1, compressor=IDENT, stochastic=True), problem, 1)
    _, grad = problem.oracle(torch.arange(3), 0)(torch.zeros(3, 4, dtype=torch.float64), 0)
    torch.testing.assert_close(loop.state.store.gather(torch.arange(3))[G_I], grad, rtol=0, atol=0)


def test_naive_top_k_stalls_where_ef21_converges_with_a_fraction_of_the_bytes():
    # Prepare: heterogeneous clients, top-1 of 10 coordinates
    problem = testing.heterogeneous_quadratic(num_clients=10, dim=10, seed=0)
    f_star = float(problem.objective(problem.optimum[None])[0])
    trace = {}

    def record(name):
        trace[name] = []
        return lambda m: trace[name].append((m["bytes_up"], m["test_loss"] - f_star))

    # Execute
    for name, strat in [("ef21", ef21(lr=0.15, compressor=TOP1)),
                        ("naive", compressed_gd(lr=0.15, compressor=TOP1)),
                        ("gd", ef21(lr=0.15, compressor=IDENT))]:
        testing.run(strat, problem, 600, eval_every=1, on_eval=record(name))
    # Assert: naive stays far from f*; EF21 gets to 1e-8 and needs fewer bytes than GD for it
    assert min(gap for _, gap in trace["naive"]) > 1e-2
    first = {k: next(b for b, gap in v if gap < 1e-8) for k, v in trace.items() if k != "naive"}
    assert first["ef21"] < 0.5 * first["gd"]


def test_estimated_smoothness_is_exact_on_quadratics():
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=4, seed=9)
    ids = torch.arange(3)
    est = estimate_smoothness(problem.oracle(ids, 0), torch.zeros(3, 4, dtype=torch.float64), ids, iters=200)
    torch.testing.assert_close(est, problem.h.max(1).values, rtol=1e-6, atol=0)


def test_nonconvex_regulariser_gradient_matches_autograd():
    x = torch.linspace(-3, 3, 14, dtype=torch.float64).view(2, 7).requires_grad_(True)
    val, grad = nonconvex_reg(x, 0.1)
    (auto,) = torch.autograd.grad(val.sum(), x)
    torch.testing.assert_close(grad, auto, rtol=0, atol=1e-15)


def test_bad_compressor_is_reported_under_strategy_compressor():
    with pytest.raises(ConfigError) as err:
        parse_scenario(small_scenario(strategy={"name": "ef21", "compressor": {"name": "top_k", "ratio": 3}}))
    assert "strategy.compressor.ratio" in str(err.value)
    with pytest.raises(ValueError, match="compressor: EF21 is error feedback itself"):
        ef21(compressor=ef14(inner=top_k(k=1)))


@pytest.mark.parametrize("participation", [None, testing.bernoulli([0.5] * 4, seed=3)])
def test_ef21_is_gd_with_an_ef21_uplink(participation):
    """The registered `ef21` and `gd` + `compressor: {name: ef21, inner: ...}` are one algorithm,
    also in rounds where nobody takes part (the receiver still steps with its g)."""
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=5, seed=8)
    a = testing.run(ef21(lr=0.2, compressor=top_k(k=2)), problem, 30, participation=participation)
    composed = compress_uplink(gd(lr=0.2), ef21_compressor(inner=top_k(k=2)))
    b = testing.run(composed, problem, 30, participation=participation)
    assert torch.equal(a.state.server["x"], b.state.server["x"])
    assert a.state.bytes.per_round == b.state.bytes.per_round


def test_a_round_nobody_takes_part_in_still_steps_with_g():
    """EF21-PP: x^{t+1} = x^t - gamma g^t also when S_t is empty; naive compressed GD stays put."""
    problem = testing.heterogeneous_quadratic(num_clients=3, dim=4, seed=2)
    part = testing.MaskParticipation([[True, True, True], [False, False, False]])
    one = testing.run(ef21(lr=0.1, compressor=TOP1), problem, 1, participation=part)
    two = testing.run(ef21(lr=0.1, compressor=TOP1), problem, 2, participation=part)
    g = one.state.server[G_I]
    torch.testing.assert_close(two.state.server["x"], one.state.server["x"] - 0.1 * g, rtol=0, atol=0)
    naive1 = testing.run(compressed_gd(lr=0.1, compressor=TOP1), problem, 1, participation=part)
    naive2 = testing.run(compressed_gd(lr=0.1, compressor=TOP1), problem, 2, participation=part)
    assert torch.equal(naive1.state.server["x"], naive2.state.server["x"])


# ---- theory steps and smoothness constants (issue 16) ----------------------------------------

class CountingProblem(testing.QuadraticProblem):
    """Counts the full-gradient calls of every oracle it builds."""

    full_calls = 0

    def oracle(self, ids, round):
        inner, outer = super().oracle(ids, round), self

        class Counting:
            def __call__(self, x, step):
                return inner(x, step)

            def full(self, x):
                outer.full_calls += 1
                return inner.full(x)
        return Counting()


def _uneven(n_big=1, scale=100.0):
    """Example 2.1 of EF21-W (arXiv:2402.10774): L_i = 1, 1, 1, 100 (x a mild spread over d = 4)."""
    h = np.ones((4, 4)) * np.linspace(0.5, 1.0, 4)
    h[-n_big:] *= scale
    return CountingProblem(h, np.random.default_rng(0).normal(size=(4, 4)))


def test_example_2_1_constants_and_steps():
    """L = (1, 1, 1, 100), uniform: L_AM = 25.75, L_QM = sqrt((3 + 100^2)/4) = 50.0075; at
    alpha = 0.1 (xi = 18.4868329805) the steps are 1/(L + L_AM xi) and 1/(L + L_QM xi)."""
    L = torch.tensor([1.0, 1.0, 1.0, 100.0], dtype=torch.float64)
    pi = torch.full((4,), 0.25, dtype=torch.float64)
    sums = smoothness_sums(L, pi).sum(0)
    xi = theory_constants(0.1)[2]
    am = float(theory_step(TheoryStep(L=2.0), sums, pi, 0.1, "am"))
    qm = float(theory_step(TheoryStep(L=2.0), sums, pi, 0.1, "qm"))
    assert am == pytest.approx(1 / (2.0 + 25.75 * xi), rel=1e-13)
    assert qm == pytest.approx(1 / (2.0 + 50.00749944 * xi), rel=1e-9)
    # without L: bounded by L_AM; `factor` multiplies
    assert float(theory_step(TheoryStep(factor=4.0), sums, pi, 0.1, "am")) == \
        pytest.approx(4 / (25.75 + 25.75 * xi), rel=1e-13)


def test_theory_step_on_the_paper_quadratic_is_the_hand_computed_step():
    """docs/algorithms.md#ef21-quadratic: L = 1.75, L_i = (3, 2), Top-1 of d = 2: 0.1265012371."""
    problem = _paper_quadratic()
    a = testing.run(ef21(lr=TheoryStep(L=1.75), compressor=TOP1, smoothness=[3.0, 2.0]), problem, 40)
    b = testing.run(ef21(lr=0.1265012371, compressor=TOP1), problem, 40)
    torch.testing.assert_close(a.state.server["x"], b.state.server["x"], rtol=0, atol=1e-11)
    # from a scenario: `lr: theory` and the mapping form
    assert STRATEGIES.validate("ef21", {"lr": "theory"})["lr"] == TheoryStep()
    mapping = {"kind": "theory", "factor": 2}
    assert STRATEGIES.validate("ef21", {"lr": mapping})["lr"] == TheoryStep(factor=2.0)


def test_estimated_constants_reach_the_server_once():
    """Without `smoothness` each client estimates L_i at its first participation and sends it
    once (one value); the server's sums are those of the estimates (20 power iterations: within
    1 % of max_j h_ij here, where the top two curvatures of a client differ by 1/6 only)."""
    problem = _uneven()
    loop = testing.run(ef21(lr=TheoryStep(), compressor=TOP1), problem, 3)
    est = loop.state.store.gather(torch.arange(4))["L"]
    torch.testing.assert_close(est, problem.h.max(1).values, rtol=1e-2, atol=0)
    pi = torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(loop.state.server["Ls"], smoothness_sums(est, pi).sum(0), rtol=0, atol=1e-12)
    row = 4 * 8
    assert loop.state.bytes.per_round[0][0] == 4 * (row + 8)       # dense first message + L_i
    assert loop.state.bytes.per_round[1][0] == 4 * 9                # top-1 of d = 4 only


def test_ef21_w_with_its_theory_step_beats_ef21_with_its_own_on_uneven_smoothness():
    """The EF21-W paper's claim: with very uneven L_i the L_AM step (EF21-W, Thm 2) is far larger
    than EF21's L_QM step (Thm 1), and EF21-W converges much faster (Top-1, exact L_i)."""
    problem = _uneven()
    f_star = float(problem.objective(problem.optimum[None])[0])
    L = problem.h.max(1).values.tolist()
    gaps = {}
    for name in ("ef21", "ef21-w"):
        trace = []
        strat = STRATEGIES.build(name, {"lr": "theory", "compressor": {"name": "top_k", "k": 1},
                                        "smoothness": L}, runtime=None)
        testing.run(strat, problem, 150, eval_every=150, on_eval=lambda m, t=trace: t.append(m["test_loss"]))
        gaps[name] = trace[-1] - f_star
    assert gaps["ef21-w"] < 1e-7 and gaps["ef21"] > 1e-4     # measured: 1.9e-8 and 3.5e-4


@pytest.mark.parametrize("comp", [top_k(k=2), rand_k(k=2), qsgd(levels=4)])
def test_ef21_w_with_a_number_and_a_homogeneous_compressor_estimates_nothing_and_is_ef21(comp):
    """Its weights cannot change EF21's iterates (C(tv) = t C(v)), so no L_i are estimated:
    one full gradient per client and round, and the run is `ef21`'s bit for bit."""
    problem = _uneven()
    a = testing.run(ef21(lr=0.005, compressor=comp), problem, 20)
    calls = problem.full_calls
    b = testing.run(ef21_w(lr=0.005, compressor=comp), problem, 20)
    assert calls == problem.full_calls - calls == 20       # one block of 4 per round
    assert torch.equal(a.state.server["x"], b.state.server["x"])
    assert a.state.bytes.per_round == b.state.bytes.per_round


def test_ef21_w_estimates_when_its_weights_matter():
    """`natural` compression is not positively homogeneous: the weights change the iterates, so
    EF21-W estimates L_i (21 extra full gradients for the new clients of round 0)."""
    problem = _uneven()
    a = testing.run(ef21(lr=0.005, compressor=natural()), problem, 20)
    before = problem.full_calls
    b = testing.run(ef21_w(lr=0.005, compressor=natural()), problem, 20)
    assert problem.full_calls - before == 20 + 21
    assert not torch.equal(a.state.server["x"], b.state.server["x"])


def test_options_nothing_would_use_are_refused():
    with pytest.raises(ConfigError) as err:
        STRATEGIES.build("ef21", {"lr": 0.1, "smoothness": [1.0, 2.0]})
    assert err.value.key == "smoothness" and "only for lr: theory" in str(err.value)
    with pytest.raises(ConfigError) as err:
        STRATEGIES.build("ef21", {"lr": "theory", "stochastic": True})
    assert err.value.key == "lr"
    with pytest.raises(ConfigError) as err:
        parse_scenario(small_scenario(strategy={"name": "ef21-w", "lr": "thoery"}))
    assert err.value.key == "strategy.lr" and "theory" in str(err.value)
