"""Participation patterns: rates, exact generators (FedAU WorkerSampler), keyed random access."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.errors import ConfigError
from fedsim.participation import PARTICIPATION, build_participation


def _build(kind: str, n: int = 200, seed: int = 0, label_dist=None, **params):
    return build_participation(kind, params, num_clients=n, seed=seed, label_dist=label_dist)


def _masks(part, rounds: int) -> np.ndarray:
    return np.stack([part.mask(t) for t in range(rounds)])


def test_registered_names() -> None:
    assert {"full", "uniform", "bernoulli", "markov", "cyclic"} <= set(PARTICIPATION.names())
    assert PARTICIPATION.describe("markov")


def test_full() -> None:
    part = _build("full", n=5)
    assert part.mask(3).all() and part.mask(3).dtype == bool
    assert part.probabilities.tolist() == [1] * 5


@pytest.mark.parametrize("params,k", [({"clients_per_round": 7}, 7), ({"fraction": 0.1}, 5)])
def test_uniform_exactly_k(params: dict, k: int) -> None:
    part = _build("uniform", n=50, **params)
    m = _masks(part, 2000)
    assert (m.sum(1) == k).all()
    assert np.allclose(m.mean(0), k / 50, atol=0.04) and np.allclose(part.probabilities, k / 50)
    assert not np.array_equal(m[0], m[1])


def test_bernoulli_rates() -> None:
    part = _build("bernoulli", p_range=[0.1, 0.9])
    assert part.probabilities.min() >= 0.1 and part.probabilities.max() <= 0.9
    rate = _masks(part, 2000).mean(0)
    assert np.abs(rate - part.probabilities).max() < 0.06
    one = _build("bernoulli", n=4, p=[1.0, 0.5, 0.5, 0.25])
    assert _masks(one, 100)[:, 0].all()


def test_markov_rates_and_transitions() -> None:
    part = _build("markov", n=1000, p=0.2, q=0.05)
    m = _masks(part, 600)
    assert abs(m.mean() - 0.2) < 0.01
    prev, nxt = m[:-1], m[1:]
    assert abs((prev & ~nxt).sum() / prev.sum() - 0.05 * (1 / 0.2 - 1)) < 0.01   # on -> off
    assert abs((~prev & nxt).sum() / (~prev).sum() - 0.05) < 0.005                # off -> on


def test_markov_q_adjustment() -> None:
    p = 0.02
    part = _build("markov", n=2000, p=p, q=0.05)   # q (1/p - 1) = 2.45 > 1
    m = _masks(part, 1000)
    prev, nxt = m[:-1], m[1:]
    assert (prev & ~nxt).sum() == prev.sum()                                       # on -> off = 1
    assert abs((~prev & nxt).sum() / (~prev).sum() - 0.05 / 2.45) < 0.002
    assert abs(m.mean() - p) < 0.002


def test_markov_heterogeneous_p() -> None:
    part = _build("markov", n=400, p_range=[0.05, 0.5], q=0.2)
    rate = _masks(part, 1500).mean(0)
    assert np.corrcoef(rate, part.probabilities)[0, 1] > 0.95
    assert abs(rate.mean() - part.probabilities.mean()) < 0.01


def _reference_cyclic(p: float, period: int, start: int, rounds: int) -> list[bool]:
    """IBM/fedau util/util.py WorkerSampler, 'cyclic-L', with a given initial rounds_to_switch."""
    active = max(1, int(np.round(period * p)))
    inactive = max(1, period - active)
    on, to_switch, out = False, start, []
    for _ in range(rounds):
        if to_switch == 0:
            on = not on
            to_switch = active if on else inactive
        to_switch -= 1
        out.append(on)
    return out


def test_cyclic_hand_traced() -> None:
    # p = 0.3, L = 10: 3 rounds on, 7 off; a client whose counter starts at 2 is off in rounds
    # 0-1, on in 2-4, off in 5-11, on in 12-14, ...
    assert _reference_cyclic(0.3, 10, 2, 16) == [bool(int(c)) for c in "0011100000001110"]
    ps = [0.3, 0.05, 0.5, 0.97, 1.0, 0.004]
    part = _build("cyclic", n=len(ps), p=ps, period=10)
    m = _masks(part, 60)
    for n, p in enumerate(ps):
        start = int(np.argmax(m[:, n]))       # first active round = the initial counter
        assert start < max(1, 10 - max(1, round(10 * p)))
        assert m[:, n].tolist() == _reference_cyclic(p, 10, start, 60)
    assert np.allclose(part.probabilities, [0.3, 1 / 10, 0.5, 10 / 11, 10 / 11, 1 / 10])
    assert np.allclose(part.p_nominal, ps)


def test_cyclic_rates() -> None:
    part = _build("cyclic", p_range=[0.02, 0.6], period=100)
    rate = _masks(part, 1000).mean(0)
    assert np.abs(rate - part.probabilities).max() <= 100 / 1000
    assert np.abs(part.probabilities - part.p_nominal).max() <= 0.005 + 1e-12


@pytest.mark.parametrize("kind,params", [("uniform", {"fraction": 0.2}), ("bernoulli", {"p": 0.3}),
                                         ("markov", {"p": 0.3}), ("cyclic", {"p": 0.3})])
def test_order_independent_and_keyed(kind: str, params: dict) -> None:
    seq = _masks(_build(kind, **params), 700)
    part = _build(kind, **params)
    for t in (50, 10, 50, 600, 300, 699, 0, 257):
        assert np.array_equal(part.mask(t), seq[t])
    part.mask(5)[:] = True                              # callers cannot corrupt the cache
    assert np.array_equal(part.mask(5), seq[5])
    other = _masks(_build(kind, seed=1, **params), 700)
    assert not np.array_equal(seq, other)


def test_per_client_streams_do_not_depend_on_n() -> None:
    small = _masks(_build("markov", n=10, p=0.3), 100)
    big = _masks(_build("markov", n=300, p=0.3), 100)
    assert np.array_equal(small, big[:, :10])


def _label_dist(n: int, classes: int = 10, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(classes, 0.1), n)


def test_p_from_labels() -> None:
    q = _label_dist(250)
    part = _build("bernoulli", n=250, label_dist=q, p_from_labels=True)
    p = part.probabilities
    assert p.min() >= 0.02 and abs(p.mean() - 0.1) < 0.04 and p.std() > 0.02
    same = _build("cyclic", n=250, label_dist=q, p_from_labels=True)
    assert np.allclose(same.p_nominal, p)                # one p-spec for every pattern
    custom = _build("markov", n=250, label_dist=q, p_from_labels=True, p_mean=0.3, p_min=0.1,
                    dirichlet_alpha=1.0)
    assert custom.probabilities.min() >= 0.1 and custom.probabilities.max() <= 1.0
    assert abs(custom.probabilities.mean() - 0.3) < 0.06


@pytest.mark.parametrize("kind,params,match", [
    ("bernoulli", {"p": 1.5}, "outside"), ("bernoulli", {"p": 0.0}, "outside"),
    ("bernoulli", {"p": [0.5, 0.5]}, "one probability per client"),
    ("markov", {}, "exactly one"), ("cyclic", {"p": 0.1, "p_range": [0.1, 0.2]}, "exactly one"),
    ("bernoulli", {"p_range": [0.5, 0.2]}, "lo <= hi"),
    ("bernoulli", {"p_from_labels": True}, "label distribution"),
    ("bernoulli", {"p": 0.1, "p_mean": 0.2}, "only used with p_from_labels"),
    ("uniform", {"clients_per_round": 4}, "more clients per round"),
    ("uniform", {}, "exactly one"), ("uniform", {"fraction": 0}, "greater than 0"),
    ("markov", {"p": 0.5, "q": 0}, "greater than 0"), ("cyclic", {"p": 0.5, "period": 1}, "period"),
    ("bernoulli", {"prob": 0.5}, "unknown key"), ("nope", {}, "unknown participation")])
def test_errors(kind: str, params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _build(kind, n=3, **params)


def test_empty_round_is_legal() -> None:
    m = _masks(_build("bernoulli", n=3, p=0.05), 50)
    assert (m.sum(1) == 0).any()
