"""Client participation patterns: which clients take part in round t (a bool mask [N]).

Patterns follow the FedAU reference generators (Wang & Ji, ICLR 2024, arXiv 2306.03401;
``IBM/fedau util/util.py: WorkerSampler``; docs/algorithms.md#participation-patterns). Every draw is keyed:
per-round draws by (seed, ``rng.PARTICIPATION``, client, round), per-client constants (drawn
p_n, chain initial state, cyclic phase) by (seed, PARTICIPATION, client, tag) with a negative
tag, so a mask never depends on query order, process count or which clients are simulated.
A round where nobody participates is legal (the engine then skips aggregation).

The p-spec shared by ``bernoulli``, ``markov`` and ``cyclic`` is exactly one of
``p`` (one float, or a list of N floats), ``p_range: [lo, hi]`` (p_n ~ U[lo, hi] per client),
or ``p_from_labels: true`` (with ``p_mean``, ``p_min``, ``dirichlet_alpha``; see `resolve_p`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Protocol

import numpy as np
from annotated_types import Ge

from fedsim import rng
from fedsim.constraints import Fraction, PositiveInt
from fedsim.errors import ConfigError
from fedsim.registry import Registry

PARTICIPATION = Registry("participation", builtins=("fedsim.participation", "fedsim.participation_trace"),
                         reserved=("num_clients", "seed", "label_dist"))

_TAG_P, _TAG_INIT, _TAG_MULT = -1, -2, -3   # per-client streams; rounds are >= 0


class Participation(Protocol):
    num_clients: int
    probabilities: np.ndarray | None  # long-run participation rate p_n [N] (oracle use only)
    # built-ins also have `p_nominal` [N]: the configured p_n (differs from the rate for cyclic)

    def mask(self, round: int) -> np.ndarray: ...


def build_participation(kind: str, params: dict, *, num_clients: int, seed: int,
                        label_dist: np.ndarray | None) -> Participation:
    """Build participation pattern `kind` from scenario `params` (validated by the registry)."""
    return PARTICIPATION.build(kind, params, num_clients=num_clients, seed=seed,
                               label_dist=label_dist)


class _Memoryless:
    """A pattern whose mask of round t is a pure function of t."""

    def __init__(self, num_clients: int, probabilities: np.ndarray | None,
                 fn: Callable[[int], np.ndarray], p_nominal: np.ndarray | None = None) -> None:
        self.num_clients, self.probabilities, self._fn = num_clients, probabilities, fn
        self.p_nominal = probabilities if p_nominal is None else p_nominal

    def mask(self, round: int) -> np.ndarray:
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        return self._fn(int(round))


def _u(seed: int, ids: np.ndarray, tag: int) -> np.ndarray:
    return rng.uniform_np(seed, rng.PARTICIPATION, ids, tag)


# ---- the p-spec ------------------------------------------------------------------------------

def resolve_p(*, p: float | list[float] | None, p_range: list[float] | None,
              p_from_labels: bool, p_mean: float | None, p_min: float | None,
              dirichlet_alpha: float | None, num_clients: int, seed: int,
              label_dist: np.ndarray | None) -> np.ndarray:
    """Per-client participation probabilities p_n, float64 [N], from exactly one p-spec.

    `p_from_labels` couples participation to the data (FedAU, docs/algorithms.md#label-coupled-probabilities):
    mult ~ Dirichlet(dirichlet_alpha 1_C) (stream (seed, PARTICIPATION, tag)), and
    p_n = max(p_min, p_mean * C * sum_l q_{n,l} mult_l) with q the clients' label proportions;
    defaults p_mean = 0.1, p_min = 0.02, dirichlet_alpha = 0.1. Values above 1 (possible when
    p_mean * C > 1) are clipped to 1.
    """
    given = [k for k, v in (("p", p), ("p_range", p_range),
                            ("p_from_labels", p_from_labels or None)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of p, p_range, p_from_labels", value=given or None)
    extra = [k for k, v in (("p_mean", p_mean), ("p_min", p_min),
                            ("dirichlet_alpha", dirichlet_alpha)) if v is not None]
    if extra and not p_from_labels:
        raise ConfigError("only used with p_from_labels: true", key=extra[0])
    ids = np.arange(num_clients)
    if p_from_labels:
        return _p_from_labels(label_dist, num_clients, seed, 0.1 if p_mean is None else p_mean,
                              0.02 if p_min is None else p_min,
                              0.1 if dirichlet_alpha is None else dirichlet_alpha)
    if p_range is not None:
        if len(p_range) != 2 or not 0 < p_range[0] <= p_range[1] <= 1:
            raise ConfigError("need [lo, hi] with 0 < lo <= hi <= 1", key="p_range", value=p_range)
        lo, hi = float(p_range[0]), float(p_range[1])
        return lo + (hi - lo) * _u(seed, ids, _TAG_P)
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim == 1 and len(arr) != num_clients:
        raise ConfigError("one probability per client", key="p", value=f"{len(arr)} values",
                          allowed=f"a float or a list of {num_clients} floats")
    if not np.all((arr > 0) & (arr <= 1)):
        raise ConfigError("participation probability outside (0, 1]", key="p",
                          value=p if arr.ndim == 0 else float(arr[(arr <= 0) | (arr > 1)][0]))
    return np.broadcast_to(arr, (num_clients,)).copy()


def _p_from_labels(label_dist: np.ndarray | None, num_clients: int, seed: int, p_mean: float,
                   p_min: float, alpha: float) -> np.ndarray:
    if label_dist is None:
        raise ConfigError("p_from_labels needs the clients' label distribution",
                          key="p_from_labels", allowed="p or p_range")
    q = np.asarray(label_dist, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] != num_clients:
        raise ConfigError("label distribution must be [num_clients, classes]",
                          key="p_from_labels", value=q.shape)
    for name, v in (("p_mean", p_mean), ("p_min", p_min)):
        if not 0 < v <= 1:
            raise ConfigError("probability outside (0, 1]", key=name, value=v)
    if alpha <= 0:
        raise ConfigError("must be > 0", key="dirichlet_alpha", value=alpha)
    classes = q.shape[1]
    mult = rng.np_rng(seed, rng.PARTICIPATION, _TAG_MULT).dirichlet(np.full(classes, alpha))
    return np.clip(np.maximum(p_min, p_mean * classes * (q @ np.nan_to_num(mult))), 0.0, 1.0)


# ---- patterns --------------------------------------------------------------------------------

@PARTICIPATION.register("full")
def full(*, num_clients: int, seed: int, label_dist: np.ndarray | None = None) -> Participation:
    """Every client in every round."""
    ones = np.ones(num_clients, dtype=bool)
    return _Memoryless(num_clients, np.ones(num_clients), lambda t: ones.copy())


@PARTICIPATION.register("uniform")
def uniform(*, clients_per_round: PositiveInt | None = None,
            fraction: Fraction | None = None, num_clients: int, seed: int,
            label_dist: np.ndarray | None = None) -> Participation:
    """Exactly k distinct clients per round, uniformly without replacement (McMahan et al. 2017).

    k = `clients_per_round`, or max(1, round(fraction * N)). Round t takes the k clients with the
    smallest keyed uniforms u(seed, PARTICIPATION, n, t): the same set on every process.
    """
    if (clients_per_round is None) == (fraction is None):
        raise ConfigError("give exactly one of clients_per_round, fraction",
                          key="clients_per_round")
    k = max(1, int(round(fraction * num_clients))) if fraction is not None else int(clients_per_round or 0)
    if k > num_clients:
        raise ConfigError("more clients per round than clients", key="clients_per_round",
                          value=k, allowed=f"at most {num_clients}")
    ids = np.arange(num_clients)

    def fn(t: int) -> np.ndarray:
        out = np.zeros(num_clients, dtype=bool)
        out[np.argpartition(rng.uniform_np(seed, rng.PARTICIPATION, ids, t), k - 1)[:k]] = True
        return out
    return _Memoryless(num_clients, np.full(num_clients, k / num_clients), fn)


@PARTICIPATION.register("bernoulli")
def bernoulli(*, p: float | list[float] | None = None, p_range: list[float] | None = None,
              p_from_labels: bool = False, p_mean: float | None = None, p_min: float | None = None,
              dirichlet_alpha: float | None = None, num_clients: int, seed: int,
              label_dist: np.ndarray | None = None) -> Participation:
    """Independent Bernoulli(p_n) each round: I_n^t = [u(seed, PARTICIPATION, n, t) < p_n]."""
    pn = resolve_p(p=p, p_range=p_range, p_from_labels=p_from_labels, p_mean=p_mean, p_min=p_min,
                   dirichlet_alpha=dirichlet_alpha, num_clients=num_clients, seed=seed,
                   label_dist=label_dist)
    ids = np.arange(num_clients)
    return _Memoryless(num_clients, pn,
                       lambda t: rng.uniform_np(seed, rng.PARTICIPATION, ids, t) < pn)


@PARTICIPATION.register("cyclic")
def cyclic(*, period: Annotated[int, Ge(2)] = 100, p: float | list[float] | None = None,
           p_range: list[float] | None = None, p_from_labels: bool = False,
           p_mean: float | None = None, p_min: float | None = None,
           dirichlet_alpha: float | None = None, num_clients: int, seed: int,
           label_dist: np.ndarray | None = None) -> Participation:
    """Cyclic: a = max(1, round(L p_n)) rounds active, max(1, L - a) inactive (FedAU `cyclic-L`).

    As the reference: start inactive with counter c_n ~ UniformInt[0, inactive - 1] (keyed per
    client); each round, if the counter is 0 toggle and reset it to the new phase's length,
    then decrement. Closed form used here: active at t iff t >= c_n and
    (t - c_n) mod (a + inactive) < a. `probabilities` is the exact long-run rate a / (a + inactive);
    the nominal p_n is kept as `p_nominal`.
    """
    pn = resolve_p(p=p, p_range=p_range, p_from_labels=p_from_labels, p_mean=p_mean, p_min=p_min,
                   dirichlet_alpha=dirichlet_alpha, num_clients=num_clients, seed=seed,
                   label_dist=label_dist)
    act = np.maximum(1, np.round(period * pn)).astype(np.int64)  # half-to-even, as np.round
    ina = np.maximum(1, period - act)
    start = np.floor(_u(seed, np.arange(num_clients), _TAG_INIT) * ina).astype(np.int64)

    def fn(t: int) -> np.ndarray:
        return (t >= start) & ((t - start) % (act + ina) < act)
    return _Memoryless(num_clients, act / (act + ina), fn, p_nominal=pn)


class _Markov:
    """Two-state chain per client, random access by round with cached checkpoints."""

    _EVERY = 256  # checkpoint stride (rounds)

    def __init__(self, pn: np.ndarray, q: float, seed: int) -> None:
        self.num_clients, self._seed = len(pn), seed
        self.probabilities: np.ndarray | None = pn
        self.p_nominal: np.ndarray | None = pn
        off = q * (1.0 / pn - 1.0)
        over = off > 1
        self.q_on = np.where(over, q / np.where(over, off, 1.0), q)  # docs/algorithms.md#markov
        self.q_off = np.minimum(off, 1.0)
        self._ids = np.arange(len(pn))
        init = _u(seed, self._ids, _TAG_INIT) < pn       # state "before round 0"
        self._ckpt: dict[int, np.ndarray] = {-1: init}
        self._t, self._state = -1, init

    def _step(self, state: np.ndarray, t: int) -> np.ndarray:
        u = rng.uniform_np(self._seed, rng.PARTICIPATION, self._ids, t)
        return np.where(state, u >= self.q_off, u < self.q_on)

    def mask(self, round: int) -> np.ndarray:
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        if round < self._t:
            self._t = max(c for c in self._ckpt if c <= round)
            self._state = self._ckpt[self._t]
        while self._t < round:
            self._t += 1
            self._state = self._step(self._state, self._t)
            if self._t % self._EVERY == 0:
                self._ckpt[self._t] = self._state
        return self._state.copy()


@PARTICIPATION.register("markov")
def markov(*, q: Fraction = 0.05, p: float | list[float] | None = None,
           p_range: list[float] | None = None, p_from_labels: bool = False,
           p_mean: float | None = None, p_min: float | None = None,
           dirichlet_alpha: float | None = None, num_clients: int, seed: int,
           label_dist: np.ndarray | None = None) -> Participation:
    """Two-state Markov chain, stationary p_n: P(off->on) = q, P(on->off) = q (1/p_n - 1).

    As the FedAU reference `markov-q` (docs/algorithms.md#markov): if q (1/p_n - 1) > 1 it is set
    to 1 and P(off->on) to q / (q (1/p_n - 1)) = p_n / (1 - p_n), keeping p_n stationary.
    Initial state ~ Bernoulli(p_n) (keyed per client); the state is updated with the draw
    u(seed, PARTICIPATION, n, t) before it is read in round t.
    """
    pn = resolve_p(p=p, p_range=p_range, p_from_labels=p_from_labels, p_mean=p_mean, p_min=p_min,
                   dirichlet_alpha=dirichlet_alpha, num_clients=num_clients, seed=seed,
                   label_dist=label_dist)
    return _Markov(pn, q, seed)
