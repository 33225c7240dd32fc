"""Distributed gradient descent and its compressed forms: EF21 (-SGD, -PP, -W), EControl, naive.

`gd` is the server math the whole family shares: every participant sends its gradient at x,
the server forms g = sum_i pi_i grad_i with fixed weights over ALL N clients (pi_i = n_i / n,
or 1/N) and steps x <- x - gamma g. The compressed forms are `gd` with its uplink through a
compressor wrapper (`strategies.feedback`):

  ef21           = gd + ef21(C):      c_i = C(grad_i - g_i), g_i += c_i, g += sum pi_i c_i
  econtrol       = gd + econtrol(C):  EF21 with a fed-back error (Gao et al. 2024)
  compressed-gd  = x <- x - sum_S p_i C(gamma grad_i), optionally with EF14 (the baseline)
  ef21-w         = EF21 with weights w_i proportional to L_i (strategies/ef21_w.py)

With full participation round 0 of EF21 (init "dense") is the paper's g_i^0 = grad_i(x^0) and
round t >= 1 its iteration t. Non-participants keep their g_i, which stays in g (EF21-PP,
Fatkhullin et al. 2021, arXiv:2110.03294, the paper's rule).

References:
  Richtárik, Sokolov, Fatkhullin, NeurIPS 2021, arXiv:2106.05203 (EF21, Theorem 1's step).
  Richtárik, Gasanov, Burlachenko, "Error Feedback Reloaded", ICLR 2024, arXiv:2402.10774 (EF21-W).
  Beznosikov, Horváth, Richtárik, Safaryan, arXiv:2002.12410 (biased compression can stall GD).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from fedsim.constraints import NonNegativeFloat, PositiveFloat
from fedsim.types import Compressor, Oracle, RoundCtx, Strategy, Tree, model_rows, no_clients
from strategies import STRATEGIES
from strategies.compress import require_stateless, top_k
from strategies.feedback import Init, ef14
from strategies.feedback import econtrol as econtrol_wrapper
from strategies.feedback import ef21 as ef21_wrapper
from strategies.local import broadcast_rows
from strategies.uplink import compress_uplink

Weighting = Literal["samples", "uniform"]


def theory_constants(alpha: float) -> tuple[float, float, float]:
    """(theta, beta, sqrt(beta/theta)) of EF21's Theorem 1: theta = 1 - sqrt(1 - alpha),
    beta = (1 - alpha) / (1 - sqrt(1 - alpha))."""
    theta = 1 - math.sqrt(1 - alpha)
    beta = (1 - alpha) / theta
    return theta, beta, math.sqrt(beta / theta)


def theory_lr(L: float, L_tilde: float, alpha: float, factor: float = 1.0) -> float:
    """EF21 step size factor / (L + L_tilde sqrt(beta/theta)) (arXiv:2106.05203, Thm 1).

    L: smoothness of f; L_tilde: quadratic mean sqrt(mean L_i^2) (EF21), or the arithmetic mean
    mean L_i (EF21-W, arXiv:2402.10774); alpha: contraction of the compressor (`alpha(d)`).
    """
    return factor / (L + L_tilde * theory_constants(alpha)[2])


def gradients(oracle: Oracle, x: torch.Tensor, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return oracle(x, 0) if stochastic else oracle.full(x)


def fixed_weights(weighting: str, ctx: RoundCtx) -> torch.Tensor:
    """[m] pi_i over ALL N clients: n_i / n ("samples") or 1/N ("uniform")."""
    if weighting == "uniform":
        return torch.full_like(ctx.weight, 1.0 / ctx.num_clients)
    return ctx.num_samples.to(ctx.weight.dtype) / ctx.total_samples.sum().to(ctx.weight.dtype)


@STRATEGIES.register("gd")
def gd(*, lr: PositiveFloat = 0.2, stochastic: bool = False, weighting: Weighting = "samples") -> Strategy:
    """Distributed gradient descent: x <- x - lr * sum_{i in S} pi_i grad_i(x), pi_i fixed over all N.

    Args:
      lr: step size gamma. stochastic: minibatch gradients (oracle step 0) instead of full ones.
      weighting: pi_i = n_i / n ("samples") or 1/N ("uniform"); with full participation g is
        the gradient of f = sum_i pi_i f_i. A round nobody took part in leaves x unchanged.

    Shapes: server {"x": [P]}; payload {"grad": [m, P]}; no client state.
    """
    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        loss, grad = gradients(oracle, broadcast_rows(server["x"], ctx.m), stochastic)
        return {"grad": grad}, clients, {"loss": loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        return {**server, "x": server["x"] - lr * reduced["grad"]} if reduced else server

    return Strategy(init_server=lambda x0: {"x": x0.clone()}, init_clients=no_clients,
                    local=local, server_update=server_update,
                    weights=lambda server, ctx: fixed_weights(weighting, ctx),
                    payload=model_rows("grad"), trains_locally=False)


TOP_K = top_k(ratio=0.1)


@STRATEGIES.register("ef21")
def ef21(*, lr: PositiveFloat = 0.2, compressor: Compressor = TOP_K, stochastic: bool = False,
         init: Init = "dense", weighting: Weighting = "samples") -> Strategy:
    """EF21 (arXiv:2106.05203) and EF21-SGD / EF21-PP (arXiv:2110.03294): `gd` + ef21(compressor).

    Args:
      lr: server step gamma (see `theory_lr`; the papers use multiples of it).
      compressor: the inner compressor, used in contractive form (default top_k, ratio 0.1).
      stochastic: EF21-SGD. init: "dense" (first message uncompressed) or "compressed".
      weighting: as for `gd`.

    With the identity compressor the iterates are those of `gd`.
    """
    require_stateless(compressor, "compressor", "EF21 is error feedback itself")
    return compress_uplink(gd(lr=lr, stochastic=stochastic, weighting=weighting),
                           ef21_wrapper(inner=compressor, init=init))


@STRATEGIES.register("econtrol")
def econtrol(*, lr: PositiveFloat = 0.2, compressor: Compressor = TOP_K, eta: NonNegativeFloat = 0.1,
             stochastic: bool = False, init: Init = "dense", weighting: Weighting = "samples") -> Strategy:
    """EControl (Gao, Islamov, Stich, ICLR 2024, arXiv:2311.05645): `gd` + econtrol(compressor, eta).

    The server adds sum pi_i Delta_i to h and steps x <- x - gamma h with the updated h (the
    order of the third-party code). eta = 0 with init "compressed" is EF21.
    """
    require_stateless(compressor, "compressor", "EControl is error feedback itself")
    return compress_uplink(gd(lr=lr, stochastic=stochastic, weighting=weighting),
                           econtrol_wrapper(inner=compressor, eta=eta, init=init))


@STRATEGIES.register("compressed-gd")
def compressed_gd(*, lr: PositiveFloat = 0.5, compressor: Compressor = TOP_K,
                  error_feedback: bool = False, stochastic: bool = False) -> Strategy:
    """Naive compressed GD: x <- x - sum_{i in S} p_i C(gamma grad_i(x)) (the no-feedback baseline).

    With a biased compressor such as top_k this stalls or drifts on heterogeneous clients
    (Beznosikov et al. 2020); `error_feedback: true` is EF14 (send C(e_i + gamma grad_i), keep the
    rest in e_i). p_i = n_i / sum_{j in S} n_j.
    """
    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        loss, grad = gradients(oracle, broadcast_rows(server["x"], ctx.m), stochastic)
        return {"step": lr * grad}, clients, {"loss": loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        return {**server, "x": server["x"] - reduced["step"]} if reduced else server

    require_stateless(compressor, "compressor", "use error_feedback: true for EF14")
    step = Strategy(init_server=lambda x0: {"x": x0.clone()}, init_clients=no_clients,
                    local=local, server_update=server_update, payload=model_rows("step"),
                    trains_locally=False)
    return compress_uplink(step, ef14(inner=compressor) if error_feedback else compressor)
