"""Gossip (D-SGD) and variance-corrected gossip: the fixtures of docs/algorithms.md#gossip-tests and
#gossip-var-tests.

Every run goes through the real engine loop (`fedsim.testing.run`) with a real topology, so
the sparse mixing, the time-invariant W cache and the node metrics are exercised too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import testing
from strategies.gossip_var import corrected_segments, tensor_variances, variance_correct
from strategies.local import local_sgd
from topologies import build_topology, spectral_gap


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pure_gossip(name: str, x0: torch.Tensor, topology, rounds: int, segments=None, **params):
    """`rounds` rounds of `name` with lr 0 (no gradients) from node models x0 [n, d]."""
    n, d = x0.shape
    problem = testing.QuadraticProblem(np.ones((n, d)), np.zeros((n, d)))
    strat = testing.build(name, {"lr": 0.0, **params}, problem, segments=segments)
    loop = testing.run(strat, problem, rounds, topology=topology, x0_of=lambda ids: x0[ids])
    return testing.final_models(loop)


# ---- D-SGD ---------------------------------------------------------------------------------

def test_complete_graph_with_uniform_weights_is_exact_averaging():
    # Prepare: Metropolis on K_5 gives W = J/5
    topo = build_topology("complete", {}, n=5, seed=0)
    x0 = _rows(5, 3)
    # Execute
    x = _pure_gossip("gossip", x0, topo, rounds=1)
    # Assert
    np.testing.assert_allclose(topo.mixing(0).dense(), np.full((5, 5), 0.2), rtol=0, atol=1e-15)
    torch.testing.assert_close(x, x0.mean(0).expand(5, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", ["atc", "dpsgd"])
def test_mixing_preserves_the_mean(order):
    # Prepare
    topo = build_topology("random_regular", {"degree": 3}, n=10, seed=1)
    x0 = _rows(10, 4, seed=1)
    # Execute
    x = _pure_gossip("gossip", x0, topo, rounds=2, order=order)
    # Assert: the mean is kept while the nodes moved
    torch.testing.assert_close(x.mean(0), x0.mean(0), rtol=0, atol=1e-12)
    assert (x - x0).abs().max() > 0.1


def test_metropolis_ring8_three_steps():
    """docs/algorithms.md#gossip-tests; numpy: W = MH(ring 8) (1/3 on i-1, i, i+1);
    x = W @ W @ W @ arange(8)."""
    # Prepare
    topo = build_topology("ring", {}, n=8, seed=0)
    x0 = torch.arange(8, dtype=torch.float64)[:, None]
    # Execute
    x = _pure_gossip("gossip", x0, topo, rounds=3)
    # Assert
    want = [2.962963, 2.185185, 2.296296, 3.0, 4.0, 4.703704, 4.814815, 4.037037]
    np.testing.assert_allclose(x[:, 0].numpy(), want, atol=5e-7)
    assert abs(float(x.mean()) - 3.5) < 1e-12


def test_consensus_contracts_at_least_at_the_spectral_gap_rate():
    # Prepare: ring 8, gap rho = 0.195262; engine metric consensus_distance = ||x - xbar||^2 / n
    topo = build_topology("ring", {}, n=8, seed=0)
    rho = spectral_gap(topo.mixing(0))
    x0 = _rows(8, 6, seed=2)
    d0 = float(((x0 - x0.mean(0)) ** 2).sum() / 8)
    problem = testing.QuadraticProblem(np.ones((8, 6)), np.zeros((8, 6)))
    seen: list[float] = []
    # Execute
    testing.run(testing.build("gossip", {"lr": 0.0}, problem), problem, 12, topology=topo,
                x0_of=lambda ids: x0[ids], eval_every=1,
                on_eval=lambda m: seen.append(m["consensus_distance"]))
    # Assert: ||x_T - xbar|| <= (1 - rho)^T ||x_0 - xbar||, and it does contract
    assert abs(rho - 0.195262) < 1e-6
    bound = [d0 * (1 - rho) ** (2 * t) for t in range(1, 13)]
    assert all(d <= b * (1 + 1e-12) for d, b in zip(seen, bound, strict=True)), (seen, bound)
    assert seen[-1] < 0.1 * d0


def test_time_varying_one_peer_exponential_averages_exactly_in_log2_n_rounds():
    # Prepare: W_t = (I + P_t) / 2 with partner i XOR 2^(t mod 3); the product over 3 rounds is J/8
    topo = build_topology("one_peer_exponential", {}, n=8, seed=0)
    x0 = _rows(8, 3, seed=6)
    # Execute
    x2 = _pure_gossip("gossip", x0, topo, rounds=2)
    x3 = _pure_gossip("gossip", x0, topo, rounds=3)
    # Assert
    assert (x2 - x0.mean(0)).abs().max() > 0.1
    torch.testing.assert_close(x3, x0.mean(0).expand(8, -1), rtol=0, atol=1e-12)


def test_atc_and_dpsgd_orders_one_round():
    """Hand-computed (numpy), complete graph of 3 (W = J/3), f_i = 0.5 h_i (x - c_i)^2::

        h, c, x, lr = [1, 2, 3], [0, 1, 2], [1, 2, 4], 0.1
        atc   = W @ (x - lr * h * (x - c))   # [2.0333333333] * 3
        dpsgd = W @ x - lr * h * (x - c)     # [2.2333333333, 2.1333333333, 1.7333333333]
    """
    # Prepare
    problem = testing.QuadraticProblem([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    topo = build_topology("complete", {}, n=3, seed=0)
    x0 = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    out = {}
    # Execute
    for order in ("atc", "dpsgd"):
        strat = testing.build("gossip", {"lr": 0.1, "order": order}, problem)
        out[order] = testing.final_models(testing.run(strat, problem, 1, topology=topo,
                                                      x0_of=lambda ids: x0[ids]))[:, 0]
    # Assert
    torch.testing.assert_close(out["atc"], torch.full((3,), 61 / 30, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(out["dpsgd"], torch.tensor([67 / 30, 64 / 30, 52 / 30],
                                                          dtype=torch.float64), rtol=0, atol=1e-12)


def _central_sgd(problem, x, rounds: int, steps: int, lr: float, client: int = 0):
    ids = torch.tensor([client])
    for t in range(rounds):
        x, _ = local_sgd(x, problem.oracle(ids, t), steps, lr)
    return x[0]


def test_dsgd_with_one_node_is_centralized_sgd():
    # Prepare: one noisy node; the oracle's minibatch noise is keyed by (round, node, step)
    problem = testing.heterogeneous_quadratic(num_clients=1, dim=3, noise=0.3, seed=4)
    topo = build_topology("complete", {}, n=1, seed=0)
    strat = testing.build("gossip", {"lr": 0.1, "local_steps": 3}, problem)
    # Execute
    x = testing.final_models(testing.run(strat, problem, 5, topology=topo))
    # Assert
    ref = _central_sgd(problem, torch.zeros(1, 3, dtype=torch.float64), 5, 3, 0.1)
    torch.testing.assert_close(x[0], ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("order", ["atc", "dpsgd"])
def test_dsgd_with_identical_data_and_init_is_centralized_gd(order):
    # Prepare: 6 identical noiseless nodes on a ring
    g = np.random.default_rng(5)
    h, c = g.uniform(0.5, 2.0, 3), g.normal(size=3)
    problem = testing.QuadraticProblem(np.tile(h, (6, 1)), np.tile(c, (6, 1)))
    topo = build_topology("ring", {}, n=6, seed=0)
    strat = testing.build("gossip", {"lr": 0.2, "local_steps": 2, "order": order}, problem)
    # Execute
    x = testing.final_models(testing.run(strat, problem, 4, topology=topo))
    # Assert
    ref = _central_sgd(problem, torch.zeros(1, 3, dtype=torch.float64), 4, 2, 0.2)
    torch.testing.assert_close(x, ref.expand(6, -1), rtol=1e-12, atol=1e-14)


# ---- variance correction -------------------------------------------------------------------

SEGMENTS = (("0.weight", 0, 6), ("0.bias", 6, 9), ("1.weight", 9, 12), ("1.bias", 12, 13))


def test_corrected_segments_skip_one_element_tensors_and_optionally_biases():
    assert corrected_segments(SEGMENTS) == [(0, 6), (6, 9), (9, 12)]
    assert corrected_segments(SEGMENTS, weights_only=True) == [(0, 6), (9, 12)]


@pytest.mark.parametrize("unbiased", [True, False])
def test_variance_correction_sets_the_target_and_keeps_the_mean(unbiased):
    # Prepare
    segs = corrected_segments(SEGMENTS)
    avg = _rows(4, 13, seed=3)
    target = torch.tensor([[0.5, 2.0, 1e-3]] * 4, dtype=torch.float64) * torch.arange(1, 5)[:, None]
    v = tensor_variances(avg, segs, unbiased)
    # Execute
    exact = variance_correct(avg, target, segs, eps=0.0, unbiased=unbiased)
    damped = variance_correct(avg, target, segs, eps=1e-4, unbiased=unbiased)
    # Assert: Var = target (eps 0), Var = v (t + eps) / (v + eps) (eps 1e-4); means kept
    torch.testing.assert_close(tensor_variances(exact, segs, unbiased), target, rtol=1e-12, atol=0)
    torch.testing.assert_close(tensor_variances(damped, segs, unbiased),
                               v * (target + 1e-4) / (v + 1e-4), rtol=1e-12, atol=0)
    for a, b in segs:
        torch.testing.assert_close(exact[:, a:b].mean(1), avg[:, a:b].mean(1), rtol=0, atol=1e-14)
    assert torch.equal(exact[:, 12], avg[:, 12]) and torch.equal(damped[:, 12], avg[:, 12])


def test_gossip_var_one_round_by_hand():
    """Complete graph of 3, one tensor of 3 entries, lr 0, beta 0.5, eps 1e-4, unbiased (numpy)::

        X = np.array([[0, 1, 3], [1, 3, 2], [4, 0, -1.]])
        for i in range(3):
            nb = [j for j in range(3) if j != i]
            avg = 0.5 * X[i] + 0.5 * X[nb].mean(0)
            t = np.mean([X[j].var(ddof=1) for j in nb])
            mu, v = avg.mean(), avg.var(ddof=1)
            out_i = (avg - mu) * np.sqrt((t + 1e-4) / (v + 1e-4)) + mu
    """
    # Prepare
    x0 = torch.tensor([[0.0, 1, 3], [1, 3, 2], [4, 0, -1]], dtype=torch.float64)
    # Execute
    x = _pure_gossip("gossip-var", x0, build_topology("complete", {}, n=3, seed=0), rounds=1)
    # Assert
    want = torch.tensor([[0.2626439007, 0.2626439007, 3.7247121986],
                         [0.3390834662, 4.0718330675, 0.3390834662],
                         [2.8058322839, 0.7978791695, 0.3962885466]], dtype=torch.float64)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-9)


def test_gossip_var_is_the_identity_when_all_models_are_equal():
    # Prepare
    topo = build_topology("random_regular", {"degree": 3}, n=8, seed=0)
    x0 = _rows(1, 13, seed=4).expand(8, -1)
    # Execute
    x = _pure_gossip("gossip-var", x0, topo, rounds=3, segments=SEGMENTS)
    # Assert
    torch.testing.assert_close(x, x0, rtol=1e-12, atol=1e-14)


def test_gossip_var_leaves_one_element_tensors_to_plain_averaging():
    # Prepare: ring 6, beta 0.5: the 1-element bias is averaged, never rescaled
    topo = build_topology("ring", {}, n=6, seed=0)
    x0 = _rows(6, 13, seed=5)
    mean_w = torch.tensor(np.roll(np.eye(6), 1, 1) + np.roll(np.eye(6), -1, 1)) / 2
    # Execute
    x = _pure_gossip("gossip-var", x0, topo, rounds=1, segments=SEGMENTS)
    # Assert
    torch.testing.assert_close(x[:, 12], 0.5 * x0[:, 12] + 0.5 * mean_w @ x0[:, 12],
                               rtol=0, atol=1e-14)
    assert not torch.allclose(x[:, :6], 0.5 * x0[:, :6] + 0.5 * mean_w @ x0[:, :6])


def test_gossip_var_node_without_neighbours_keeps_its_model():
    # Prepare: one-peer exponential on 6 nodes; round 2 pairs i with i XOR 4, so 2 and 3 idle
    topo = build_topology("one_peer_exponential", {}, n=6, seed=0)
    x0 = _rows(6, 13, seed=7)
    # Execute
    x2 = _pure_gossip("gossip-var", x0, topo, rounds=2, segments=SEGMENTS)
    x3 = _pure_gossip("gossip-var", x0, topo, rounds=3, segments=SEGMENTS)
    # Assert
    assert torch.equal(x3[2:4], x2[2:4])
    assert not torch.allclose(x3[[0, 1, 4, 5]], x2[[0, 1, 4, 5]])


# ---- behaviour and scenarios ---------------------------------------------------------------

def _digits_node_models(strategy: dict, rounds: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Initial and final node models [n, P] of a 16-node digits MLP with independent inits."""
    from fedsim.config import parse_scenario
    from fedsim.engines.loop import RoundLoop
    from fedsim.setup import build_setup

    sc = parse_scenario({
        "seed": 0, "rounds": rounds, "data": {"dataset": "digits", "clients": 16},
        "model": {"kind": "mlp", "hidden": [32], "init": "independent"},
        "topology": {"kind": "random_regular", "degree": 4},
        "strategy": {"batch_size": 16, **strategy}, "engine": {"dtype": "float64"},
        "eval": {"every": rounds}})
    setup = build_setup(sc)
    loop = RoundLoop.from_setup(setup)
    ids = torch.arange(16)
    x0 = setup.initial_models(ids)
    loop.run()
    return x0, testing.final_models(loop), list(setup.model.spec.segments())


