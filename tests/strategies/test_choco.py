"""CHOCO-SGD (compressed gossip, arXiv:1902.00340) through the real engine loop."""

from __future__ import annotations

import numpy as np
import torch

from fedsim import testing
from topologies import build_topology


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(name, params, problem, rounds, topo, x0=None):
    x0_of = None if x0 is None else (lambda ids: x0[ids])
    loop = testing.run(testing.build(name, params, problem), problem, rounds, topology=topo,
                       x0_of=x0_of)
    return testing.final_models(loop), loop.state.bytes.up


def test_choco_one_round_by_hand():
    """Complete graph of 3 (W = J/3), lr 0, top-1, gamma 0.5, x^ = 0 (numpy)::

        X = np.array([[3, -1], [0.5, 2], [-4, 1.]])
        Q = top1 of each row of X - 0 = [[3, 0], [0, 2], [-4, 0]]
        X + 0.5 * (Q.mean(0) - Q)   # [[4/3, -2/3], [1/3, 4/3], [-13/6, 4/3]]
    """
    # Prepare
    problem = testing.QuadraticProblem(np.ones((3, 2)), np.zeros((3, 2)))
    x0 = torch.tensor([[3.0, -1.0], [0.5, 2.0], [-4.0, 1.0]], dtype=torch.float64)
    params = {"lr": 0.0, "gamma": 0.5, "compressor": {"name": "top_k", "k": 1}}
    # Execute
    x, up = _run("choco", params, problem, 1, build_topology("complete", {}, n=3, seed=0), x0)
    # Assert: 2 neighbours each, one float64 value (64 bits) + one index (1 bit) -> 9 bytes
    want = torch.tensor([[4 / 3, -2 / 3], [1 / 3, 4 / 3], [-13 / 6, 4 / 3]], dtype=torch.float64)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-12)
    assert up == 3 * 2 * 9


def test_choco_with_identity_compressor_is_dsgd():
    # Prepare
    problem = testing.heterogeneous_quadratic(num_clients=8, dim=5, noise=0.1, seed=3)
    topo = build_topology("ring", {}, n=8, seed=0)
    # Execute
    x_choco, _ = _run("choco", {"gamma": 1.0, "local_steps": 2, "compressor": {"name": "identity"}},
                      problem, 10, topo)
    x_dsgd, _ = _run("gossip", {"local_steps": 2}, problem, 10, topo)
    # Assert
    torch.testing.assert_close(x_choco, x_dsgd, rtol=0, atol=1e-12)


def test_choco_gossip_reaches_the_exact_average_with_fewer_bytes():
    # Prepare: pure averaging (lr 0), top-10 % of 20 coordinates, ring of 8
    problem = testing.QuadraticProblem(np.ones((8, 20)), np.zeros((8, 20)))
    topo = build_topology("ring", {}, n=8, seed=0)
    x0 = _rows(8, 20)
    # Execute
    x, up = _run("choco", {"lr": 0.0, "gamma": 0.3}, problem, 150, topo, x0)
    _, up_dense = _run("gossip", {"lr": 0.0}, problem, 1, topo, x0)
    # Assert: the mean is kept exactly, consensus at it; a message is 2 values + 2 indices,
    # 2 * (64 + 5) bits -> 18 bytes, against 20 * 8 bytes dense (float64: one byte rule)
    torch.testing.assert_close(x.mean(0), x0.mean(0), rtol=0, atol=1e-12)
    assert (x - x0.mean(0)).abs().max() < 1e-3
    assert up * 160 == 150 * up_dense * 18
