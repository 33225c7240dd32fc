"""Test kit for strategies: closed-form problems, a runner, and conformance checks.

Users unit-test their own strategies with deterministic seeds in a few lines::

    from fedsim import testing
    from mypkg import my_strategy

    def test_my_strategy_conforms():
        testing.check_strategy(lambda: my_strategy(lr=0.1))

    def test_my_strategy_beats_drift():
        loop = testing.run(my_strategy(lr=0.1, local_steps=10), testing.drift_quadratic(), rounds=300)
        assert abs(float(loop.state.server["x"][0]) - 0.8) < 1e-6

Every runner goes through the real engine loop (`fedsim.engines.loop.RoundLoop`), so what
passes here behaves the same in `fedsim run`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedsim import rng
from fedsim import round as kernel
from fedsim.engines.loop import RoundLoop
from fedsim.types import Strategy, Tree


class QuadraticOracle:
    """Gradients of f_i(x) = 0.5 * sum_j h_ij (x_j - c_ij)^2 for a block of clients.

    With `noise` > 0 each call adds N(0, noise^2) keyed by (seed, round, client, step), so a
    repeated (x, step) gives the same stochastic gradient.
    """

    def __init__(self, h: torch.Tensor, c: torch.Tensor, ids: torch.Tensor, round: int,
                 noise: float, seed: int) -> None:
        self.h, self.c, self.ids, self.round, self.noise, self.seed = h[ids], c[ids], ids, round, noise, seed

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x - self.c
        return 0.5 * (self.h * r * r).sum(-1), self.h * r

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss, g = self.full(x)
        if self.noise:
            d = x.shape[-1]
            u1 = rng.uniform_torch(self.seed, rng.DATA, self.round, self.ids[:, None], step,
                                   torch.arange(d)[None, :], 0, device=x.device)
            u2 = rng.uniform_torch(self.seed, rng.DATA, self.round, self.ids[:, None], step,
                                   torch.arange(d)[None, :], 1, device=x.device)
            z = torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * torch.pi * u2)  # Box-Muller
            g = g + self.noise * z.to(g.dtype)
        return loss, g


class QuadraticProblem:
    """N clients with diagonal quadratics f_i(x) = 0.5 (x - c_i)^T diag(h_i) (x - c_i).

    The objective is f = sum_i w_i f_i with w_i = n_i / sum n (equal sizes: the plain mean);
    its minimiser is x* = sum_i w_i h_i c_i / sum_i w_i h_i (element-wise).
    """

    def __init__(self, h: Any, c: Any, sizes: Any = None, noise: float = 0.0, seed: int = 0,
                 dtype: torch.dtype = torch.float64, device: Any = "cpu") -> None:
        self.h = torch.as_tensor(np.asarray(h, dtype=np.float64), dtype=dtype, device=device)
        self.c = torch.as_tensor(np.asarray(c, dtype=np.float64), dtype=dtype, device=device)
        if self.h.dim() == 1:
            self.h, self.c = self.h[:, None], self.c[:, None]
        self.num_clients, self.dim = self.h.shape
        self.num_params = self.dim
        self.batch_size: int | None = None  # a "minibatch" is the client's whole (exact) objective
        self.flops_per_sample = 0.0
        self.sizes = np.ones(self.num_clients, np.int64) if sizes is None else np.asarray(sizes, np.int64)
        self.noise, self.seed = noise, seed
        self.device, self.dtype = self.h.device, dtype

    @property
    def optimum(self) -> torch.Tensor:
        w = torch.as_tensor(self.sizes / self.sizes.sum(), dtype=self.dtype, device=self.device)[:, None]
        return (w * self.h * self.c).sum(0) / (w * self.h).sum(0)

    def objective(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) for x [k, d] -> [k]."""
        w = torch.as_tensor(self.sizes / self.sizes.sum(), dtype=self.dtype, device=self.device)
        r = x[:, None, :] - self.c[None]
        return 0.5 * ((self.h[None] * r * r).sum(-1) * w[None]).sum(-1)

    def oracle(self, ids: torch.Tensor, round: int) -> QuadraticOracle:
        return QuadraticOracle(self.h, self.c, ids, round, self.noise, self.seed)

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.objective(x), None

    def restrict(self, owned: np.ndarray) -> QuadraticProblem:
        return self


def drift_quadratic(**kw: Any) -> QuadraticProblem:
    """Client-drift fixture (docs/algorithms.md#drift-quadratic): h = [1, 4], c = [0, 1], d = 1, x* = 0.8.

    FedAvg with lr 0.1 and 10 full-batch local steps stops at 0.6041260077; SCAFFOLD reaches 0.8.
    """
    return QuadraticProblem([1.0, 4.0], [0.0, 1.0], **kw)