@pytest.mark.parametrize("lr", [0.0, 0.05])
def test_plain_gossip_shrinks_layer_variance_that_gossip_var_keeps(lr):
    # Prepare / Execute: 10 rounds of each from the same independent inits
    x0, plain, segments = _digits_node_models({"name": "gossip", "lr": lr}, 10)
    _, corrected, _ = _digits_node_models({"name": "gossip-var", "lr": lr}, 10)
    segs = corrected_segments(segments, weights_only=True)
    # Assert: per-layer weight variance, averaged over nodes, relative to the initial one
    v0 = tensor_variances(x0, segs).mean(0)
    ratio_plain = tensor_variances(plain, segs).mean(0) / v0
    ratio_vc = tensor_variances(corrected, segs).mean(0) / v0
    assert (ratio_plain < 0.2).all(), ratio_plain
    assert ((ratio_vc > 0.8) & (ratio_vc < 1.25)).all(), ratio_vc


# ---- gossip-var's local optimizer (issue 16) -----------------------------------------------

DFL_TORCH = {"name": "momentum", "mass": 0.9, "weight_decay": 1e-4}   # SGD(lr 0.01, momentum 0.9, wd 1e-4)


def test_gossip_var_alone_with_the_reference_optimizer_is_torch_sgd_across_rounds():
    """One node (no neighbours: the combination keeps y_i): 4 rounds of 3 local steps equal 12
    uninterrupted steps of torch.optim.SGD(lr 0.01, momentum 0.9, weight_decay 1e-4), so the
    heavy-ball buffer persists across rounds (DFL_torch keeps one optimizer per node)."""
    # Prepare
    problem = testing.QuadraticProblem([[1.0, 3.0, 0.5]], [[1.0, -2.0, 0.3]])
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(12):
        p.grad = problem.h[0] * (p.detach() - problem.c[0])
        opt.step()
    strat = testing.build("gossip-var", {"lr": 0.01, "local_steps": 3, "optimizer": DFL_TORCH}, problem)
    # Execute
    x = testing.final_models(testing.run(strat, problem, 4, topology=build_topology("complete", {}, n=1,
                                                                                        seed=0)))
    # Assert
    torch.testing.assert_close(x[0], p.detach(), rtol=1e-13, atol=1e-15)


