"""Tests added by the mutation pass over the compressors and error-feedback wrappers
(strategies/compress.py, strategies/feedback.py, strategies/ef21.py, strategies/uplink.py);
each kills a named single-point mutant (table in tests/README.md)."""

from __future__ import annotations

import torch

from fedsim import round as kernel
from fedsim.registry import build_nested


def _ctx(ids, round=0, seed=0, n=1000):
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return kernel.make_ctx(round, seed, ids, torch.ones(n, dtype=torch.bool),
                           torch.ones(n, dtype=torch.int64), torch.float64)


def test_top_k_ratio_rounds_the_count_up():
    """k = ceil(ratio d) (Stich et al. 2018's k = ratio d, rounded up so that ratio > 0 keeps at
    least ratio d): ratio 0.1 of d = 25 keeps 3 values and alpha = 3/25. Kills `ceil` -> `floor`
    in `_num_kept` (C02: 2 values, alpha 2/25)."""
    comp = build_nested("compressors", {"name": "top_k", "ratio": 0.1})
    v = torch.arange(1.0, 26.0, dtype=torch.float64)[None]
    dec, enc, _ = comp.compress(v, {}, _ctx([0]))
    assert dec.nonzero()[:, 1].tolist() == [22, 23, 24]
    assert enc.values.tolist() == [3.0]
    assert comp.alpha(25) == 3 / 25


def test_ef14_memory_telescopes():
    """EF14 (Seide et al. 2014; Karimireddy et al. 2019): e_{t+1} = e_t + v_t - c_t, so after T
    rounds sum_t c_t + e_T = sum_t v_t exactly (nothing is lost, only delayed). Kills
    `e <- v - c` (S: F01, the memory forgetting its past error)."""
    comp = build_nested("compressors", {"name": "ef14", "inner": {"name": "top_k", "k": 1}})
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    state = comp.init(torch.zeros(2, 4, dtype=torch.float64))
    sent = torch.zeros(2, 4, dtype=torch.float64)
    for t, v in enumerate(vs):
        c, _, state = comp.compress(v, state, _ctx([0, 1], round=t))
        assert (c != 0).sum(1).tolist() == [1, 1]
        sent = sent + c
    torch.testing.assert_close(sent + state["e"], sum(vs), rtol=1e-12, atol=1e-12)


def test_compressed_gd_with_the_identity_is_one_gd_step():
    """Naive compressed GD x <- x - sum_S p_i C(gamma grad_i(x)) with C = identity is gradient
    descent with step gamma: from x = 0 on f_0 = 0.5 (x_0^2 + 2 (x_1 - 1)^2), f_1 = 0.5 (3 (x_0 - 1)^2
    + x_1^2) (equal sizes), x1 = -0.3 * 0.5 ([0, -2] + [-3, 0]) = [0.45, 0.3]. Kills sending
    grad instead of gamma grad (E16)."""
    from fedsim import testing

    problem = testing.QuadraticProblem([[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]])
    strat = testing.build("compressed-gd", {"lr": 0.3, "compressor": {"name": "identity"}}, problem)
    x = testing.run(strat, problem, 1).state.server["x"]
    torch.testing.assert_close(x, torch.tensor([0.45, 0.3], dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_econtrol_error_telescopes():
    """EControl (Gao et al. 2024): Delta_t = C(eta e_t + v_t - h_t), e_{t+1} = e_t + v_t - h_t - Delta_t,
    h_{t+1} = h_t + Delta_t, so sum_t Delta_t + e_T = sum_t (v_t - h_t) exactly. Kills
    `e <- v - h - Delta` (F05, the error forgetting its past)."""
    comp = build_nested("compressors", {"name": "econtrol", "eta": 0.5, "init": "compressed",
                                        "inner": {"name": "top_k", "k": 1}})
    g = torch.Generator().manual_seed(1)
    state = comp.init(torch.zeros(2, 4, dtype=torch.float64))
    sent = torch.zeros(2, 4, dtype=torch.float64)
    target = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(5):
        v = torch.randn(2, 4, generator=g, dtype=torch.float64)
        target = target + v - state["g"]
        c, _, state = comp.compress(v, state, _ctx([0, 1], round=t))
        sent = sent + c
    torch.testing.assert_close(sent + state["e"], target, rtol=1e-12, atol=1e-12)
    assert not torch.equal(state["e"], torch.zeros_like(state["e"]))


def _scaffold_uplink(compressor):
    from fedsim import testing
    from strategies.scaffold import scaffold
    from strategies.uplink import compress_uplink

    problem = testing.heterogeneous_quadratic(num_clients=16, dim=4, seed=0)
    return problem, compress_uplink(scaffold(lr=0.1, local_steps=1), build_nested("compressors", compressor))


def test_every_compressed_payload_key_is_counted():
    """SCAFFOLD sends two keys (delta, dc); top-1 of P = 4 float64 sends per key one value and a
    2-bit index, so a client's upload is ceil(2 (64 + 2) / 8) = 17 bytes, not the last key's
    value alone. Kills `values + enc.values` -> `enc.values` in `compress_uplink` (U01)."""
    from fedsim import testing

    problem, strat = _scaffold_uplink({"name": "top_k", "k": 1})
    loop = testing.run(strat, problem, 2)
    assert loop.state.bytes.per_round[0][0] == 16 * 17
    assert loop.state.bytes.up == 2 * 16 * 17


def test_payload_keys_are_compressed_with_independent_random_streams():
    """compress_uplink hands key j the compressor stream (j,): rand-1 of P = 4 draws the kept
    coordinate of delta and of dc independently, so over 16 clients they do not always
    coincide (P(all equal) = 4^-16). Kills giving every key stream (0,) (U03)."""
    problem, strat = _scaffold_uplink({"name": "rand_k", "k": 1})
    server = strat.init_server(torch.zeros(4, dtype=torch.float64))
    ids = torch.arange(16)
    ctx = _ctx(ids, n=16)
    clients = strat.init_clients(torch.zeros(4, dtype=torch.float64), ids)
    # a nonzero control so that dc is dense before compression (delta always is)
    server = {**server, "c": torch.ones(4, dtype=torch.float64)}
    payload, _, _ = strat.local(server, clients, problem.oracle(ids, 0), ctx)
    where_delta = payload["delta"].ne(0).to(torch.int64).argmax(1)
    where_dc = payload["dc"].ne(0).to(torch.int64).argmax(1)
    assert payload["delta"].ne(0).sum(1).tolist() == [1] * 16
    assert not torch.equal(where_delta, where_dc)


def test_ef21_pp_server_estimate_is_the_uniform_mean_over_all_clients():
    """EF21-PP (Fatkhullin et al. 2021) with uniform pi_i = 1/N: g = (1/N) sum_i g_i over ALL N
    clients, absent ones keeping their g_i, whoever takes part. Kills pi_i = 1/|S| (E18)."""
    from fedsim import testing
    from fedsim.engines.loop import RoundLoop

    problem = testing.heterogeneous_quadratic(num_clients=4, dim=3, seed=1)
    params = {"lr": 0.1, "weighting": "uniform", "compressor": {"name": "top_k", "k": 1}}
    strat = testing.build("ef21", params, problem)
    masks = testing.MaskParticipation([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1]])
    loop = RoundLoop(strat, problem, torch.zeros(3, dtype=torch.float64), rounds=3, seed=0,
                     participation=masks)
    for t in range(3):
        loop.step(t)
        g = loop.state.store.gather(torch.arange(4))["g"]
        torch.testing.assert_close(loop.state.server["g"], g.mean(0), rtol=0, atol=1e-14)
