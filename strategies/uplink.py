"""`compress_uplink`: any server strategy's uplink through a (stateful) compressor.

Client i's payload row of key k (the j-th key in sorted order) is sent as the compressor's
decoded row, with the compressor's random stream (j,) and its sender state kept in the client
tree under ``"uplink/<k>/..."`` (zero at the first participation, untouched while absent); the
receiver half turns the weighted sum of decoded rows into the estimate the strategy's
`server_update` receives, with its state in the server tree under the same prefix. The bytes
are the compressor's encoding (`info["sent_values"]`, `info["sent_bits"]`). Shapes of the
state come from the strategy's declared `payload`. Scenario form:
``strategy: {name: fedavg, compressor: {name: ef14, inner: {name: top_k, ratio: 0.01}}}``.

In a round nobody took part in, a stateless channel delivers nothing (the strategy receives
{}), while a stateful receiver (EF21's g) still holds its estimate and passes it on: EF21-PP
steps with g^t when no client reports.
"""

from __future__ import annotations

import math

import torch

from fedsim.types import Compressor, Oracle, RoundCtx, Strategy, Tree

PREFIX = "uplink/"


def _state(tree: Tree, key: str) -> Tree:
    head = f"{PREFIX}{key}/"
    return {k[len(head):]: v for k, v in tree.items() if k.startswith(head)}


def _prefixed(state: Tree, key: str) -> Tree:
    return {f"{PREFIX}{key}/{k}": v for k, v in state.items()}


def _own(tree: Tree) -> Tree:
    return {k: v for k, v in tree.items() if not k.startswith(PREFIX)}


def compress_uplink(strategy: Strategy, compressor: Compressor) -> Strategy:
    """`strategy` whose payload rows are compressed by `compressor` (see the module docstring)."""
    if strategy.comm != "reduce":
        raise ValueError("compressor: gossip strategies compress their own exchange (e.g. choco)")

    def keys(p: int) -> dict[str, int]:
        spec = strategy.payload(p)
        return {k: math.prod(spec[k]) for k in sorted(spec) if k not in strategy.derived_keys}

    def init_server(x0: torch.Tensor) -> Tree:
        server = strategy.init_server(x0)
        for k, d in keys(x0.shape[-1]).items():
            server.update(_prefixed(compressor.init_receiver(x0.new_zeros(d)), k))
        return server

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        clients = strategy.init_clients(x0, ids)
        for k, d in keys(x0.shape[-1]).items():
            clients.update(_prefixed(compressor.init(x0.new_zeros((ids.numel(), d))), k))
        return clients

    def local(server: Tree, clients: Tree, oracle: Oracle, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        payload, own, info = strategy.local(_own(server), _own(clients), oracle, ctx)
        dev = ctx.ids.device
        values = torch.zeros(ctx.m, dtype=torch.float64, device=dev)
        bits = torch.zeros(ctx.m, dtype=torch.float64, device=dev)
        out, new = dict(payload), dict(own)
        for j, k in enumerate(keys(int(server[strategy.model_key].shape[-1]))):
            rows = payload[k].reshape(ctx.m, -1)
            dec, enc, st = compressor.compress(rows, _state(clients, k), ctx, (j,))
            out[k] = dec.reshape(payload[k].shape)
            new.update(_prefixed(st, k))
            values, bits = values + enc.values.to(dev), bits + enc.bits.to(dev)
        return out, new, {**info, "sent_values": values, "sent_bits": bits}

    def server_update(server: Tree, reduced: Tree, ctx: RoundCtx) -> Tree:
        estimates, receivers = {}, {}
        for k, d in keys(int(server[strategy.model_key].shape[-1])).items():
            state = _state(server, k)
            if reduced or state:
                got = reduced[k] if reduced else server[strategy.model_key].new_zeros(d)
                est, state = compressor.receive(got.reshape(-1), state)
                estimates[k] = est.reshape(got.shape)
            receivers.update(_prefixed(state, k))
        if reduced:
            estimates = {**reduced, **estimates}
        assert strategy.server_update is not None
        return {**strategy.server_update(_own(server), estimates, ctx), **receivers}

    return strategy._replace(init_server=init_server, init_clients=init_clients, local=local,
                             server_update=server_update)


__all__ = ["compress_uplink", "PREFIX"]
