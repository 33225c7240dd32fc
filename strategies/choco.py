"""CHOCO-SGD: decentralized SGD with compressed gossip and error feedback through public copies.

Reference:
  Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with
  Compressed Communication", ICML 2019, arXiv:1902.00340 (Algorithm 2, CHOCO-SGD).
"""

from __future__ import annotations

import torch

from fedsim.constraints import Fraction, NonNegativeFloat, PositiveInt
from fedsim.types import Compressor, Oracle, RoundCtx, Strategy, Tree, model_rows
from strategies import STRATEGIES
from strategies.compress import contractive, require_stateless, top_k
from strategies.local import broadcast_rows, local_sgd


@STRATEGIES.register("choco")
def choco(*, lr: NonNegativeFloat = 0.1, local_steps: PositiveInt = 1,
          gamma: Fraction = 0.2, compressor: Compressor = top_k(ratio=0.1)) -> Strategy:
    """CHOCO-SGD (Koloskova et al. 2019): gossip of compressed differences to public copies.

    Every node i keeps its model x_i and a public copy x^_i that all its neighbours also hold
    (x^_i = 0 at the start). Per round, with Q the compressor (in contractive form: an unbiased
    Q is scaled by 1 / (1 + omega)) and W the round's mixing matrix:

      x_i^{t+1/2} = K = `local_steps` SGD steps of size `lr` from x_i^t
      q_i = Q(x_i^{t+1/2} - x^_i);  x^_j <- x^_j + q_j at i and at every neighbour of j
      x_i^{t+1} = x_i^{t+1/2} + gamma sum_j W_ij (x^_j - x^_i)

    Only q_i crosses the network (the compressor's encoding, once per neighbour).
    The engine multiplies the updated copies x^ by W, i.e. the sum each node evaluates over the
    copies it holds. With the identity compressor and gamma = 1 this is D-SGD (`gossip`,
    order "atc"). Copies are kept for the current neighbours, which
    is exact on a static topology; on a time-varying one it assumes a node knows the copies of
    whoever it meets (an idealisation).

    Args:
      lr: local step size eta. local_steps: SGD steps K per round.
      gamma: consensus step size (the paper tunes it; smaller for more aggressive compression).
      compressor: a stateless compressor (`strategies.compress`), default top_k with ratio 0.1.

    Shapes: node state {"x", "xhat": [m, P]}; payload {"xhat": [m, P]}.
    """
    require_stateless(compressor, "compressor", "choco keeps its own error feedback (public copies)")
    comp = contractive(compressor)  # type: ignore[arg-type]

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        x = broadcast_rows(x0, ids.numel())
        return {"x": x, "xhat": torch.zeros_like(x)}

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        y, loss = local_sgd(clients["x"], oracle, local_steps, lr, budget=ctx.steps)
        q, enc, _ = comp.compress(y - clients["xhat"], {}, ctx, ())
        xhat = clients["xhat"] + q
        return {"xhat": xhat}, {"x": y, "xhat": xhat}, {"loss": loss, "sent_values": enc.values,
                                                         "sent_bits": enc.bits}

    def node_update(clients: Tree, mixed: Tree, ctx: RoundCtx) -> Tree:
        x = clients["x"] + gamma * (mixed["xhat"] - clients["xhat"])
        return {"x": x, "xhat": clients["xhat"]}

    return Strategy(init_server=lambda x0: {}, init_clients=init_clients, local=local,
                    node_update=node_update, comm="mix", mixing={"xhat": "W"}, broadcast=(),
                    payload=model_rows("xhat"), local_steps=local_steps)
