"""Compressor contracts: selection, contraction, unbiasedness, encodings, chain, keyed determinism,
configuration errors, error-feedback wrappers, and the generic uplink wrapper (`compress_uplink`)."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim import round as kernel
from fedsim import testing
from fedsim.errors import ConfigError
from fedsim.registry import build_nested
from strategies.compress import contractive, top_k
from strategies.fedavg import fedavg
from strategies.feedback import ef14, ef21
from strategies.uplink import compress_uplink
from tests.conftest import run_cli


def _ctx(ids, round=0, seed=0, n=100_000):
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return kernel.make_ctx(round, seed, ids, torch.ones(n, dtype=torch.bool),
                           torch.ones(n, dtype=torch.int64), torch.float64)


class _Stateless:
    """A compressor's sender half called the short way: (decoded, bits per row at v's width)."""

    def __init__(self, comp):
        self.comp, self.alpha, self.omega = comp, comp.alpha, comp.omega

    def compress(self, v, ctx):
        dec, enc, _ = self.comp.compress(v, {}, ctx)
        return dec, enc.values * v.element_size() * 8 + enc.bits


def _comp(**cfg):
    return _Stateless(build_nested("compressors", cfg))


def _rows(m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=torch.float64)


def test_top_k_keeps_the_k_largest_and_breaks_ties_by_lowest_index():
    # Prepare: row 0 has distinct magnitudes, row 1 ties everywhere
    v = torch.tensor([[3.0, -5.0, 0.5, 4.0], [1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    # Execute
    dec, bits = _comp(name="top_k", k=2).compress(v, _ctx([0, 1]))
    # Assert: k * (64 + ceil(log2 4)) = 2 * 66 bits per row (float64 values)
    expect = torch.tensor([[0.0, -5.0, 0.0, 4.0], [1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(dec, expect)
    assert bits.tolist() == [132.0, 132.0]


@pytest.mark.parametrize("cfg", [{"name": "top_k", "ratio": 0.1}, {"name": "top_k", "k": 7}])
def test_top_k_is_a_contraction_with_alpha_k_over_d(cfg):
    v = _rows(50, 37)
    comp = _comp(**cfg)
    dec, _ = comp.compress(v, _ctx(range(50)))
    err, norm = ((dec - v) ** 2).sum(1), (v ** 2).sum(1)
    assert torch.all(err <= (1 - comp.alpha(37)) * norm + 1e-12)
    assert torch.all((dec != 0).sum(1) == math.ceil(comp.alpha(37) * 37 - 1e-9))


@pytest.mark.parametrize("cfg", [
    {"name": "rand_k", "k": 2}, {"name": "qsgd", "levels": 2}, {"name": "natural"},
    {"name": "chain", "stages": [{"name": "rand_k", "k": 3}, {"name": "natural"}]},
])
def test_unbiased_compressors_average_to_v_with_variance_at_most_omega(cfg):
    # Prepare: the same row sent by 40,000 clients: independent keyed draws
    m, v = 40_000, torch.tensor([[2.0, -1.0, 0.25, 0.0, 3.0]], dtype=torch.float64)
    comp = _comp(**cfg)
    # Execute
    dec, _ = comp.compress(v.expand(m, -1), _ctx(range(m), round=3))
    # Assert: mean within 5 standard errors; mean squared error below omega ||v||^2 (+5 %)
    se = dec.std(0) / math.sqrt(m)
    assert torch.all((dec.mean(0) - v[0]).abs() <= 5 * se + 1e-12)
    assert float(((dec - v) ** 2).sum(1).mean()) <= 1.05 * comp.omega(5) * float((v ** 2).sum())


def test_contractive_form_of_rand_k_is_unscaled_rand_k_with_alpha_k_over_d():
    v = _rows(4, 10)
    plain = _comp(name="rand_k", k=3)
    contr = _Stateless(contractive(build_nested("compressors", {"name": "rand_k", "k": 3})))
    a, _ = plain.compress(v, _ctx(range(4)))
    b, _ = contr.compress(v, _ctx(range(4)))
    torch.testing.assert_close(b, a * 3 / 10, rtol=0, atol=1e-15)
    assert contr.omega is None and contr.alpha(10) == pytest.approx(0.3)
    assert set(torch.nonzero(b[0]).flatten().tolist()) <= set(range(10))
    torch.testing.assert_close(b[b != 0], v[b != 0])


@pytest.mark.parametrize("cfg,bits", [
    ({"name": "identity"}, 64 * 1000),
    ({"name": "top_k", "ratio": 0.01}, 10 * (64 + 10)),
    ({"name": "rand_k", "k": 10}, 10 * (64 + 10)),
    ({"name": "rand_k", "k": 10, "shared_seed": True}, 10 * 64),
    ({"name": "qsgd", "levels": 15}, 64 + 1000 * (1 + 4)),
    ({"name": "qsgd", "levels": 16}, 64 + 1000 * (1 + 5)),
    ({"name": "natural"}, (1 + 11) * 1000),
    ({"name": "chain", "stages": [{"name": "top_k", "k": 10}, {"name": "qsgd", "levels": 3}]},
     10 * 10 + 64 + 10 * (1 + 2)),
    ({"name": "chain", "stages": [{"name": "top_k", "k": 10}, {"name": "rand_k", "k": 4}]},
     4 * (64 + 10)),
])
def test_encodings_count_what_a_real_encoding_sends(cfg, bits):
    """float64 rows of d = 1000: values at 64 bits, indices at ceil(log2 1000) = 10 bits."""
    _, b = _comp(**cfg).compress(_rows(3, 1000), _ctx([4, 5, 6]))
    assert b.tolist() == [float(bits)] * 3


def test_float32_rows_count_32_bit_values_and_8_bit_exponents():
    v = _rows(2, 100).float()
    assert _comp(name="top_k", k=5).compress(v, _ctx([0, 1]))[1].tolist() == [5 * (32 + 7)] * 2
    assert _comp(name="natural").compress(v, _ctx([0, 1]))[1].tolist() == [9 * 100] * 2


def test_chain_runs_later_stages_on_the_kept_values():
    # Prepare
    v = _rows(6, 40)
    top = _comp(name="top_k", k=5)
    chained = _comp(name="chain", stages=[{"name": "top_k", "k": 5}, {"name": "qsgd", "levels": 4}])
    # Execute
    t, _ = top.compress(v, _ctx(range(6)))
    c, _ = chained.compress(v, _ctx(range(6)))
    # Assert: same support; per row qsgd keeps ||.|| of the kept values as its scale
    assert torch.equal(c != 0, (t != 0) & (c != 0)) and torch.all((c != 0).sum(1) >= 1)
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    levels = (c.abs() / norms * 4)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-12)
    assert chained.alpha(40) == pytest.approx(5 / 40 * 1 / (1 + min(5 / 16, math.sqrt(5) / 4)))


@pytest.mark.parametrize("name", ["rand_k", "qsgd", "natural"])
def test_draws_are_keyed_by_seed_round_client_and_not_by_chunking(name):
    # Prepare
    cfg = {"name": name, "k": 4} if name == "rand_k" else {"name": name}
    comp, v = _comp(**cfg), _rows(10, 30)
    ids = list(range(20, 30))
    # Execute
    whole, _ = comp.compress(v, _ctx(ids, round=2, seed=5))
    parts = torch.cat([comp.compress(v[:3], _ctx(ids[:3], 2, 5))[0],
                       comp.compress(v[3:], _ctx(ids[3:], 2, 5))[0]])
    alone, _ = comp.compress(v[7:8], _ctx(ids[7:8], 2, 5))
    # Assert
    assert torch.equal(whole, parts) and torch.equal(whole[7:8], alone)
    assert torch.equal(whole, comp.compress(v, _ctx(ids, 2, 5))[0])
    assert not torch.equal(whole, comp.compress(v, _ctx(ids, 3, 5))[0])
    assert not torch.equal(whole, comp.compress(v, _ctx(ids, 2, 6))[0])
    assert not torch.equal(whole, comp.compress(v, _ctx([i + 1 for i in ids], 2, 5))[0])


@pytest.mark.parametrize("cfg,key", [
    ({"name": "top_k"}, "ratio"),
    ({"name": "top_k", "ratio": 0.5, "k": 3}, "ratio"),
    ({"name": "top_k", "ratio": 1.5}, "ratio"),
    ({"name": "qsgd", "bits": 3}, "bits"),
    ({"name": "nope"}, "name"),
    ({"name": "chain", "stages": [{"name": "identity"}, {"name": "qsgd", "levels": 0}]}, "stages.1.levels"),
    ({"name": "ef21", "inner": {"name": "top_k", "k": 0}}, "inner.k"),
    ({"name": "ef21"}, "inner"),
    ({"name": "ef14", "inner": "top_k"}, "inner"),
])
def test_validation_errors_name_the_key_relative_to_the_compressor(cfg, key):
    with pytest.raises(ConfigError) as err:
        build_nested("compressors", cfg)
    assert err.value.key == key


def test_compressors_describe_themselves_for_the_resolved_scenario():
    from fedsim.registry import plain

    comp = ef21(inner=top_k(ratio=0.25))
    assert plain(comp) == {"name": "ef21", "inner": {"name": "top_k", "ratio": 0.25, "k": None},
                           "init": "dense"}
    again = build_nested("compressors", plain(comp))
    assert plain(again) == plain(comp)


def test_cli_lists_compressors(capsys):
    code, out, _ = run_cli(["list", "compressors"], capsys)
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()} >= {"identity", "top_k", "rand_k", "qsgd",
                                                               "natural", "chain"}


def test_uplink_identity_leaves_fedavg_unchanged_and_counts_the_dense_bytes():
    # Prepare: float64 quadratics, 6 clients, P = 5
    problem = testing.heterogeneous_quadratic(num_clients=6, dim=5, seed=1)
    # Execute
    plain = testing.run(fedavg(lr=0.1, local_steps=3), problem, rounds=5)
    wrapped = testing.run(compress_uplink(fedavg(lr=0.1, local_steps=3),
                                          build_nested("compressors", {"name": "identity"})),
                          problem, rounds=5)
    # Assert: same iterates, and the one byte rule: 5 rounds x 6 clients x 5 values x 8 bytes
    assert torch.equal(plain.state.server["x"], wrapped.state.server["x"])
    assert wrapped.state.bytes.up == plain.state.bytes.up == 5 * 6 * 5 * 8


def test_uplink_error_feedback_keeps_what_was_not_sent():
    """e_i^{t+1} = e_i^t + Delta_i - C(e_i^t + Delta_i), and sent + kept == Delta summed over rounds."""
    # Prepare: one client, two rounds, top-1 of 3 coordinates, FedAvg with one local step
    problem = testing.QuadraticProblem([[1.0, 2.0, 4.0]], [[1.0, -1.0, 0.5]])
    strat = compress_uplink(fedavg(lr=0.1, local_steps=1), ef14(inner=top_k(k=1)))
    # Execute
    loop = testing.run(strat, problem, rounds=2)
    # Assert: hand computation
    x0 = torch.zeros(3, dtype=torch.float64)
    h, c = problem.h[0], problem.c[0]
    p0 = -0.1 * h * (x0 - c)                     # (0.1, -0.2, 0.2): top-1 sends index 1 (tie -> lowest)
    sent0 = torch.tensor([0.0, -0.2, 0.0], dtype=torch.float64)
    x1 = x0 + sent0
    p1 = -0.1 * h * (x1 - c) + (p0 - sent0)       # (0.2, -0.16, 0.4): sends index 2
    sent1 = torch.tensor([0.0, 0.0, float(p1[2])], dtype=torch.float64)
    torch.testing.assert_close(loop.state.server["x"], x1 + sent1, rtol=0, atol=1e-15)
    # one float64 value + a 2-bit index per round: ceil(66 / 8) = 9 bytes
    assert loop.state.bytes.per_round == [(9, 3 * 8)] * 2


def test_ef21_wrapper_tracks_the_messages_on_both_sides():
    """ef21(identity): c_i = v_i - g_i, g_i <- v_i; receiver g <- g + sum c (the reduced sum)."""
    # Prepare
    comp = ef21(inner=build_nested("compressors", {"name": "identity"}), init="compressed")
    v1, v2 = _rows(2, 4), _rows(2, 4, seed=1)
    st = comp.init(torch.zeros(2, 4, dtype=torch.float64))
    recv = comp.init_receiver(torch.zeros(4, dtype=torch.float64))
    # Execute
    c1, _, st = comp.compress(v1, st, _ctx([0, 1]))
    est1, recv = comp.receive(c1.sum(0), recv)
    c2, _, st = comp.compress(v2, st, _ctx([0, 1], round=1))
    est2, recv = comp.receive(c2.sum(0), recv)
    # Assert
    torch.testing.assert_close(c2, v2 - v1, rtol=0, atol=1e-15)
    torch.testing.assert_close(st["g"], v2, rtol=0, atol=1e-15)
    torch.testing.assert_close(est1, v1.sum(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(est2, v2.sum(0), rtol=0, atol=1e-14)


def test_choco_refuses_a_stateful_compressor():
    from strategies.choco import choco

    with pytest.raises(ValueError, match="stateless"):
        choco(compressor=ef14(inner=top_k(k=1)))


def test_fedavg_with_top_k_uplink_runs_from_a_scenario(tmp_path, capsys):
    from tests.conftest import read_metrics, small_scenario, write_scenario

    comp = {"name": "ef14", "inner": {"name": "top_k", "ratio": 0.1}}
    dense = write_scenario(tmp_path, small_scenario(rounds=2), "dense.yaml")
    sparse = write_scenario(tmp_path, small_scenario(rounds=2, strategy={"compressor": comp}), "topk.yaml")
    out = []
    for path in (dense, sparse):
        code, stdout, _ = run_cli(["run", path, "--quiet", "--out", str(tmp_path / "runs")], capsys)
        assert code == 0
        out.append(read_metrics(stdout.strip().splitlines()[-1])[-1]["bytes_up"])
    assert out[1] < 0.2 * out[0]
