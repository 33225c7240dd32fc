"""FedAU and the baselines it is compared with under unknown, heterogeneous participation.

All of them (and `fedvarp`, `mifa` in strategies/fedvarp_mifa.py) run the same local training
as FedAvg (`local_steps` SGD steps with step `lr` from the server model, payload
Delta_i = y_i - x); they differ only in how the server weights and combines the updates:

  fedau       x += eta * (1/N) sum_{i in S} omega_i Delta_i, omega_i = mean past interval
  fedavg-all  x += eta * (1/N) sum_{i in S} Delta_i
  known-prob  x += eta * (1/N) sum_{i in S} Delta_i / p_i          (oracle p_i)

References:
  Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
  Averaging", ICLR 2024, arXiv:2306.03401; reference code IBM/fedau `main.py` @ 6e9cce9b
  (`-weighting adaptive | average_all | known_prob | fedvarp | mifa`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedsim.constraints import PositiveFloat, PositiveInt
from fedsim.types import RoundCtx, Strategy, StrategyRuntime, Tree, no_clients
from strategies import STRATEGIES
from strategies.local import delta_local

__all__ = ["fedau", "fedavg_all", "known_prob", "LR", "LOCAL_STEPS"]

Weights = Callable[[Tree, RoundCtx], torch.Tensor]
LR, LOCAL_STEPS = 0.1, 5
"""Local lr and steps of the whole FedAU family (fedau, fedavg-all, known-prob, fedvarp, mifa):
the reference code's defaults (IBM/fedau `config.py`: -lr 0.1, -iters-per-round 5; minibatch 16
is the scenario's `strategy.batch_size`). `fedavg` keeps fedsim's common 0.05 / 10, so compare
FedAU with FedAvg at explicit, equal values (as scenarios/paper/fedau does)."""


def over_all(ctx: RoundCtx) -> torch.Tensor:
    """[m] weights 1/N: the sum runs over participants, the mean over all N clients."""
    return torch.full_like(ctx.weight, 1.0 / ctx.num_clients)


def _reweighted(lr: float, local_steps: int, server_lr: float, weights: Weights,
                init_extra: Callable[[torch.Tensor], Tree] | None = None,
                update_extra: Callable[[Tree, RoundCtx], Tree] | None = None) -> Strategy:
    """FedAvg's local training with server step x += server_lr * sum_i w_i Delta_i.

    `weights(server, ctx)` gives w [m]; `init_extra(x0)` adds server state (e.g. counters)
    and `update_extra(server, ctx)` returns its new values, every round (also when nobody
    took part), computed after the weights of the round were read.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone(), **(init_extra(x0) if init_extra else {})}

    local = delta_local(lr, local_steps)

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        out = {**server, **(update_extra(server, ctx) if update_extra else {})}
        if reduced:
            out["x"] = server["x"] + server_lr * reduced["delta"]
        return out

    return Strategy(init_server=init_server, init_clients=no_clients, local=local,
                    server_update=server_update, weights=weights, local_steps=local_steps)


def _num_clients(runtime: StrategyRuntime | None, name: str) -> int:
    if runtime is None:
        raise ValueError(f"{name} needs the runtime (number of clients): build it through the "
                         "registry or pass runtime=StrategyRuntime(...)")
    return int(runtime.num_clients)