def participation_bias_quadratic(**kw: Any) -> tuple[QuadraticProblem, np.ndarray]:
    """FedAU's bias fixture (docs/algorithms.md#participation-bias-quadratic).

    f_n = 0.5 (x - c_n)^2, c = [0, 1].

    Returns (problem, p) with participation probabilities p = [0.9, 0.1]; x* = 0.5. FedAvg over
    participants converges near 0.06 under Bernoulli(p); FedAU and known-prob near 0.5.
    """
    return QuadraticProblem([1.0, 1.0], [0.0, 1.0], **kw), np.array([0.9, 0.1])


def heterogeneous_quadratic(num_clients: int = 8, dim: int = 5, seed: int = 0,
                            **kw: Any) -> QuadraticProblem:
    """Random diagonal quadratics (h in [0.5, 2], c ~ N(0, 1)) keyed by `seed`."""
    g = rng.np_rng(seed, rng.DATASET, 0)
    return QuadraticProblem(g.uniform(0.5, 2.0, (num_clients, dim)), g.normal(size=(num_clients, dim)),
                            seed=seed, **kw)


class MaskParticipation:
    """Participation from an explicit bool matrix [rounds, N] (cycled)."""

    def __init__(self, masks: Any) -> None:
        self.masks = np.asarray(masks, dtype=bool)
        self.num_clients = self.masks.shape[1]
        self.probabilities = None

    def mask(self, t: int) -> np.ndarray:
        return self.masks[t % len(self.masks)]


def bernoulli(p: Any, seed: int = 0) -> Any:
    """Independent Bernoulli(p_n) participation keyed by (seed, client, round)."""
    from fedsim.participation import build_participation

    p = [float(v) for v in np.atleast_1d(p)]
    return build_participation("bernoulli", {"p": p}, num_clients=len(p), seed=seed, label_dist=None)


def run(strategy: Strategy, problem: Any, rounds: int, *, x0: Any = None, seed: int = 0,
        participation: Any = None, topology: Any = None, chunk_size: int | None = None,
        eval_every: int | None = None, x0_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_eval: Callable[[dict], None] | None = None, work: Any = None,
        system: Any = None) -> RoundLoop:
    """Run `strategy` on `problem` through the real engine loop; returns the finished loop.

    The final model is `loop.state.server["x"]` (server strategies) or the client rows
    `loop.state.store.gather(ids)["x"]` (gossip strategies).
    """
    if x0 is None:
        x0 = torch.zeros(problem.dim, dtype=problem.dtype, device=problem.device)
    loop = RoundLoop(strategy, problem, torch.as_tensor(x0), rounds=rounds, seed=seed,
                     participation=participation, topology=topology, chunk_size=chunk_size,
                     eval_every=eval_every or rounds, x0_of=x0_of, on_eval=on_eval, work=work,
                     system=system)
    loop.run()
    return loop


def final_models(loop: RoundLoop) -> torch.Tensor:
    """[P] global model (reduce strategies) or [N, P] node models (mix strategies)."""
    st = loop.strategy
    if st.comm == "reduce":
        return loop.state.server[st.model_key]
    return loop.state.store.gather(torch.arange(loop.num_clients, device=loop.device))[st.model_key]


# ---- conformance ---------------------------------------------------------------------------

def _clone(tree: Tree) -> Tree:
    return {k: v.clone() for k, v in tree.items()}


