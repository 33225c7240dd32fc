"""Execution plans: results never depend on the plan; the cost model's choices; engine options."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedsim.config import parse_scenario
from fedsim.errors import ConfigError
from fedsim.oracle import BlockOracle
from fedsim.plan import CPU_CACHE_BYTES, ExecutionPlan, choose_plan
from fedsim.setup import build_setup
from tests.conftest import run_cli, small_scenario, write_scenario
from tests.plan_support import run_problem, run_scenario, strip, token_problem

PLANS = [("stacked", None), ("stacked", 1), ("stacked", 3), ("vmap", 2), ("vmap", None), ("loop", None),
         ("auto", None)]
IMAGE = {"data": {"dataset": "digits", "clients": 8, "flatten": False, "partition": {"kind": "iid"}},
         "model": {"kind": "cnn", "channels": [3, 4], "hidden": 8}}
SCENARIOS = {
    "mlp": {},
    "cnn": IMAGE,
    "resnet": {**IMAGE, "model": {"kind": "resnet", "depth": 8, "width": 4}, "rounds": 1},
    "user-lstm": {"model": {"kind": "tests.fixtures.models:SeqLSTM"}, "rounds": 1},
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_plan_gives_the_same_run(name):
    """Final model and every metrics line agree across plans and chunkings (float64)."""
    ref_x, ref_h, _ = run_scenario("loop", None, **SCENARIOS[name])
    for plan, block in PLANS:
        for chunk in (None, 3):
            x, hist, loop = run_scenario(plan, block, chunk, **SCENARIOS[name])
            assert loop.problem.plan.kind == (plan if plan != "auto" else loop.problem.plan.kind)
            torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-10, msg=f"{plan}:{block} chunk {chunk}")
            for a, b in zip(strip(hist), strip(ref_h), strict=True):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), (plan, block, chunk, k)


@pytest.mark.parametrize("kind,params", [
    ("char-lstm", {"embed": 3, "hidden": 6}), ("char-gru", {"embed": 3, "hidden": 6, "layers": 1}),
    ("transformer", {"layers": 2, "d_model": 8, "heads": 2})])
def test_token_models_train_the_same_under_every_plan(kind, params):
    """int64 token ids through ClientData, the oracle and evaluation; every plan agrees."""
    problem, x0 = token_problem(kind, params)
    assert problem.data.x.dtype == torch.int64 and problem.x_test.dtype == torch.int64
    ref_x, ref_h = run_problem(problem, x0, "loop", None)
    assert ref_h[-1]["test_accuracy"] is not None
    for plan, block in PLANS:
        x, hist = run_problem(problem, x0, plan, block, chunk=3 if block == 1 else None)
        torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-10, msg=f"{plan}:{block}")
        assert [m["train_loss"] for m in hist] == pytest.approx([m["train_loss"] for m in ref_h], rel=1e-10)


def test_oracle_blocks_split_the_chunk_without_changing_gradients():
    problem, x0 = token_problem("char-lstm", {"embed": 3, "hidden": 6})
    ids = torch.arange(6)
    x = x0 + 0.01 * torch.randn(6, x0.numel(), dtype=x0.dtype, generator=torch.Generator().manual_seed(1))
    ref = BlockOracle(problem.model, problem.data, ids, 2, 0, 4, ExecutionPlan("loop", 1, "t", "cpu"))(x, 1)
    for kind, block in (("stacked", 6), ("stacked", 4), ("stacked", 1), ("vmap", 5)):
        plan = ExecutionPlan(kind, block, "t", "cpu")
        got = BlockOracle(problem.model, problem.data, ids, 2, 0, 4, plan)(x, 1)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-12)


def _mlp_problem(**model):
    sc = small_scenario(model={"kind": "mlp", **model})
    return build_setup(parse_scenario(sc)).problem()


def test_cost_model_stacks_small_models_and_loops_over_large_ones():
    small = choose_plan(_mlp_problem(hidden=[16]))
    assert (small.kind, small.block, small.source) == ("stacked", 8, "cost model")  # all 8 clients
    big = choose_plan(_mlp_problem(hidden=[8192]))  # 60*8192 + 8192*10 weights: 4.5 MB in float64
    assert big.param_bytes > CPU_CACHE_BYTES // 2
    assert (big.kind, big.block) == ("loop", 1)
    mid = choose_plan(_mlp_problem(hidden=[2048]))  # 1.2 MB per client: 3 fit the 4 MiB budget
    assert mid.param_bytes == 8 * (60 * 2048 + 2048 + 2048 * 10 + 10)
    assert (mid.kind, mid.block) == ("stacked", CPU_CACHE_BYTES // mid.param_bytes) == ("stacked", 3)


def test_cpu_chunks_keep_parameter_rows_small():
    """The round loop's chunk is capped so [m, P] tensors stay under 16 MiB (a multiple of block)."""
    from fedsim.engines.loop import RoundLoop
    from fedsim.plan import CPU_ROW_BYTES

    sc = small_scenario(model={"kind": "mlp", "hidden": [2048]}, participation={"kind": "full"})
    loop = RoundLoop.from_setup(build_setup(parse_scenario(sc)), memory_mb=2048)
    plan = loop.problem.plan
    assert plan.chunk_cap == (CPU_ROW_BYTES // plan.param_bytes // plan.block) * plan.block == 12
    assert loop.chunk == 12  # memory alone would allow 2048 MB / (16 P * 8 B) = 115
    one = RoundLoop.from_setup(build_setup(parse_scenario(sc)), memory_mb=2048, plan="loop")
    assert one.problem.plan.chunk_cap == CPU_ROW_BYTES // plan.param_bytes == 14 == one.chunk


def test_cost_model_respects_the_memory_budget():
    problem = _mlp_problem(hidden=[64])
    plan = choose_plan(problem, memory_mb=1)
    per_client = plan.act_bytes + 4 * plan.param_bytes
    assert plan.block == max(1, 2**20 // 2 // per_client) < 8
    assert plan.block * per_client <= 2**20 // 2


def test_cost_model_is_deterministic_and_counts_flops_by_hand():
    problem = _mlp_problem(hidden=[16])
    a, b = choose_plan(problem), choose_plan(problem)
    assert a == b
    # batch 8: forward 2 B d h per layer; backward the weight gradient again, and the input
    # gradient for the second layer only (the data needs none)
    assert a.flops == 2 * (2 * 8 * 60 * 16) + 3 * (2 * 8 * 16 * 10)
    assert a.batch == 8 and a.param_bytes == 8 * (60 * 16 + 16 + 16 * 10 + 10)
    assert a.act_bytes > 0 and a.peak_bytes is None  # no CUDA here
    assert json.dumps(a.summary())  # JSON-ready for summary.json


def test_activation_bytes_grow_with_the_batch():
    small = choose_plan(build_setup(parse_scenario(small_scenario(strategy={"batch_size": 4}))).problem())
    large = choose_plan(build_setup(parse_scenario(small_scenario(strategy={"batch_size": 16}))).problem())
    assert 3.5 * small.act_bytes < large.act_bytes < 4.5 * small.act_bytes


def test_measure_times_candidates_and_takes_the_fastest():
    plan = choose_plan(_mlp_problem(hidden=[16]), "measure")
    names = [k for k, _ in plan.timings]
    assert plan.source == "measured" and f"{plan.kind}:{plan.block}" == names[0]
    assert "loop:1" in names and "stacked:1" in names
    assert [t for _, t in plan.timings] == sorted(t for _, t in plan.timings)


def test_explicit_plan_and_block():
    problem = _mlp_problem()
    assert (choose_plan(problem, "vmap", 3).kind, choose_plan(problem, "vmap", 3).block) == ("vmap", 3)
    assert choose_plan(problem, "loop", 5).block == 1  # a loop runs one client per pass
    with pytest.raises(ConfigError, match="engine.plan"):
        choose_plan(problem, "fastest")


def test_restricted_problem_keeps_the_plan():
    problem = _mlp_problem()
    plan = problem.choose_plan("vmap", 2)
    import numpy as np

    assert problem.restrict(np.array([1, 2])).plan is plan
    assert problem.memory_per_client() == 16 * problem.model.spec.size * 8


def test_token_ids_beyond_the_vocabulary_fail_at_setup():
    problem, _ = token_problem("char-lstm", {"embed": 3, "hidden": 6, "vocab": 5})
    with pytest.raises(ConfigError, match="token id 9.*embedding 'embed'") as err:
        problem.choose_plan()
    assert err.value.key == "model.vocab"


def test_plan_is_recorded_in_summary_and_overridable(tmp_path, capsys):
    sc = write_scenario(tmp_path, small_scenario(rounds=1))
    for plan, kind in (("auto", "stacked"), ("loop", "loop"), ("vmap", "vmap")):
        code, out, err = run_cli(["run", sc, "--quiet", "--out", str(tmp_path),
                                  "--set", f"engine.plan={plan}"],
                                 capsys)
        assert code == 0, err
        with open(os.path.join(out.strip().splitlines()[-1], "summary.json")) as fh:
            rec = json.load(fh)["plan"]
        assert rec["kind"] == kind and rec["source"] == ("cost model" if plan == "auto" else "engine option")
        assert rec["flops"] > 0 and rec["act_mb_per_client"] > 0


@pytest.mark.parametrize("sets,words", [
    (["engine.plan=fastest"], ["engine.plan", "fastest", "measure"]),
    (["engine.plan_block=0"], ["engine.plan_block", "0"]),
    (["engine.plan=stacked"], ["engine.plan", "PReLU", "vmap"])])
def test_bad_plan_options_exit_2(tmp_path, capsys, sets, words):
    model = {"kind": "tests.fixtures.models:with_prelu"}
    sc = write_scenario(tmp_path, small_scenario(rounds=1, model=model))
    args = ["run", sc, "--quiet", "--out", str(tmp_path)] + [a for s in sets for a in ("--set", s)]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    for w in words:
        assert w in err