@STRATEGIES.register("fedau")
def fedau(*, lr: PositiveFloat = LR, local_steps: PositiveInt = LOCAL_STEPS,
          server_lr: PositiveFloat = 1.0, cutoff: PositiveInt | None = None,
          runtime: StrategyRuntime | None = None) -> Strategy:
    """FedAU (Wang & Ji, ICLR 2024): weight each update by its client's mean participation interval.

    The server keeps, per client, the rounds since its last recorded interval (`cnt`), the sum
    and the number of recorded intervals. At a participation the weight is
    omega_i = sum / count of the intervals recorded BEFORE this round (1 at the first
    participation); then the interval cnt + 1 that ends now is recorded. An absent client
    increments cnt and, once cnt reaches the cutoff K, records K and restarts (so intervals lie
    in [1, K]). The update is x <- x + eta * (1/N) sum_{i in S} omega_i Delta_i: divided by
    all N clients, absent ones counting 0. Under Bernoulli(p) participation omega -> E[min(G, K)]
    = (1 - (1-p)^K) / p (G ~ Geometric(p)), 1/p for K = inf; with full participation every
    interval is 1 and FedAU is exactly `fedavg` with `weighting: uniform` and the same lr,
    local_steps and server_lr (not the default sample weighting, unless all n_i are equal).
    Exactly as IBM/fedau `main.py` (`-weighting adaptive`, `-k-adaptive`); the defaults lr 0.1,
    5 local steps are the reference's (`LR`, `LOCAL_STEPS`).

    Args:
      lr: local step size gamma.
      local_steps: local SGD steps I per round.
      server_lr: global step size eta (1 is the natural scale, since E[omega_i I_i] ~ 1).
      cutoff: interval cutoff K (None: no cutoff, K = inf).
      runtime: supplied by the engine (N, to size the counters).

    Shapes: server {"x": [P], "cnt", "isum", "icount": [N] int64} (O(1) per client, replicated
    on MPI ranks); payload {"delta": [m, P]}; no client state. Counters change only in
    `server_update`, from ctx.participants, after `weights` read them for the round.
    """
    n = _num_clients(runtime, "fedau")

    def init_extra(x0: torch.Tensor) -> Tree:
        z = torch.zeros(n, dtype=torch.int64, device=x0.device)
        return {"cnt": z, "isum": z.clone(), "icount": z.clone()}

    def weights(server: Tree, ctx: RoundCtx) -> torch.Tensor:
        ids = ctx.ids.to(server["icount"].device)
        count, total = server["icount"][ids], server["isum"][ids]
        omega = torch.where(count > 0, total.double() / count.clamp_min(1), 1.0)
        return (omega / ctx.num_clients).to(ctx.weight.dtype).to(ctx.weight.device)

    def update_extra(server: Tree, ctx: RoundCtx) -> Tree:
        part = ctx.participants.to(server["cnt"].device)
        new = server["cnt"] + 1                      # interval length if it ends (or is cut) now
        record = part if cutoff is None else part | (new >= cutoff)
        return {"cnt": torch.where(record, 0, new),
                "isum": server["isum"] + torch.where(record, new, 0),
                "icount": server["icount"] + record.to(torch.int64)}

    return _reweighted(lr, local_steps, server_lr, weights, init_extra, update_extra)


@STRATEGIES.register("fedavg-all")
def fedavg_all(*, lr: PositiveFloat = LR, local_steps: PositiveInt = LOCAL_STEPS,
               server_lr: PositiveFloat = 1.0) -> Strategy:
    """FedAvg divided by all N clients: x <- x + eta * (1/N) sum_{i in S} Delta_i.

    Absent clients count as a zero update (IBM/fedau `-weighting average_all`; its README
    pairs it with eta = 10 when the mean participation is about 0.1). Biased towards
    frequently participating clients, like FedAvg, and with a smaller step.

    Args:
      lr: local step size. local_steps: local SGD steps per round. server_lr: eta.

    Shapes: server {"x": [P]}; payload {"delta": [m, P]}; no client state.
    """
    return _reweighted(lr, local_steps, server_lr, lambda server, ctx: over_all(ctx))


def _oracle_probabilities(runtime: StrategyRuntime | None) -> np.ndarray:
    p = None if runtime is None else getattr(runtime, "p_nominal", None)
    if p is None and runtime is not None:
        p = runtime.probabilities
    if p is None or runtime is None:
        raise ValueError("known-prob needs participation probabilities, and this participation "
                         "pattern defines none (participation.kind: bernoulli, markov, cyclic, "
                         "uniform or full)")
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (runtime.num_clients,) or not np.all(p > 0):
        raise ValueError("known-prob needs a participation probability > 0 for every client "
                         f"(smallest: {float(p.min()) if p.size else None})")
    return p


@STRATEGIES.register("known-prob")
def known_prob(*, lr: PositiveFloat = LR, local_steps: PositiveInt = LOCAL_STEPS,
               server_lr: PositiveFloat = 1.0, runtime: StrategyRuntime | None = None) -> Strategy:
    """Oracle baseline: x <- x + eta * (1/N) sum_{i in S} Delta_i / p_i with the true p_i.

    Unbiased for (1/N) sum_i Delta_i when P(i in S) = p_i (IBM/fedau `-weighting known_prob`).
    Uses the pattern's configured p_n (`p_nominal`) when the runtime carries it, as the
    reference code does, else its long-run rate (`runtime.probabilities`; the two differ only
    for cyclic participation, by the rounding of L * p_n). The only strategy that may see
    them: building it fails with a clear message when the pattern defines none.

    Args:
      lr: local step size. local_steps: local SGD steps per round. server_lr: eta.
      runtime: supplied by the engine (participation probabilities).

    Shapes: server {"x": [P]}; payload {"delta": [m, P]}; no client state.
    """
    p = _oracle_probabilities(runtime)

    def weights(server: Tree, ctx: RoundCtx) -> torch.Tensor:
        pi = torch.as_tensor(p, dtype=ctx.weight.dtype, device=ctx.weight.device)
        return 1.0 / (ctx.num_clients * pi[ctx.ids.to(pi.device)])

    return _reweighted(lr, local_steps, server_lr, weights)