def _equal(a: Tree, b: Tree) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_block(strategy: Strategy, problem: Any, server: Tree, clients: Tree, t: int,
                 seed: int) -> None:
    """One block of all N clients through local / server_update / node_update."""
    n, p = problem.num_clients, problem.dim
    ids = torch.arange(n)
    ctx = kernel.make_ctx(t, seed, ids, torch.ones(n, dtype=torch.bool),
                          torch.as_tensor(problem.sizes), problem.dtype)
    s0, c0 = _clone(server), _clone(clients)
    payload, new_clients, info = strategy.local(server, clients, problem.oracle(ids, t), ctx)
    assert _equal(server, s0) and _equal(clients, c0), f"round {t}: local() must not modify its inputs"
    for k, v in {**payload, **new_clients}.items():
        assert v.shape[0] == n, f"{k!r} must have a leading client axis of {n}, got {tuple(v.shape)}"
    assert set(new_clients) == set(clients), "local() must return the same client-state keys"
    declared = strategy.payload(p)
    got = {k: tuple(v.shape[1:]) for k, v in payload.items()}
    assert got == declared, f"payload {got} differs from the declared Strategy.payload {declared}"
    for k in ("loss", "sent_values", "sent_bits"):
        if k in info:
            assert info[k].shape == (n,), f"info[{k!r}] must have shape [m]"
    if strategy.comm == "reduce":
        assert strategy.server_update is not None
        reduced = kernel.block_partial(strategy, server, payload, ctx)
        r0 = _clone(reduced)
        new_server = strategy.server_update(server, reduced, ctx)
        assert _equal(server, s0) and _equal(reduced, r0), \
            f"round {t}: server_update() must not modify its inputs"
        assert new_server[strategy.model_key].shape == (p,)
        strategy.server_update(server, {}, ctx)  # a round nobody took part in must be legal
        assert _equal(server, s0), "server_update(server, {}) must not modify its inputs"
    else:
        assert strategy.node_update is not None
        p0, n0 = _clone(payload), _clone(new_clients)
        out = strategy.node_update(new_clients, payload, ctx)
        assert _equal(payload, p0) and _equal(new_clients, n0), "node_update() must not modify its inputs"
        assert out[strategy.model_key].shape == (n, p)


def check_purity_and_shapes(strategy: Strategy, problem: Any, *, seed: int = 0, warm_rounds: int = 3,
                            participation: Any = None, topology: Any = None) -> None:
    """Shapes, the declared payload, and inputs left unmodified: on fresh state, and again on
    the server and client state reached after `warm_rounds` rounds (state-dependent branches:
    EF21's seen rows, FedAU's counters, CO2's anchor)."""
    n = problem.num_clients
    x0 = torch.zeros(problem.dim, dtype=problem.dtype)
    ids = torch.arange(n)
    clients = strategy.init_clients(x0, ids)
    for k, v in clients.items():
        assert v.shape[0] == n, f"client state {k!r} must have a leading client axis of {n}"
    _check_block(strategy, problem, strategy.init_server(x0), clients, 0, seed)
    warm = run(strategy, problem, warm_rounds, seed=seed, participation=participation, topology=topology)
    _check_block(strategy, problem, warm.state.server, warm.state.store.gather(ids), warm_rounds, seed)


def check_strategy(make: Callable[[], Strategy], problem: Any = None, rounds: int = 30, *,
                   participation: Any = None, topology: Any = None, seed: int = 0,
                   atol: float = 1e-10) -> RoundLoop:
    """Conformance: shapes and purity, bitwise rerun determinism, chunking invariance.

    Args:
      make: builds a fresh strategy (called several times).
      problem: defaults to an 8-client heterogeneous quadratic in float64.
      participation, topology: as for `run` (topology needed by gossip strategies).

    Returns the reference run's loop (for extra assertions such as convergence).
    """
    problem = problem or heterogeneous_quadratic(noise=0.05, seed=seed)
    check_purity_and_shapes(make(), problem, seed=seed, participation=participation, topology=topology)
    kw = dict(participation=participation, topology=topology, seed=seed)
    ref = run(make(), problem, rounds, **kw)
    again = run(make(), problem, rounds, **kw)
    assert torch.equal(final_models(ref), final_models(again)), "rerun must be bitwise identical"
    for chunk in (1, 3):
        other = run(make(), problem, rounds, chunk_size=chunk, **kw)
        torch.testing.assert_close(final_models(other), final_models(ref), rtol=0, atol=atol,
                                   msg=f"chunk_size={chunk} changed the result")
    return ref


__all__ = ["QuadraticProblem", "QuadraticOracle", "drift_quadratic", "participation_bias_quadratic",
           "heterogeneous_quadratic", "MaskParticipation", "bernoulli", "run", "final_models",
           "check_purity_and_shapes", "check_strategy", "build"]


def build(name: str, params: dict | None = None, problem: Any = None, participation: Any = None,
          segments: tuple[tuple[str, int, int], ...] | None = None) -> Strategy:
    """A registered strategy, its `runtime` filled from a test problem (for factories that ask)."""
    from fedsim.types import StrategyRuntime
    from strategies import STRATEGIES

    runtime = None
    if problem is not None:
        n = problem.num_clients
        runtime = StrategyRuntime(
            num_clients=n, segments=segments or (("x", 0, problem.dim),),
            num_samples=np.asarray(problem.sizes),
            probabilities=getattr(participation, "probabilities", None) if participation is not None
            else np.ones(n),
            p_nominal=getattr(participation, "p_nominal", None))
    return STRATEGIES.build(name, params or {}, runtime=runtime)
