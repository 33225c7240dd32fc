"""EF21 error feedback (with -SGD, -PP, -W variants), EControl, and naive compressed GD.

EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021, arXiv:2106.05203): client i keeps g_i, the
server keeps x and g = sum_i pi_i g_i over ALL N clients (pi_i = n_i / n, or 1/N). Round t:
every participant computes grad_i(x^t), sends c_i = C(grad_i(x^t) - g_i) and sets
g_i <- g_i + c_i; the server sets g <- g + sum_{i in S} pi_i c_i, then x^{t+1} = x^t - gamma g.
Non-participants keep their g_i, which stays in g (EF21-PP, Fatkhullin et al. 2021,
arXiv:2110.03294, the paper's rule; FL_PyTorch's EF21PP averages responders only).

Lazy initialisation (client state exists only after a first participation): with
init="dense" (default) a client's first message is its uncompressed gradient (counted as
32 bits per value), so g_i^0 = grad_i(x) exactly as in the reference code; with full
participation round 0 is the paper's g_i^0 = grad_i(x^0) and round t >= 1 its iteration t.
init="compressed" sends C(grad_i) first (g_i^0 = C(grad_i(x^0)), also allowed by the paper).
Unbiased compressors (rand_k, qsgd, natural) are used as C / (1 + omega) (contractive form).

Nonconvex regulariser of the EF21 experiments (the model has no such option): `reg` = lambda
adds lambda sum_j x_j^2 / (1 + x_j^2) to every client's loss (gradient 2 lambda x / (1 + x^2)^2),
also in the reported train loss.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from fedsim import rng
from fedsim.errors import ConfigError
from fedsim.types import Oracle, RoundCtx, Strategy, StrategyRuntime, Tree, no_clients
from strategies import STRATEGIES
from strategies._local import broadcast_rows
from strategies.compress import FLOAT_BITS, CompressorCfg, build_compressor, compress_uplink

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
TOP_K = {"name": "top_k", "ratio": 0.1}


def theory_constants(alpha: float) -> tuple[float, float, float]:
    """(theta, beta, sqrt(beta/theta)) of EF21's Theorem 1: theta = 1 - sqrt(1 - alpha),
    beta = (1 - alpha)/(1 - sqrt(1 - alpha))."""
    theta = 1 - math.sqrt(1 - alpha)
    beta = (1 - alpha) / theta
    return theta, beta, math.sqrt(beta / theta)


def theory_lr(L: float, L_tilde: float, alpha: float, factor: float = 1.0) -> float:
    """EF21 step size factor / (L + L_tilde sqrt(beta/theta)) (arXiv:2106.05203, Thm 1).

    L: smoothness of f; L_tilde: quadratic mean sqrt(mean L_i^2) (EF21), or the arithmetic mean
    mean L_i (EF21-W, Richtárik, Gasanov, Burlachenko, ICLR 2024, arXiv:2402.10774);
    alpha: contraction parameter of the compressor (`Compressor.alpha(d)`).
    """
    return factor / (L + L_tilde * theory_constants(alpha)[2])


def nonconvex_reg(x: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda sum_j x_j^2/(1 + x_j^2) per row [m] and its gradient 2 lambda x/(1 + x^2)^2 [m, P]."""
    q = 1 + x * x
    return lam * (x * x / q).sum(1), 2 * lam * x / (q * q)


