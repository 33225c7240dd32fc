"""EF21-W: EF21 with per-client weights proportional to the smoothness constants L_i.

References:
  Richtárik, Gasanov, Burlachenko, "Error Feedback Reloaded: From Quadratic to Arithmetic Mean
  of Smoothness Constants", ICLR 2024, arXiv:2402.10774.
"""

from __future__ import annotations

import torch

from fedsim.constraints import PositiveFloat
from fedsim.objectives import estimate_smoothness
from fedsim.types import Compressor, Oracle, RoundCtx, Strategy, StrategyRuntime, Tree, model_rows
from strategies import STRATEGIES
from strategies.compress import require_stateless
from strategies.ef21 import TOP_K, Weighting, fixed_weights, gradients
from strategies.feedback import Init
from strategies.feedback import ef21 as ef21_wrapper
from strategies.local import broadcast_rows


@STRATEGIES.register("ef21-w")
def ef21_w(*, lr: PositiveFloat = 0.2, compressor: Compressor = TOP_K,
           smoothness: list[PositiveFloat] | None = None, stochastic: bool = False,
           init: Init = "dense", weighting: Weighting = "samples",
           runtime: StrategyRuntime | None = None) -> Strategy:
    """EF21-W (Richtárik, Gasanov, Burlachenko, ICLR 2024): EF21 with weights w_i ∝ pi_i L_i.

    c_i = C(grad_i / L_i - g_i), g_i += c_i, and the server adds sum_i pi_i L_i c_i: the paper's
    c_i = C(grad_i / (n w_i) - g_i), g += sum_i w_i c_i with w_i = pi_i L_i / sum_j pi_j L_j,
    run in unnormalised form (identical iterates for positively homogeneous C such as top_k).
    Step size 1/(L + L_AM sqrt(beta/theta)) (`theory_lr` with the mean L_i).

    Args:
      smoothness: L_i of every client (length N). None: each client estimates its L_i once, at
        its first participation, by power iteration on its full loss at the current model
        (`fedsim.objectives.estimate_smoothness`: 21 extra full-gradient calls of the block in
        rounds where a participant is new), and sends it up (one value). That is a local
        curvature estimate, not the global constant L_i.
      Other arguments as for `ef21`.

    Shapes: server {"x", "g": [P]}; clients EF21's {"g": [m, P], "seen": [m]} (+ "L": [m]).
    """
    if smoothness is not None and runtime is not None and len(smoothness) != runtime.num_clients:
        raise ValueError(f"smoothness: needs one value per client ({runtime.num_clients}), "
                         f"got {len(smoothness)}")
    require_stateless(compressor, "compressor", "EF21-W is error feedback itself")
    ef = ef21_wrapper(inner=compressor, init=init)
    given = None if smoothness is None else torch.tensor(smoothness, dtype=torch.float64)

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        state = ef.init(x0.new_zeros((ids.numel(), x0.shape[-1])))
        return state if given is not None else {**state, "L": x0.new_zeros(ids.numel())}

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        x = broadcast_rows(server["x"], ctx.m)
        loss, grad = gradients(oracle, x, stochastic)
        fresh = clients["seen"] == 0
        if given is not None:
            L = given.to(x)[ctx.ids]
        elif bool(fresh.any()):
            L = torch.where(fresh, estimate_smoothness(oracle, x, ctx.ids, seed=ctx.seed), clients["L"])
        else:
            L = clients["L"]
        c, enc, state = ef.compress(grad / L[:, None], {k: v for k, v in clients.items() if k != "L"},
                                    ctx)
        values = enc.values
        if given is None:
            values = values + fresh.to(values.dtype)  # L_i goes up once
            state = {**state, "L": L}
        return {"c": c * L[:, None]}, state, {"loss": loss, "sent_values": values, "sent_bits": enc.bits}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        g = server["g"] + reduced["c"] if reduced else server["g"]
        return {**server, "g": g, "x": server["x"] - lr * g}

    return Strategy(init_server=lambda x0: {"x": x0.clone(), "g": torch.zeros_like(x0)},
                    init_clients=init_clients, local=local, server_update=server_update,
                    weights=lambda server, ctx: fixed_weights(weighting, ctx), payload=model_rows("c"),
                    trains_locally=False)
