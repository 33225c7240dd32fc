"""`compress_uplink`: row-wise compression (optionally with EF14 error feedback) of any reduce
strategy's uplink. Re-exported by `strategies.compress`; see `compress_uplink` for the math."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import torch

from fedsim.errors import ConfigError
from fedsim.types import RoundCtx, Strategy, StrategyRuntime, Tree

EF_PREFIX = "uplink_ef/"


class _ZeroOracle:
    """Zero gradients: lets `compress_uplink` learn a strategy's payload shapes (values unused)."""

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full(x)

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device), torch.zeros_like(x)


def _payload_shapes(strategy: Strategy, x0: torch.Tensor, n: int) -> dict[str, tuple[torch.Size, Any]]:
    x = x0 if x0.dim() == 1 else x0[0]
    ids = torch.zeros(1, dtype=torch.int64, device=x.device)
    one = torch.ones(1, dtype=torch.int64, device=x.device)
    mask = torch.zeros(max(n, 1), dtype=torch.bool, device=x.device)
    mask[0] = True
    ctx = RoundCtx(round=0, seed=0, ids=ids, num_samples=one, weight=one.to(x.dtype),
                   participants=mask, total_samples=one.expand(max(n, 1)), num_clients=max(n, 1))
    payload, _, _ = strategy.local(strategy.init_server(x), strategy.init_clients(x, ids),
                                   _ZeroOracle(), ctx)
    return {k: (v.shape[1:], v.dtype) for k, v in payload.items()}


def compress_uplink(strategy: Strategy, cfg: Mapping[str, Any],
                    runtime: StrategyRuntime | None = None) -> Strategy:
    """Compress every payload key a reduce strategy sends up, row by row; report info["up_bits"].

    Key j of the sorted payload keys uses the random stream (j,). With `error_feedback: true`
    in `cfg` this is classic error feedback (EF14: Seide et al. 2014; Karimireddy et al. 2019):
    client i keeps e_i per key (client-tree key "uplink_ef/<key>", zero at first participation,
    untouched while absent), sends c_i = C(e_i + p_i) and keeps e_i <- e_i + p_i - c_i; unbiased
    compressors are then used in their contractive form C/(1 + omega). The server side is the
    strategy's own (it reduces the decoded c_i with its weights). The shapes of the e_i rows
    are learnt once per model size by running the strategy's pure `local` on one client with
    zero gradients (`init_clients` cannot see a payload otherwise). Scenario form:
    ``strategy: {name: fedavg, compressor: {name: top_k, ratio: 0.01, error_feedback: true}}``.
    """
    if strategy.comm != "reduce":
        raise ConfigError("compress_uplink wraps server (reduce) strategies; gossip compresses "
                          "its own exchange", key="compressor")
    from strategies.compress import build_compressor, validate_compressor

    cfg = validate_compressor(cfg)
    ef = bool(cfg.get("error_feedback", False))
    n = runtime.num_clients if runtime is not None else 1
    comp_for = lru_cache(maxsize=None)(lambda j: build_compressor(cfg, stream=(j,), contractive=ef))
    memo: dict[tuple, dict] = {}  # payload shapes per x0 shape: metadata, not algorithm state

    def init_clients(x0: torch.Tensor, ids: torch.Tensor) -> Tree:
        inner = strategy.init_clients(x0, ids)
        if not ef:
            return inner
        key = (x0.shape[-1], x0.dtype, str(x0.device))
        if key not in memo:
            memo[key] = _payload_shapes(strategy, x0, n)
        m = ids.shape[0]
        return {**inner, **{EF_PREFIX + k: torch.zeros((m, *s), dtype=dt, device=x0.device)
                            for k, (s, dt) in memo[key].items()}}

    def local(server: Tree, clients: Tree, oracle: Any, ctx: RoundCtx) -> tuple[Tree, Tree, Tree]:
        own = {k: v for k, v in clients.items() if not k.startswith(EF_PREFIX)}
        payload, own, info = strategy.local(server, own, oracle, ctx)
        out, errs = {}, {}
        bits = torch.zeros(ctx.m, dtype=torch.float64, device=ctx.ids.device)
        for j, k in enumerate(sorted(payload)):
            rows = payload[k].reshape(ctx.m, -1)
            if ef:
                rows = rows + clients[EF_PREFIX + k].reshape(ctx.m, -1)
            dec, b = comp_for(j).compress(rows, ctx)
            if ef:
                errs[EF_PREFIX + k] = (rows - dec).reshape(payload[k].shape)
            out[k] = dec.reshape(payload[k].shape)
            bits = bits + b.to(bits.device)
        return out, {**own, **errs}, {**info, "up_bits": bits}

    return strategy._replace(init_clients=init_clients, local=local)
