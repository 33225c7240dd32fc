"""CO2 (arXiv:2401.16265) and its no-overlap special cases Local SGD and SlowMo.

Fixture (docs/algorithms.md#co2-quadratic): 3 workers,
f_i(x) = h_i (x - c_i)^2 / 2, h = [1, 4, 2], c = [0, 1, -1], x0 = 0, tau = 8, gamma = 0.05,
full-batch gradients, full participation. Local SGD's fixed point is 0.1511183198 (x* = 0.2857).
The reference loop `_reference` below is that script's `co2` function in torch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim import testing
from fedsim.config import parse_scenario
from fedsim.errors import ConfigError
from fedsim.registry import build_nested
from strategies import STRATEGIES
from strategies.co2 import (
    ConstPenalty,
    ElementwiseClip,
    GapElementwisePenalty,
    GapNormPenalty,
    NoClip,
    NormClip,
    co2,
)
from strategies.local import adamw
from tests.conftest import run_cli, small_scenario, write_scenario

H, C, TAU, GAMMA = [1.0, 4.0, 2.0], [0.0, 1.0, -1.0], 8, 0.05
FIXED_POINT = 0.1511183198
PLAIN = dict(tau=TAU, lr=GAMMA, penalty=ConstPenalty(), clip=NoClip())


def _problem(**kw) -> testing.QuadraticProblem:
    return testing.QuadraticProblem(H, C, **kw)


def _x(strategy, rounds: int, problem=None, **kw) -> torch.Tensor:
    return testing.run(strategy, problem or _problem(), rounds, **kw).state.server["x"]


def _reference(rounds: int, stale: bool, alpha: float = 1.0, beta: float = 0.0,
               clip: float | None = None) -> float:
    """co2_quad.py: pending = (anchor, mean end point) of the previous round."""
    h, c = torch.tensor(H, dtype=torch.float64), torch.tensor(C, dtype=torch.float64)
    x, m, pending = torch.tensor(0.0, dtype=torch.float64), 0.0, None
    for _ in range(rounds):
        y = x.expand(3).clone()
        for _ in range(TAU):
            y = y - GAMMA * h * (y - c)
        cur = (x, y.mean())
        use, pending = (pending if stale else cur), cur
        if use is not None:
            m = beta * m + (use[0] - use[1])
            m = m.clamp(-clip, clip) if clip is not None else m
            x = x - alpha * m
    return float(x)


def test_no_staleness_no_momentum_is_local_sgd():
    """x_{t+1,0} = mean_i x^{(i)}_{t,tau}: one round by hand, FedAvg bitwise, fixed point.

    Round 1 by hand: y_i = c_i (1 - (1 - gamma h_i)^tau) from x0 = 0, x1 = mean(y_i).
    """
    # Prepare
    x1 = sum(c * (1 - (1 - GAMMA * h) ** TAU) for h, c in zip(H, C, strict=True)) / 3
    def make():
        return co2(staleness=0, beta=0.0, outer_lr=1.0, **PLAIN)
    fedavg = STRATEGIES.build("fedavg", {"lr": GAMMA, "local_steps": TAU, "weighting": "uniform"})
    # Execute
    one, many = _x(make(), 1), _x(make(), 400)
    alias = _x(STRATEGIES.build("local-sgd", {"tau": TAU, "lr": GAMMA}), 400)
    # Assert
    assert float(one[0]) == pytest.approx(x1, rel=1e-13)
    assert torch.equal(many, _x(fedavg, 400)) and torch.equal(alias, many)
    assert float(many[0]) == pytest.approx(FIXED_POINT, abs=1e-10)


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_weighting(weighting):
    """One Local SGD round, sizes n = [1, 2, 3]: x1 = mean_i y_i (uniform) or sum_i n_i y_i / 6."""
    # Prepare
    n = [1.0, 2.0, 3.0]
    ends = [c * (1 - (1 - GAMMA * h) ** TAU) for h, c in zip(H, C, strict=True)]
    w = [1 / 3] * 3 if weighting == "uniform" else [v / 6 for v in n]
    problem = testing.QuadraticProblem(H, C, sizes=n)
    # Execute
    x1 = _x(co2(staleness=0, beta=0.0, weighting=weighting, **PLAIN), 1, problem)
    # Assert
    assert float(x1[0]) == pytest.approx(sum(wi * y for wi, y in zip(w, ends, strict=True)), rel=1e-13)


def test_no_staleness_with_momentum_is_slowmo():
    """SlowMo (arXiv:1910.00643): m <- beta m + (x - mean y); x <- x - alpha m (hand loop)."""
    # Prepare
    problem, alpha, beta, rounds = _problem(), 0.7, 0.6, 25
    x, m = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    h, c = problem.h[:, 0], problem.c[:, 0]
    for _ in range(rounds):
        y = x.expand(3).clone()
        for _ in range(TAU):
            y = y - GAMMA * h * (y - c)
        m = beta * m + (x - y.mean())
        x = x - alpha * m
    # Execute
    got = _x(co2(staleness=0, beta=beta, outer_lr=alpha, **PLAIN), rounds)
    alias = _x(STRATEGIES.build("slowmo", {"tau": TAU, "lr": GAMMA, "beta": beta, "outer_lr": alpha}),
               rounds)
    # Assert
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-14)
    assert torch.equal(alias, got)


@pytest.mark.parametrize("rounds", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("stale,alpha,beta", [(True, 1.0, 0.0), (True, 0.7, 0.2), (False, 1.0, 0.5)])
def test_matches_reference_loop(rounds, stale, alpha, beta):
    # Execute
    got = _x(co2(staleness=int(stale), beta=beta, outer_lr=alpha, **PLAIN), rounds)
    # Assert
    assert float(got[0]) == pytest.approx(_reference(rounds, stale, alpha, beta), rel=1e-12, abs=1e-14)


def test_staleness_keeps_the_fixed_point_but_changes_the_path():
    # Execute
    stale = [_x(co2(staleness=1, beta=0.0, **PLAIN), r) for r in (3, 400)]
    sync = _x(co2(staleness=0, beta=0.0, **PLAIN), 3)
    # Assert
    assert abs(float(stale[0][0] - sync[0])) > 1e-3
    assert float(stale[1][0]) == pytest.approx(FIXED_POINT, abs=1e-10)


def _mean_end(x: float) -> float:
    """Y(x) = mean_i x^{(i)}_{tau} from x: full-batch GD contracts to c_i by q_i = (1 - gamma h_i)^tau."""
    return sum(c + (1 - GAMMA * h) ** TAU * (x - c) for h, c in zip(H, C, strict=True)) / 3


def test_round_zero_leaves_the_model_unchanged_and_rounds_apply_the_previous_reduction():
    """Round 0 receives nothing: x1 = x0 = 0, m = 0. Round 1 applies round 0's reduction:
    x2 = x1 - (x0 - Y(0)) = Y(0). Round 2 applies round 1's (launched from x1 = 0):
    x3 = x2 - (x1 - Y(x1)) = 2 Y(0) (applying round 2's own reduction would give Y(Y(0))).
    """
    # Prepare
    def make():
        return co2(staleness=1, beta=0.0, **PLAIN)
    # Execute
    loop1 = testing.run(make(), _problem(), 1)
    x2, x3 = _x(make(), 2), _x(make(), 3)
    # Assert
    assert torch.equal(loop1.state.server["x"], torch.zeros(1, dtype=torch.float64))
    assert torch.equal(loop1.state.server["m"], torch.zeros(1, dtype=torch.float64))
    assert float(x2[0]) == pytest.approx(_mean_end(0.0), rel=1e-13)
    assert float(x3[0]) == pytest.approx(2 * _mean_end(0.0), rel=1e-13)


def test_gap_compares_the_current_model_with_the_stale_average():
    """gap_t = x_{t,0} - xbar_{t-1,tau}, Lambda = 1 + |gap| (gap_elementwise), beta = 0.5:
    t=1: x1 = 0, D0 = 0 - Y(0), gap1 = x1 - Y(0), m1 = D0 / (1 + |gap1|), x2 = x1 - m1;
    t=2: D1 = x1 - Y(x1), gap2 = x2 - Y(x1) (the stale average of round 1, launched from x1),
         m2 = 0.5 m1 + D1 / (1 + |gap2|), x3 = x2 - m2;
    t=3: D2 = x2 - Y(x2), gap3 = x3 - Y(x2), m3 = 0.5 m2 + D2 / (1 + |gap3|), x4 = x3 - m3.
    """
    # Prepare
    y0 = _mean_end(0.0)
    m1 = -y0 / (1 + abs(0.0 - y0))
    x2 = -m1
    m2 = 0.5 * m1 + (0.0 - y0) / (1 + abs(x2 - y0))
    x3 = x2 - m2
    y2 = _mean_end(x2)
    x4 = x3 - (0.5 * m2 + (x2 - y2) / (1 + abs(x3 - y2)))
    def make():
        return co2(tau=TAU, lr=GAMMA, beta=0.5, penalty=GapElementwisePenalty(), clip=NoClip())
    # Execute
    got3, got4 = _x(make(), 3), _x(make(), 4)
    # Assert
    assert float(got3[0]) == pytest.approx(x3, rel=1e-13)
    assert float(got4[0]) == pytest.approx(x4, rel=1e-13)


def test_stale_update_averages_the_previous_rounds_participants():
    """Round 0: only worker 1 takes part. Round 1's update applies that reduction alone, so
    x2 = worker 1's end point from x0 = 0: c_1 (1 - (1 - gamma h_1)^tau).
    """
    # Prepare
    masks = [[False, True, False], [True, False, True], [True, True, True]]
    y1 = C[1] * (1 - (1 - GAMMA * H[1]) ** TAU)
    # Execute
    x2 = _x(co2(staleness=1, beta=0.0, **PLAIN), 2, participation=testing.MaskParticipation(masks))
    # Assert
    assert float(x2[0]) == pytest.approx(y1, rel=1e-13)


def test_an_empty_round_changes_nothing_but_still_advances_the_anchor():
    """Nobody takes part in round 1 (Lambda = 1 + |gap| as in the test above, beta 0). t=1
    applies round 0's reduction: x2 = 0 - (0 - Y(0)) / (1 + |0 - Y(0)|); t=2 receives
    round 1's empty one: x3 = x2; t=3 applies round 2's, launched from x2 (so the anchor must
    have advanced to x2 in the empty round): x4 = x3 - (x2 - Y(x2)) / (1 + |x3 - Y(x2)|).
    """
    # Prepare
    masks = [[True] * 3, [False] * 3, [True] * 3, [True] * 3]
    y0 = _mean_end(0.0)
    x2 = y0 / (1 + abs(y0))
    y2 = _mean_end(x2)
    x4 = x2 - (x2 - y2) / (1 + abs(x2 - y2))
    def make():
        return co2(tau=TAU, lr=GAMMA, beta=0.0, penalty=GapElementwisePenalty(), clip=NoClip())
    part = testing.MaskParticipation(masks)
    # Execute
    got = [_x(make(), r, participation=part) for r in (2, 3, 4)]
    # Assert
    assert float(got[0][0]) == pytest.approx(x2, rel=1e-13) and torch.equal(got[1], got[0])
    assert float(got[2][0]) == pytest.approx(x4, rel=1e-13)


def test_staleness_destabilises_momentum_and_clipping_bounds_it():
    # Execute
    stale = float(_x(co2(staleness=1, beta=0.5, **PLAIN), 400)[0])
    sync = float(_x(co2(staleness=0, beta=0.5, **PLAIN), 400)[0])
    clipped = float(_x(co2(staleness=1, beta=0.5, tau=TAU, lr=GAMMA, clip=ElementwiseClip(threshold=0.5)),
                       2000)[0])
    # Assert
    assert abs(stale) > 1e4 and stale == pytest.approx(_reference(400, True, 1.0, 0.5), rel=1e-9)
    assert sync == pytest.approx(FIXED_POINT, abs=1e-10)
    assert abs(clipped) < 1.0 and abs(clipped - FIXED_POINT) > 0.1
    assert clipped == pytest.approx(_reference(2000, True, 1.0, 0.5, clip=0.5), rel=1e-9)


@pytest.mark.parametrize("clip", [ElementwiseClip, NormClip])
def test_unit_penalty_and_infinite_threshold_change_nothing(clip):
    # Prepare
    problem = testing.heterogeneous_quadratic(num_clients=5, dim=4, noise=0.1, seed=3)
    base = dict(tau=4, lr=0.1, beta=0.4, staleness=1)
    # Execute
    plain = _x(co2(penalty=ConstPenalty(), clip=NoClip(), **base), 20, problem)
    unit = _x(co2(penalty=ConstPenalty(value=1.0), clip=clip(threshold=math.inf), **base), 20, problem)
    zero_gap = _x(co2(penalty=GapNormPenalty(scale=0.0), clip=NoClip(), **base), 20, problem)
    # Assert
    assert torch.equal(unit, plain) and torch.equal(zero_gap, plain)


def test_const_penalty_scales_the_pseudo_gradient():
    """Lambda = 2 with alpha = 1 is alpha = 0.5 with Lambda = 1 (m halves exactly)."""
    # Prepare
    problem = testing.heterogeneous_quadratic(num_clients=4, dim=3, noise=0.1, seed=1)
    # Execute
    base = dict(tau=3, lr=0.1, beta=0.3, clip=NoClip())
    halved = _x(co2(penalty=ConstPenalty(value=2.0), outer_lr=1.0, **base), 15, problem)
    slower = _x(co2(penalty=ConstPenalty(value=1.0), outer_lr=0.5, **base), 15, problem)
    # Assert
    assert torch.equal(halved, slower)


@pytest.mark.parametrize("penalty,clip", [("gap_norm", "none"), ("gap_elementwise", "none"),
                                          ("const", "norm"), ("const", "elementwise")])
def test_first_stale_update_by_hand(penalty, clip):
    """Round 1 with x1 = x0 = 0: D = x0 - ybar, gap = x1 - ybar = D, per coordinate j of a 2-d
    quadratic (h_ij, c_ij): ybar_j = mean_i c_ij (1 - (1 - lr h_ij)^tau).
    gap_norm: m = D / (1 + ||D|| / sqrt(2)); gap_elementwise: m = D / (1 + |D|);
    norm clip (phi 0.1): m = D * min(1, 0.1 / ||D||); elementwise clip: clamp(D, -0.1, 0.1).
    x2 = x1 - m (outer_lr 1, beta irrelevant: m starts at 0).
    """
    # Prepare
    h, c = [[1.0, 3.0], [2.0, 0.5]], [[1.0, -2.0], [0.5, 1.0]]
    problem = testing.QuadraticProblem(h, c)
    ht, ct = torch.tensor(h, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
    d = -(ct * (1 - (1 - 0.1 * ht) ** 5)).mean(0)
    expected = {"gap_norm": d / (1 + d.norm() / math.sqrt(2)), "gap_elementwise": d / (1 + d.abs()),
                "norm": d * min(1.0, 0.1 / float(d.norm())), "elementwise": d.clamp(-0.1, 0.1)}
    # Execute
    clip_spec = {"kind": clip, **({} if clip == "none" else {"threshold": 0.1})}
    strat = STRATEGIES.build("co2", {"tau": 5, "lr": 0.1, "beta": 0.5, "penalty": penalty, "clip": clip_spec})
    x2 = _x(strat, 2, problem)
    # Assert
    torch.testing.assert_close(x2, -expected[penalty if clip == "none" else clip], rtol=1e-12, atol=0)


@pytest.mark.parametrize("inner,torch_opt", [
    ({"name": "adamw", "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1},
     lambda p: torch.optim.AdamW([p], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ({"name": "momentum", "mass": 0.7, "weight_decay": 0.1},
     lambda p: torch.optim.SGD([p], lr=0.05, momentum=0.7, weight_decay=0.1)),
])
def test_inner_state_persists_across_rounds(inner, torch_opt):
    """One worker, staleness 0, beta 0, alpha 1: x_{t+1,0} is the worker's end point, so 3 rounds
    of tau = 4 equal 12 uninterrupted steps of torch's optimizer (state kept, never reset).
    """
    # Prepare
    problem = testing.QuadraticProblem([[1.0, 3.0, 0.5]], [[1.0, -2.0, 0.3]])
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch_opt(p)
    for _ in range(12):
        p.grad = problem.h[0] * (p.detach() - problem.c[0])
        opt.step()
    strat = co2(tau=4, lr=0.05, inner=build_nested("optimizers", inner), staleness=0, beta=0.0)
    # Execute
    x = _x(strat, 3, problem)
    # Assert
    torch.testing.assert_close(x, p.detach(), rtol=1e-12, atol=1e-14)


def test_inner_state_is_per_client_and_waits_while_absent():
    # Prepare
    masks = [[True, False, True], [True, True, False], [False, False, True]]
    strat = co2(tau=TAU, lr=GAMMA, inner=adamw(), staleness=1)
    # Execute
    loop = testing.run(strat, _problem(), 3, participation=testing.MaskParticipation(masks))
    state = loop.state.store.gather(torch.arange(3))
    # Assert
    assert state["step"].tolist() == [2 * TAU, TAU, 2 * TAU]


# ---- defaults and one-key options (issue 16) -----------------------------------------------

def _big_problem() -> testing.QuadraticProblem:
    """Curvatures and centres large enough that |m| > 1 and the gap is not tiny."""
    g = np.random.default_rng(4)
    return testing.QuadraticProblem(g.uniform(1.0, 3.0, (4, 3)), 20 * g.normal(size=(4, 3)))


def test_defaults_are_the_released_codes_constant_penalty_and_no_clipping():
    """fairscale-CO2: co2_gap_penalty = 1.0 (a constant), and `_co2_clip` discards its clamp.
    The former defaults (gap_norm penalty, element-wise clip at 1) act on this problem."""
    # Prepare
    problem, base = _big_problem(), dict(tau=4, lr=0.1)
    # Execute
    default = _x(co2(**base), 12, problem)
    released = _x(co2(penalty=ConstPenalty(value=1.0), clip=NoClip(), **base), 12, problem)
    former = _x(co2(penalty=GapNormPenalty(), clip=ElementwiseClip(threshold=1.0), **base), 12, problem)
    # Assert
    assert torch.equal(default, released)
    assert float((former - released).abs().max()) > 1e-2


def test_co2_and_slowmo_share_their_defaults():
    """Same tau, lr, inner, outer_lr, beta (0.2) and weighting: without staleness, default co2
    is default slowmo bitwise, so default-vs-default comparisons isolate the staleness."""
    shared = ("tau", "lr", "inner", "outer_lr", "beta", "weighting")
    a, b = STRATEGIES.params("co2"), STRATEGIES.params("slowmo")
    assert {k: a[k].default for k in shared} == {k: b[k].default for k in shared}
    assert a["beta"].default == 0.2
    problem = _big_problem()
    assert torch.equal(_x(co2(staleness=0), 10, problem), _x(STRATEGIES.build("slowmo", {}), 10, problem))


@pytest.mark.parametrize("params,key,text", [
    ({"penalty": {"kind": "const", "value": 0.5}}, "strategy.penalty.value", "greater than or equal to 1"),
    ({"penalty": {"kind": "const", "scale": 2.0}}, "strategy.penalty.scale", "unknown key"),
    ({"penalty": {"kind": "gap_norm", "value": 2.0}}, "strategy.penalty.value", "unknown key"),
    ({"penalty": {"kind": "huber"}}, "strategy.penalty.kind", "unknown kind"),
    ({"penalty": {"scale": 2.0}}, "strategy.penalty.kind", "a 'kind' is required"),
    ({"clip": {"kind": "none", "threshold": 0.1}}, "strategy.clip.threshold", "unknown key"),
    ({"clip": {"kind": "norm", "threshold": -1}}, "strategy.clip.threshold", "greater than 0"),
    ({"penalty_value": 2.0}, "strategy.penalty_value", "unknown key"),       # the former keys
    ({"clip_threshold": 0.1}, "strategy.clip_threshold", "unknown key"),
    ({"gap_scale": 0.1}, "strategy.gap_scale", "unknown key"),
])
def test_an_option_of_another_kind_cannot_be_written(params, key, text):
    with pytest.raises(ConfigError) as err:
        parse_scenario(small_scenario(strategy={"name": "co2", **params}))
    assert err.value.key == key and text in str(err.value)


def test_a_gap_penalty_without_staleness_is_refused():
    with pytest.raises(ConfigError) as err:
        STRATEGIES.build("co2", {"staleness": 0, "penalty": "gap_norm"})
    assert err.value.key == "penalty" and "needs staleness 1" in str(err.value)


def test_bad_option_exits_2_naming_the_key(tmp_path, capsys):
    path = write_scenario(tmp_path, small_scenario(
        strategy={"name": "co2", "penalty": {"kind": "const", "value": 0.5}}))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and "strategy.penalty.value" in err and "Traceback" not in err


def test_a_bare_kind_gives_its_defaults_and_the_resolved_config_rebuilds_it():
    from fedsim.config import to_dict

    sc = parse_scenario(small_scenario(strategy={"name": "co2", "penalty": "gap_norm",
                                                 "clip": {"kind": "norm", "threshold": 0.5}}))
    assert sc.strategy.penalty == GapNormPenalty(scale=1.0)
    resolved = to_dict(sc)["strategy"]
    assert resolved["penalty"] == {"kind": "gap_norm", "scale": 1.0}
    assert resolved["clip"] == {"kind": "norm", "threshold": 0.5}
    again = parse_scenario(small_scenario(strategy={k: v for k, v in resolved.items()}))
    assert again.strategy.penalty == sc.strategy.penalty and again.strategy.clip == sc.strategy.clip
