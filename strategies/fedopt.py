"""FedOpt: FedAvg's clients with an adaptive optimizer on the server (FedAdam, FedYogi, FedAdagrad).

References:
  Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
  Optimization", ICLR 2021, arXiv:2003.00295 (Algorithm 2). Flower ships the same three as
  `flwr.serverapp.strategy.FedAdam` / `FedYogi` / `FedAdagrad` (FedAdam there adds Adam's bias
  correction; fedsim follows the paper, which has none).

Algorithm 2, with Delta_t = sum_S p_i Delta_i the averaged client update (a descent
direction: Delta_i = y_i - x), m_{-1} = 0 and v_{-1} = tau^2:

    m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                    FedAdagrad
    v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)   FedYogi
    v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2                  FedAdam
    x_{t+1} = x_t + server_lr m_t / (sqrt(v_t) + tau)

(element-wise). A round nobody took part in changes nothing (the moments are not decayed).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedsim.constraints import Momentum, PositiveFloat, PositiveInt
from fedsim.types import RoundCtx, Strategy, Tree, no_clients
from strategies import STRATEGIES
from strategies.fedavg import participant_weights
from strategies.local import delta_local

Rule = Literal["adagrad", "yogi", "adam"]
Weighting = Literal["samples", "uniform"]


def second_moment(rule: Rule, v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    """v_t from v_{t-1} and Delta_t^2 (Reddi et al., Algorithm 2)."""
    if rule == "adagrad":
        return v + d2
    if rule == "yogi":
        return v - (1 - beta2) * d2 * torch.sign(v - d2)
    return beta2 * v + (1 - beta2) * d2


def fedopt(rule: Rule, *, lr: float, local_steps: int, server_lr: float, beta1: float, beta2: float,
           tau: float, weighting: str) -> Strategy:
    """The FedOpt strategy with server rule `rule` (see the module docstring).

    Shapes: server {"x": [P], "m": [P], "v": [P]}; payload {"delta": [m, P]}; no client state.
    """
    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone(), "m": torch.zeros_like(x0), "v": torch.full_like(x0, tau * tau)}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        if not reduced:
            return server
        d = reduced["delta"]
        m = beta1 * server["m"] + (1 - beta1) * d
        v = second_moment(rule, server["v"], d * d, beta2)
        return {**server, "x": server["x"] + server_lr * m / (v.sqrt() + tau), "m": m, "v": v}

    return Strategy(init_server=init_server, init_clients=no_clients,
                    local=delta_local(lr, local_steps), server_update=server_update,
                    weights=lambda server, ctx: participant_weights(weighting, ctx), local_steps=local_steps)


@STRATEGIES.register("fedadam")
def fedadam(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 0.01,
            beta1: Momentum = 0.9, beta2: Momentum = 0.99, tau: PositiveFloat = 1e-3,
            weighting: Weighting = "samples") -> Strategy:
    """FedAdam (Reddi et al., ICLR 2021): Adam without bias correction on the averaged update.

    v_t = beta2 v + (1 - beta2) Delta_t^2, x <- x + server_lr m_t / (sqrt(v_t) + tau).

    Args:
      lr: local step size eta_l. local_steps: local SGD steps K.
      server_lr: server step eta (the paper's grid: 10^-2.5 .. 1).
      beta1, beta2: moment decays (paper: 0.9, 0.99). tau: adaptivity (paper: 1e-3).
      weighting: p_i = n_i / sum_S n_j ("samples", Flower's) or 1/|S| ("uniform", Algorithm 2).

    Shapes: server {"x", "m", "v": [P]}; payload {"delta": [m, P]}; no client state.
    """
    return fedopt("adam", lr=lr, local_steps=local_steps, server_lr=server_lr, beta1=beta1,
                  beta2=beta2, tau=tau, weighting=weighting)


@STRATEGIES.register("fedyogi")
def fedyogi(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 0.01,
            beta1: Momentum = 0.9, beta2: Momentum = 0.99, tau: PositiveFloat = 1e-3,
            weighting: Weighting = "samples") -> Strategy:
    """FedYogi (Reddi et al., ICLR 2021): Yogi's additive second moment on the averaged update.

    v_t = v - (1 - beta2) Delta_t^2 sign(v - Delta_t^2), x <- x + server_lr m_t / (sqrt(v_t) + tau).

    Args: as `fedadam`.

    Shapes: server {"x", "m", "v": [P]}; payload {"delta": [m, P]}; no client state.
    """
    return fedopt("yogi", lr=lr, local_steps=local_steps, server_lr=server_lr, beta1=beta1,
                  beta2=beta2, tau=tau, weighting=weighting)


@STRATEGIES.register("fedadagrad")
def fedadagrad(*, lr: PositiveFloat = 0.05, local_steps: PositiveInt = 10, server_lr: PositiveFloat = 0.1,
               beta1: Momentum = 0.0, tau: PositiveFloat = 1e-3,
               weighting: Weighting = "samples") -> Strategy:
    """FedAdagrad (Reddi et al., ICLR 2021): Adagrad's accumulated second moment on the server.

    v_t = v + Delta_t^2, x <- x + server_lr m_t / (sqrt(v_t) + tau); beta1 = 0 (default, as
    Flower's FedAdagrad) makes m_t = Delta_t.

    Args: as `fedadam`, without beta2.

    Shapes: server {"x", "m", "v": [P]}; payload {"delta": [m, P]}; no client state.
    """
    return fedopt("adagrad", lr=lr, local_steps=local_steps, server_lr=server_lr, beta1=beta1,
                  beta2=0.0, tau=tau, weighting=weighting)