def _gradients(oracle: Oracle, x: torch.Tensor, stochastic: bool, reg: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = oracle(x, 0) if stochastic else oracle.full(x)
    if reg:
        r, rg = nonconvex_reg(x, reg)
        loss, grad = loss + r.to(loss.dtype), grad + rg
    return loss, grad


def estimate_smoothness(oracle: Oracle, x: torch.Tensor, ids: torch.Tensor, *, iters: int = 20,
                        eps: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """[m] largest Hessian eigenvalue of each client's full loss at x [m, P] (power iteration).

    Hessian-vector products by finite differences of `oracle.full` (`iters` + 1 gradient calls),
    start vector keyed by (seed, STRATEGY, client id). A local estimate of L_i at x: a lower bound
    of the global constant for logistic-type losses, exact for quadratics.
    """
    p = torch.arange(x.shape[1], device=x.device)
    v = rng.uniform_torch(seed, rng.STRATEGY, -1, ids[:, None], p[None, :], device=x.device) - 0.5
    v = v.to(x.dtype)
    _, g0 = oracle.full(x)
    lam = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-300)
        hv = (oracle.full(x + eps * v)[1] - g0) / eps
        lam, v = (hv * v).sum(1), hv
    return lam.abs().clamp_min(1e-12)


def _family(*, lr: float, compressor: dict[str, Any], stochastic: bool, init: str, reg: float,
            weighting: str, eta: float | None = None, smoothness: torch.Tensor | None = None,
            estimate: bool = False) -> Strategy:
    """EF21 / EF21-W / EControl on one code path (see the factories for the math).

    EF21-W is run in unnormalised form: client i tracks g_i ~ grad_i / L_i and the server adds
    pi_i L_i c_i, which equals w_i = pi_i L_i / sum_j pi_j L_j weights up to one global scale of
    the tracked vectors (identical iterates for positively homogeneous C such as top_k).
    """
    if "error_feedback" in compressor:
        raise ConfigError("EF21-type strategies are error feedback themselves",
                          key="compressor.error_feedback", value=compressor["error_feedback"])
    comp = build_compressor(compressor, contractive=True)
    weighted = smoothness is not None or estimate

    def init_server(x0: torch.Tensor) -> Tree:
        return {"x": x0.clone(), "g": torch.zeros_like(x0)}

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        rows = torch.zeros((ids.shape[0], x0.shape[-1]), dtype=x0.dtype, device=x0.device)
        out = {"g": rows, "seen": rows[:, 0].clone()}
        if eta is not None:
            out["e"] = rows.clone()
        if estimate:
            out["L"] = rows[:, 0].clone()
        return out

    def smooth(clients: Tree, oracle: Oracle, x: torch.Tensor, ctx: RoundCtx, fresh: torch.Tensor):
        if smoothness is not None:
            return smoothness.to(x)[ctx.ids]
        if not bool(fresh.any()):
            return clients["L"]
        return torch.where(fresh, estimate_smoothness(oracle, x, ctx.ids, seed=ctx.seed), clients["L"])

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        loss, grad = _gradients(oracle, x, stochastic, reg)
        g, fresh = clients["g"], clients["seen"] == 0
        L = smooth(clients, oracle, x, ctx, fresh) if weighted else None
        target = grad if L is None else grad / L[:, None]
        v = target - g if eta is None else eta * clients["e"] + target - g
        c, bits = comp.compress(v, ctx)
        if init == "dense":
            c = torch.where(fresh[:, None], target - g, c)
            bits = torch.where(fresh, float(FLOAT_BITS * x.shape[1]), bits)
        new = {"g": g + c, "seen": torch.ones_like(clients["seen"])}
        if eta is not None:
            new["e"] = clients["e"] + target - g - c
        if estimate:
            new["L"] = L
            bits = bits + FLOAT_BITS * fresh.to(bits.dtype)  # L_i goes up once
        return {"c": c if L is None else c * L[:, None]}, new, {"loss": loss, "up_bits": bits}

    def weights(server: Tree, ctx: RoundCtx) -> torch.Tensor:
        if weighting == "uniform":
            return torch.full_like(ctx.weight, 1.0 / ctx.num_clients)
        return ctx.num_samples.to(ctx.weight.dtype) / ctx.total_samples.sum().to(ctx.weight.dtype)

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        g = server["g"] + reduced["c"] if reduced else server["g"]
        return {**server, "g": g, "x": server["x"] - lr * g}

    return Strategy(init_server=init_server, init_clients=init_clients, local=local,
                    server_update=server_update, weights=weights)


Init = Literal["dense", "compressed"]
Weighting = Literal["samples", "uniform"]


@STRATEGIES.register("ef21")
def ef21(*, lr: PositiveFloat = 0.2, compressor: CompressorCfg = TOP_K, stochastic: bool = False,
         init: Init = "dense", weighting: Weighting = "samples", reg: NonNegFloat = 0.0) -> Strategy:
    """EF21 (arXiv:2106.05203) and EF21-SGD / EF21-PP (arXiv:2110.03294): clients send C(grad - g_i).

    Args:
      lr: server step gamma (see `theory_lr`; the papers use multiples of it).
      compressor: contractive compressor config (default top_k with ratio 0.1).
      stochastic: EF21-SGD: minibatch gradient oracle(x, 0) instead of the full local gradient.
      init: "dense" (first message uncompressed) or "compressed" (first message C(grad)).
      weighting: pi_i = n_i / n over all clients ("samples") or 1/N ("uniform").
      reg: lambda of the nonconvex regulariser (module docstring).

    Shapes: server {"x", "g": [P]}; clients {"g": [m, P], "seen": [m]}; payload {"c": [m, P]}.
    With the identity compressor the iterates are those of distributed gradient descent.
    """
    return _family(lr=lr, compressor=compressor, stochastic=stochastic, init=init, reg=reg,
                   weighting=weighting)


@STRATEGIES.register("ef21-w")
def ef21_w(*, lr: PositiveFloat = 0.2, compressor: CompressorCfg = TOP_K,
           smoothness: list[PositiveFloat] | None = None, stochastic: bool = False,
           init: Init = "dense", weighting: Weighting = "samples", reg: NonNegFloat = 0.0,
           runtime: StrategyRuntime | None = None) -> Strategy:
    """EF21-W (Richtárik, Gasanov, Burlachenko, ICLR 2024, arXiv:2402.10774): weights w_i ∝ L_i.

    c_i = C(grad_i / (n w_i) - g_i), g_i += c_i, g += sum_i w_i c_i with w_i = pi_i L_i /
    sum_j pi_j L_j; step size 1/(L + L_AM sqrt(beta/theta)) (`theory_lr` with the mean L_i).

    Args:
      smoothness: L_i of every client (length N). None: each client estimates its L_i once, at its
        first participation, by power iteration on finite-difference Hessian-vector products of
        its full loss at the current model (`estimate_smoothness`: 21 extra full-gradient calls
        of the block in rounds where a participant is new), and sends it up (32 bits). That is
        a local curvature estimate, not the global constant L_i.
      Other arguments as for `ef21`.
    """
    L = None
    if smoothness is not None:
        if runtime is not None and len(smoothness) != runtime.num_clients:
            raise ConfigError(f"smoothness needs one value per client ({runtime.num_clients})",
                              key="smoothness", value=len(smoothness))
        L = torch.tensor(smoothness, dtype=torch.float64)
    return _family(lr=lr, compressor=compressor, stochastic=stochastic, init=init, reg=reg,
                   weighting=weighting, smoothness=L, estimate=L is None)


@STRATEGIES.register("econtrol")
def econtrol(*, lr: PositiveFloat = 0.2, compressor: CompressorCfg = TOP_K, eta: NonNegFloat = 0.1,
             stochastic: bool = False, init: Init = "dense", weighting: Weighting = "samples",
             reg: NonNegFloat = 0.0) -> Strategy:
    """EControl (Gao, Islamov, Stich, ICLR 2024, arXiv:2311.05645): EF21 plus a fed-back error.

    Client i keeps h_i (key "g") and e_i: Delta_i = C(eta e_i + grad_i - h_i),
    e_i += grad_i - h_i - Delta_i, h_i += Delta_i; the server adds sum pi_i Delta_i to h and steps
    x <- x - gamma h with the updated h (ALGORITHMS.md §13 gap 6: the third-party code's order).
    eta = 0 with init="compressed" is EF21. The theory uses eta = alpha/400; experiments tune it.
    """
    return _family(lr=lr, compressor=compressor, stochastic=stochastic, init=init, reg=reg,
                   weighting=weighting, eta=eta)


@STRATEGIES.register("compressed-gd")
def compressed_gd(*, lr: PositiveFloat = 0.5, compressor: CompressorCfg = TOP_K,
                  error_feedback: bool = False, stochastic: bool = False, reg: NonNegFloat = 0.0,
                  runtime: StrategyRuntime | None = None) -> Strategy:
    """Naive compressed GD: x <- x - sum_{i in S} p_i C(gamma grad_i(x)) (the no-feedback baseline).

    With a biased compressor such as top_k this stalls or drifts on heterogeneous clients
    (Beznosikov et al. 2020, arXiv:2002.12410); `error_feedback: true` is classic error feedback
    EF14 (Seide et al. 2014; Stich et al. 2018): send C(e_i + gamma grad_i), keep the rest in e_i.
    Built as `compress_uplink` around distributed GD; p_i = n_i / sum_{j in S} n_j.
    """
    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        loss, grad = _gradients(oracle, broadcast_rows(server["x"], ctx.m), stochastic, reg)
        return {"step": lr * grad}, clients, {"loss": loss}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        return {**server, "x": server["x"] - reduced["step"]} if reduced else server

    if "error_feedback" in compressor:
        raise ConfigError("use compressed-gd's own error_feedback parameter",
                          key="compressor.error_feedback", value=compressor["error_feedback"])
    gd = Strategy(init_server=lambda x0: {"x": x0.clone()}, init_clients=no_clients, local=local,
                  server_update=server_update)
    return compress_uplink(gd, {**compressor, "error_feedback": error_feedback}, runtime)