def test_gossip_var_keeps_each_nodes_buffer_through_the_combination():
    """Complete graph of 3, K = 1: after round 0 node i's buffer is its own g_i(x_i^0) + wd x_i^0
    (not averaged, though the models are); round 1 adds to it: b = 0.9 b + g_i(x_i^1) + wd x_i^1."""
    # Prepare
    problem = testing.QuadraticProblem(np.array([[1.0, 2.0, 0.5, 1.5]] * 3) * [[1], [2], [3]],
                                       _rows(3, 4, seed=2).numpy())
    topo, x0 = build_topology("complete", {}, n=3, seed=0), _rows(3, 4, seed=5)
    params = {"lr": 0.05, "optimizer": DFL_TORCH}

    def run(rounds):
        strat = testing.build("gossip-var", params, problem, segments=(("w", 0, 4),))
        loop = testing.run(strat, problem, rounds, topology=topo, x0_of=lambda ids: x0[ids])
        return testing.final_models(loop), loop.state.store.gather(torch.arange(3))["buf"]

    def grad(x):
        return problem.h * (x - problem.c) + 1e-4 * x
    # Execute
    x1, b1 = run(1)
    _, b2 = run(2)
    # Assert
    torch.testing.assert_close(b1, grad(x0), rtol=0, atol=1e-15)
    assert not torch.allclose(x1, x0 - 0.05 * grad(x0))                # the models were combined
    torch.testing.assert_close(b2, 0.9 * b1 + grad(x1), rtol=0, atol=1e-14)


def test_gossip_var_default_optimizer_is_plain_sgd_as_gossip():
    from strategies import STRATEGIES

    opt = STRATEGIES.params("gossip-var")["optimizer"].default
    assert opt.spec == {"name": "sgd", "weight_decay": 0.0}
    assert STRATEGIES.params("gossip-var")["lr"].default == STRATEGIES.params("gossip")["lr"].default
