"""Gossip learning with variance-corrected model averaging.

Averaging M weakly correlated models (e.g. independently initialised ones) divides each
layer's weight variance by about M; repeated gossip averaging keeps shrinking it ("vanishing
variance") and slows training, while federated learning avoids it because every client starts
from the same server model. The correction rescales every parameter tensor of the averaged
model around its mean so that its variance equals the mean variance of the received models.

References:
  Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully Decentralized
  Neural-Network Systems", arXiv:2404.04616 (2024). Reference code: twoentartian/DFL_torch
  `py_src/model_variance_correct.py`, `py_src/model_average.py` (ConservativeModelAverager,
  the defaults here) and twoentartian/DFL2 `simulator_opti_model_update.hpp` (C++, the
  `population_var` / `weights_only` / `eps=0` parity flags).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.constraints import NonNegativeFloat, PositiveInt, Probability
from fedsim.types import LocalOptimizer, Oracle, RoundCtx, Strategy, StrategyRuntime, Tree
from strategies import STRATEGIES
from strategies.gossip import node_models
from strategies.local import run_local, sgd

Segment = tuple[int, int]
SGD = sgd()


def corrected_segments(segments: Sequence[tuple[str, int, int]], weights_only: bool = False
                       ) -> list[Segment]:
    """(start, stop) of the parameter tensors that variance correction rescales.

    1-element tensors are skipped (their variance is undefined), as in DFL_torch. With
    `weights_only`, tensors whose name ends in "bias" are skipped too, as in DFL2, which rescales
    only each Caffe layer's blobs[0] (the weights). Segments carry names, not shapes, so bias
    detection is by name: fedsim models are `nn.Module`s whose biases are named `*.bias`.
    """
    keep = []
    for name, start, stop in segments:
        if stop - start <= 1 or (weights_only and name.rsplit(".", 1)[-1] == "bias"):
            continue
        keep.append((start, stop))
    return keep


def tensor_variances(x: torch.Tensor, segs: Sequence[Segment], unbiased: bool = True) -> torch.Tensor:
    """Per-tensor variance of every row: x [m, P] -> [m, len(segs)] (divide by n-1 if unbiased)."""
    cols = [x[:, a:b].var(dim=1, unbiased=unbiased) for a, b in segs]
    return torch.stack(cols, dim=1) if cols else x.new_zeros(x.shape[0], 0)


def variance_correct(avg: torch.Tensor, target: torch.Tensor, segs: Sequence[Segment], *,
                     eps: float = 1e-4, unbiased: bool = True) -> torch.Tensor:
    """Rescale each tensor of each row around its mean to variance `target` (a new tensor).

    For segment l of row i, with mu = mean(avg_i[l]) and v = Var(avg_i[l]):
      out_i[l] = (avg_i[l] - mu) * sqrt((target_il + eps) / (v + eps)) + mu,
    so the mean is kept and Var(out_i[l]) = v (target_il + eps) / (v + eps), which is exactly
    target_il when eps = 0. A constant tensor (v = 0) with eps = 0 is left unchanged.
    Parameters outside `segs` are copied.

    Args:
      avg: [m, P] averaged models. target: [m, len(segs)] target variances.
      segs: (start, stop) per corrected tensor. eps: stabiliser inside both square roots.
      unbiased: variance with n-1 (PyTorch port) or n (C++ simulator) in the denominator.
    """
    out = avg.clone()
    for j, (a, b) in enumerate(segs):
        seg = avg[:, a:b]
        mu = seg.mean(dim=1, keepdim=True)
        den = seg.var(dim=1, unbiased=unbiased, keepdim=True) + eps
        num = target[:, j:j + 1] + eps
        scale = torch.where(den > 0, torch.sqrt(num / den.clamp_min(torch.finfo(den.dtype).tiny)),
                            torch.ones_like(den))
        out[:, a:b] = (seg - mu) * scale + mu
    return out


@STRATEGIES.register("gossip-var")
def gossip_var(*, runtime: StrategyRuntime, lr: NonNegativeFloat = 0.1,
               local_steps: PositiveInt = 1, optimizer: LocalOptimizer = SGD,
               beta: Probability = 0.5, eps: NonNegativeFloat = 1e-4, population_var: bool = False,
               weights_only: bool = False) -> Strategy:
    """Gossip learning with variance-corrected averaging (Tian et al. 2024, arXiv:2404.04616).

    Every node i takes `local_steps` steps of its local optimizer (y_i), sends y_i to its
    neighbours N(i), and combines conservatively what it receives (M = |N(i)| models):

      avg_i = beta * y_i + (1 - beta) * (1/M) sum_{j in N(i)} y_j
      for each parameter tensor l:  target_il = (1/M) sum_{j in N(i)} Var(y_j[l])
      x_i[l] = (avg_i[l] - mean(avg_i[l])) * sqrt((target_il + eps) / (Var(avg_i[l]) + eps))
               + mean(avg_i[l])

    i.e. the mean of every tensor is kept and its variance is restored to the mean variance of
    the received models ("FollowOthers"). Defaults follow the PyTorch port DFL_torch (every
    parameter tensor with more than one element, unbiased variance, eps = 1e-4, beta = 0.5);
    `population_var=True, weights_only=True, eps=0` gives the C++ simulator DFL2. A node with
    no neighbour in a round keeps y_i. Normalisation buffers (BatchNorm running statistics),
    which the reference code leaves untouched, do not exist here: fedsim's flat parameters hold
    only `nn.Parameter`s and models with float buffers are rejected.

    The local optimizer defaults to plain SGD with lr 0.1, as `gossip`, so that the two differ
    only in the averaging; DFL_torch trains with SGD lr 0.01, momentum 0.9, weight decay 1e-4
    (`lr: 0.01, optimizer: {name: momentum, mass: 0.9, weight_decay: 1.0e-4}`). Its state (the
    heavy-ball buffer) is kept per node across rounds and is neither averaged nor reset by the
    combination, as the reference keeps each node's optimizer.

    The engine mixes {"x": y, "stats": [Var(y_j[l])..., 1]} with the uniform in-neighbour mean
    ("mean", self excluded); the trailing 1 tells whether a node received anything. Bytes
    count only the model ("stats" is a derived key), since a real receiver computes the
    variances itself.

    Args:
      runtime: supplies `segments`, the (name, start, stop) of every tensor.
      lr: local step size (0 gives pure averaging). local_steps: local steps per round.
      optimizer: the nodes' local optimizer (`strategies.local`: {name: sgd}, {name: momentum,
        mass: 0.9, weight_decay: 1e-4}, {name: adamw, ...}); its state persists per node.
      beta: conservativeness, the weight of the node's own model.
      eps: added to numerator and denominator inside the square root (0: C++ parity).
      population_var: divide by n (C++) instead of n - 1 (PyTorch port).
      weights_only: rescale only tensors not named "*bias" (C++ parity).

    Shapes: node state {"x": [m, P]} + the optimizer's state (momentum: {"buf": [m, P]});
    payload {"x": [m, P], "stats": [m, L + 1]} with L the number of corrected tensors.
    """
    segs = corrected_segments(runtime.segments, weights_only)
    unbiased = not population_var
    if "x" in optimizer.init(torch.zeros(1, 1)):
        raise ValueError("optimizer: its state may not use the key 'x' (the node model)")

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        nodes = node_models(x0, ids)
        return {**nodes, **optimizer.init(nodes["x"])}

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        state = {k: v for k, v in clients.items() if k != "x"}
        run = run_local(clients["x"], oracle, local_steps, lr, optimizer, state=state, budget=ctx.steps)
        var = tensor_variances(run.y, segs, unbiased)
        stats = torch.cat([var, torch.ones_like(var[:, :1])], dim=1)
        return {"x": run.y, "stats": stats}, {**run.state, "x": run.y}, {"loss": run.loss}

    def node_update(clients: Tree, mixed: Tree, ctx: RoundCtx) -> Tree:
        own, received = clients["x"], mixed["x"]
        has_peer = mixed["stats"][:, -1:] > 0.5
        avg = beta * own + (1 - beta) * received
        out = variance_correct(avg, mixed["stats"][:, :-1], segs, eps=eps, unbiased=unbiased)
        return {**clients, "x": torch.where(has_peer, out, own)}   # optimizer state kept as is

    return Strategy(init_server=lambda x0: {}, init_clients=init_clients, local=local,
                    node_update=node_update, comm="mix", mixing={"x": "mean", "stats": "mean"},
                    broadcast=(), payload=lambda p: {"x": (p,), "stats": (len(segs) + 1,)},
                    derived_keys=("stats",), local_steps=local_steps)
