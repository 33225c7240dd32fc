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

`lr: theory` is the step of the strategy's theorem, factor / (L + L~ sqrt(beta/theta)) with
L~ = L_QM (EF21) or L_AM (EF21-W). Where the constants come from (docs/algorithms.md#ef21-w):
L_i from `smoothness` when given, else estimated once per client at its first participation
(`fedsim.objectives.estimate_smoothness` on its full loss at the current model, one value sent
up), and only when something uses them (the theory step, or EF21-W's weights with a compressor
that is not positively homogeneous); L from the step's `L`, else the bound sum_i pi_i L_i.

References:
  Richtárik, Sokolov, Fatkhullin, NeurIPS 2021, arXiv:2106.05203 (EF21, Theorem 1's step).
  Richtárik, Gasanov, Burlachenko, "Error Feedback Reloaded", ICLR 2024, arXiv:2402.10774 (EF21-W).
  Beznosikov, Horváth, Richtárik, Safaryan, arXiv:2002.12410 (biased compression can stall GD).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedsim.constraints import NonNegativeFloat, PositiveFloat
from fedsim.objectives import estimate_smoothness
from fedsim.types import Compressor, Oracle, RoundCtx, Strategy, StrategyRuntime, Tree, model_rows, no_clients
from strategies import STRATEGIES
from strategies.compress import require_stateless, top_k
from strategies.feedback import Init, ef14
from strategies.feedback import econtrol as econtrol_wrapper
from strategies.feedback import ef21 as ef21_wrapper
from strategies.local import broadcast_rows
from strategies.uplink import compress_uplink

Weighting = Literal["samples", "uniform"]
HOMOGENEOUS = frozenset({"identity", "top_k", "rand_k", "qsgd"})
"""Compressors with C(t v) = t C(v) for t > 0 (their random draws do not depend on v's scale):
EF21-W's weights cannot change EF21's iterates with them (Richtarik et al. 2024, Sec. 2.4)."""


@dataclass(frozen=True)
class TheoryStep:
    """`lr: theory`: factor / (L + L~ sqrt(beta/theta)), the strategy's theorem's step.

    L~ is L_QM = sqrt(N sum_i pi_i^2 L_i^2) for `ef21` (EF21 Thm 1) and L_AM = sum_i pi_i L_i for
    `ef21-w` (EF21-W Thm 2), with pi_i the fixed weights (f = sum_i pi_i f_i; for uniform pi these
    are the papers' sqrt(mean L_i^2) and mean L_i). L is the smoothness of f: given here, or
    bounded by sum_i pi_i L_i (the Hessian of f is the pi-mean of the clients'), which gives a
    slightly smaller step.
    """

    kind: Literal["theory"] = "theory"
    factor: PositiveFloat = 1.0
    L: PositiveFloat | None = None


THEORY = TheoryStep()
Step = PositiveFloat | TheoryStep


def positively_homogeneous(comp: Compressor) -> bool:
    """True for the `HOMOGENEOUS` operators and chains of them (by their registered name)."""
    spec = getattr(comp, "spec", None) or {}
    if spec.get("name") == "chain":
        return all(positively_homogeneous(stage) for stage in getattr(comp, "stages", ()))
    return spec.get("name") in HOMOGENEOUS


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


def all_weights(weighting: str, ctx: RoundCtx) -> torch.Tensor:
    """[N] pi_i of every client (`fixed_weights` for the whole population)."""
    n = ctx.total_samples.to(ctx.weight.dtype)
    return torch.full_like(n, 1.0 / ctx.num_clients) if weighting == "uniform" else n / n.sum()


def smoothness_sums(L: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """[..., 4] sums (pi L, pi^2 L^2, pi, pi^2) over the last axis of L, pi (or per row if [m])."""
    return torch.stack([pi * L, pi * pi * L * L, pi, pi * pi], dim=-1)


def theory_step(step: TheoryStep, sums: torch.Tensor, pi_all: torch.Tensor, alpha: float,
                mean: Literal["am", "qm"]) -> torch.Tensor:
    """EF21's step from `smoothness_sums` over the clients whose L_i are known (0 if none).

    Over all clients L_AM = sum pi_i L_i and L_QM = sqrt(N sum pi_i^2 L_i^2) (f = (1/N) sum phi_i
    with phi_i = N pi_i f_i); before every client is known the sums over the known ones are
    rescaled by the share of sum pi_i (resp. sum pi_i^2) they carry.
    """
    a, b, w, w2 = sums.unbind(-1)
    if float(w) <= 0:
        return sums.new_zeros(())
    am = a / w
    tilde = am if mean == "am" else torch.sqrt(pi_all.numel() * (pi_all * pi_all).sum() * b / w2)
    big_l = am if step.L is None else step.L
    return step.factor / (big_l + tilde * theory_constants(alpha)[2])


def ef21_family(*, lr: float | TheoryStep, compressor: Compressor, smoothness: Sequence[float] | None,
                weighted: bool, stochastic: bool, init: str, weighting: str) -> Strategy:
    """EF21 with optional smoothness weights (EF21-W) and the theory step; `ef21`, `ef21-w`.

    Weighted: c_i = C(grad_i / L_i - g_i), g_i += c_i, and the server adds sum_i pi_i L_i c_i:
    the paper's c_i = C(grad_i / (N w_i) - g_i), g += sum_i w_i c_i with w_i = pi_i L_i /
    sum_j pi_j L_j, in unnormalised form. Unweighted (L_i = 1 there): EF21. The server steps
    x <- x - gamma g with gamma = lr, or the `TheoryStep` from the L_i known so far (all of them
    from round 0 under full participation). L_i: `smoothness`, else estimated once per client
    when something uses them (see the module docstring); the estimate goes up once (one value)
    with the payload key "Ls" = [pi_i L_i, pi_i^2 L_i^2, pi_i, pi_i^2] of new clients (weight 1).

    Shapes: server {"x", "g": [P]} (+ "Ls": [4], the sums over the clients seen, when estimated
    L_i set the step); clients {"g": [m, P], "seen": [m]} (+ "L": [m] when estimated); payload
    {"c": [m, P]} (+ "Ls": [m, 4]).
    """
    require_stateless(compressor, "compressor", "EF21 is error feedback itself")
    theory = isinstance(lr, TheoryStep)
    if theory and stochastic:
        raise ValueError("lr: the theory step is EF21's for full gradients; with stochastic: true "
                         "give a number")
    if smoothness is not None and not (theory or weighted):
        raise ValueError("smoothness: EF21 uses the L_i only for lr: theory")
    # estimates cost 21 full-gradient calls per new client: only when something uses them
    uses_l = theory or (weighted and not positively_homogeneous(compressor))
    given = None if smoothness is None else torch.tensor(list(smoothness), dtype=torch.float64)
    estimate = uses_l and given is None
    ef = ef21_wrapper(inner=compressor, init=init)
    sends_l = estimate and theory   # the server needs the estimates (for the step)

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        state = ef.init(x0.new_zeros((ids.numel(), x0.shape[-1])))
        return {**state, "L": x0.new_zeros(ids.numel())} if estimate else state

    def client_l(x: torch.Tensor, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> torch.Tensor | None:
        if given is not None:
            return given.to(x)[ctx.ids]
        if not estimate:
            return None
        fresh = clients["seen"] == 0
        if not bool(fresh.any()):
            return clients["L"]
        return torch.where(fresh, estimate_smoothness(oracle, x, ctx.ids, seed=ctx.seed), clients["L"])

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        loss, grad = gradients(oracle, x, stochastic)
        fresh = clients["seen"] == 0
        L = client_l(x, clients, oracle, ctx)
        scale = L[:, None] if weighted and L is not None else None
        own = {k: v for k, v in clients.items() if k != "L"}
        c, enc, state = ef.compress(grad if scale is None else grad / scale, own, ctx)
        payload, values = {"c": c if scale is None else c * scale}, enc.values
        if estimate:
            assert L is not None
            state = {**state, "L": L}
            values = values + fresh.to(values.dtype)   # L_i goes up once
        if sends_l:
            assert L is not None
            payload["Ls"] = smoothness_sums(L, fixed_weights(weighting, ctx)) * fresh[:, None].to(L.dtype)
        return payload, state, {"loss": loss, "sent_values": values, "sent_bits": enc.bits}

    def step(server: Tree, ctx: RoundCtx) -> float | torch.Tensor:
        """gamma: lr, or the theory step from the L_i known (all if given, else the seen ones)."""
        if not isinstance(lr, TheoryStep):
            return lr
        pi = all_weights(weighting, ctx)
        known = server["Ls"] if given is None else smoothness_sums(given.to(pi), pi).sum(0)
        return theory_step(lr, known, pi, ef.alpha(server["x"].numel()), "am" if weighted else "qm")

    def init_server(x0: torch.Tensor) -> Tree:
        server = {"x": x0.clone(), "g": torch.zeros_like(x0)}
        return {**server, "Ls": x0.new_zeros(4)} if sends_l else server

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        out = {**server, "g": server["g"] + reduced["c"] if reduced else server["g"]}
        if sends_l and reduced:
            out["Ls"] = server["Ls"] + reduced["Ls"].to(server["Ls"])
        return {**out, "x": server["x"] - step(out, ctx) * out["g"]}

    def weights(server: Tree, ctx: RoundCtx) -> Tree | torch.Tensor:
        pi = fixed_weights(weighting, ctx)
        return {"c": pi, "Ls": torch.ones_like(pi)} if sends_l else pi

    shapes = {"c": None, "Ls": (4,)} if sends_l else {"c": None}
    return Strategy(init_server=init_server, init_clients=init_clients, local=local,
                    server_update=server_update, weights=weights,
                    payload=lambda p: {k: (p,) if v is None else v for k, v in shapes.items()},
                    trains_locally=False)


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


def check_smoothness(smoothness: Sequence[float] | None, runtime: StrategyRuntime | None) -> None:
    """ValueError unless `smoothness` (when given) has one value per client."""
    if smoothness is not None and runtime is not None and len(smoothness) != runtime.num_clients:
        raise ValueError(f"smoothness: needs one value per client ({runtime.num_clients}), "
                         f"got {len(smoothness)}")


@STRATEGIES.register("ef21")
def ef21(*, lr: Step = 0.2, compressor: Compressor = TOP_K, smoothness: list[PositiveFloat] | None = None,
         stochastic: bool = False, init: Init = "dense", weighting: Weighting = "samples",
         runtime: StrategyRuntime | None = None) -> Strategy:
    """EF21 (arXiv:2106.05203) and EF21-SGD / EF21-PP (arXiv:2110.03294): `gd` + ef21(compressor).

    x <- x - gamma g, c_i = C(grad_i - g_i), g_i += c_i, g += sum_i pi_i c_i (`ef21_family`);
    the same iterates as `gd` with `compressor: {name: ef21, inner: ...}`.

    Args:
      lr: server step gamma: a number (the papers' experiments use multiples of the theory
        step), or `theory` / {kind: theory, factor: f, L: L}: Theorem 1's
        f / (L + L_QM sqrt(beta/theta)) (`TheoryStep`; full gradients only).
      compressor: the inner compressor, used in contractive form (default top_k, ratio 0.1).
      smoothness: L_i of every client (length N), used only by `lr: theory`; None there:
        estimated once per client at its first participation (21 full-gradient calls).
      stochastic: EF21-SGD. init: "dense" (first message uncompressed) or "compressed".
      weighting: as for `gd`.

    With the identity compressor the iterates are those of `gd`. Under partial participation
    `lr: theory` is still Theorem 1's step (EF21-PP's own step is not implemented).
    """
    check_smoothness(smoothness, runtime)
    return ef21_family(lr=lr, compressor=compressor, smoothness=smoothness, weighted=False,
                       stochastic=stochastic, init=init, weighting=weighting)


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
