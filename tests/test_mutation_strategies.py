"""Tests added by the mutation pass over the seed strategies (strategies/*.py).

Each test kills a single-point mutant that the strategy's own tests, the conformance suite and
the byte tests let through, and checks a property from the paper (a hand-computed round, an
identity, a closed form). The mutant ids (S.., G.., D.., Z..) refer to the table of the whole
pass in tests/README.md ("Mutation pass").
"""

from __future__ import annotations

import torch

from fedsim import testing

TWO = ([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
THREE = ([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]], [[0.0, 1.0], [1.0, 0.0], [2.0, -1.0]])


def _grads(problem: testing.QuadraticProblem, x: torch.Tensor) -> torch.Tensor:
    """[N, d] exact gradients h_i (x - c_i)."""
    return problem.h * (x[None] - problem.c)


def test_fedavg_uniform_weighting_averages_over_the_participants():
    """FedAvg, weighting uniform, 1 full-batch step, clients {0, 1} of 3:
    x1 = x0 - lr * (1/|S|) sum_S grad_i(x0) (McMahan et al. Alg. 1 with p_i = 1/|S|).
    Kills 1/|S| -> 1/N in `participant_weights` (S01)."""
    problem = testing.QuadraticProblem(*THREE)
    strat = testing.build("fedavg", {"lr": 0.1, "local_steps": 1, "weighting": "uniform"}, problem)
    loop = testing.run(strat, problem, 1, participation=testing.MaskParticipation([[1, 1, 0]]))
    x0 = torch.zeros(2, dtype=torch.float64)
    want = x0 - 0.1 * _grads(problem, x0)[:2].mean(0)
    torch.testing.assert_close(loop.state.server["x"], want, rtol=1e-12, atol=1e-14)


def test_scaffold_client_without_steps_keeps_its_control_variate():
    """SCAFFOLD under a `work:` budget of [2, 0, 2] steps: client 1 takes no step, so its c_i
    stays 0 (option II has no gradients to average) while c = (1/N) sum_i c_i still holds.
    Kills `k_i > 0` -> `k_i >= 0` (S24: c_1 becomes c_1 - c once c != 0)."""
    from fedsim.work import WORK

    problem = testing.QuadraticProblem(*THREE)
    work = WORK.build("steps", {"steps": [2, 0, 2]}, num_clients=3, seed=0, sizes=problem.sizes,
                      batch_size=None)
    strat = testing.build("scaffold", {"lr": 0.1, "local_steps": 2}, problem)
    loop = testing.run(strat, problem, 3, work=work)
    c = loop.state.store.gather(torch.arange(3))["c"]
    assert torch.equal(c[1], torch.zeros(2, dtype=torch.float64))
    assert not torch.equal(c[0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(loop.state.server["c"], c.mean(0), rtol=1e-12, atol=1e-14)


def test_gossip_var_beta_weighs_the_nodes_own_model():
    """Tian et al. 2024's conservative combination avg_i = beta y_i + (1 - beta) mean_{N(i)} y_j,
    then a rescaling that keeps each tensor's mean: with lr 0 on the complete graph of 3 and
    beta 0.8, node i's tensor mean is 0.8 mean(x_i) + 0.2 mean of its neighbours' means. Kills
    swapping beta and 1 - beta (G08; the default beta 0.5 cannot see it)."""
    from tests.strategies.test_gossip import _pure_gossip
    from topologies import build_topology

    x0 = torch.tensor([[0.0, 1, 3], [1, 3, 2], [4, 0, -1]], dtype=torch.float64)
    x = _pure_gossip("gossip-var", x0, build_topology("complete", {}, n=3, seed=0), rounds=1, beta=0.8)
    mu = x0.mean(1)
    want = torch.stack([0.8 * mu[i] + 0.2 * (mu.sum() - mu[i]) / 2 for i in range(3)])
    torch.testing.assert_close(x.mean(1), want, rtol=0, atol=1e-12)


def test_feddyn_sample_weighted_h_is_the_weighted_mean_of_client_gradients():
    """FedDyn (Acar et al. 2021) keeps h = sum_i pi_i g_i over ALL clients; with sample weights
    pi_i = n_i / n and partial participation the server scales the participants' mean update by
    their share sum_S n_j / n. Kills that share -> |S| / N in `covered` (D05; the existing test
    covers uniform weights only)."""
    from fedsim.engines.loop import RoundLoop

    sizes = [3, 1, 4, 1, 5, 9, 2]
    base = testing.heterogeneous_quadratic(num_clients=7, dim=3, seed=3)
    problem = testing.QuadraticProblem(base.h, base.c, sizes=sizes)
    strat = testing.build("feddyn", {"alpha": 0.3, "weighting": "samples"}, problem)
    loop = RoundLoop(strat, problem, torch.zeros(3, dtype=torch.float64), rounds=6, seed=0,
                     participation=testing.bernoulli([0.4] * 7, seed=2))
    pi = torch.tensor(sizes, dtype=torch.float64)[:, None] / sum(sizes)
    for t in range(6):
        loop.step(t)
        g = loop.state.store.gather(torch.arange(7))["g"]
        torch.testing.assert_close(loop.state.server["h"], (pi * g).sum(0), rtol=0, atol=1e-13)


def test_dp_an_update_exactly_at_the_clip_counts_as_unclipped():
    """Andrew et al. 2021's bit is b_i = [||Delta_i|| <= C]: an update of norm exactly C is
    unchanged and counts as unclipped (the quantile is of norms <= C). Kills `<=` -> `<` (Z02)."""
    from strategies.dp import clip_rows

    delta = torch.tensor([[3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    rows, bits = clip_rows(delta, 5.0)
    assert bits.flatten().tolist() == [1.0, 0.0]
    torch.testing.assert_close(rows, torch.tensor([[3.0, 4.0], [3.0, 4.0]], dtype=torch.float64))


def test_dp_default_count_noise_is_one_twentieth_of_the_expected_participants():
    """Andrew et al. 2021 set the bit-count noise sigma_b = m / 20 (m expected participants), and
    the value noise z_D = (z^-2 - (2 sigma_b)^-2)^(-1/2) exists only for z < 2 sigma_b: with
    m = 10 (sigma_b = 0.5), z = 0.9 builds and z = 1.5 is refused with the default named.
    Kills the default 0.05 m -> 0.5 m (Z09)."""
    import pytest

    from fedsim.errors import ConfigError

    problem = testing.heterogeneous_quadratic(num_clients=10, dim=3, seed=0)
    full = testing.bernoulli([1.0] * 10)
    params = {"adaptive": True, "clip": 1.0, "accountant": "none"}
    testing.build("dp-fedavg", {**params, "noise_multiplier": 0.9}, problem, full)
    with pytest.raises(ConfigError, match=r"got 0\.5 \(the default 0\.05 m with m = 10"):
        testing.build("dp-fedavg", {**params, "noise_multiplier": 1.5}, problem, full)
