"""The multiplex engine on CUDA: plans, chunking invariance and agreement with the CPU.

Marked `cuda`; skipped (with the reason) where no GPU is present, as in CI.
"""

from __future__ import annotations

import pytest
import torch

from tests.plan_support import run_problem, run_scenario, strip, token_problem

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU on this machine (these tests run where one is)")]
IMAGE = {"data": {"dataset": "digits", "clients": 8, "flatten": False, "partition": {"kind": "iid"}},
         "model": {"kind": "cnn", "channels": [3, 4], "hidden": 8}}


@pytest.mark.parametrize("over", [{}, IMAGE], ids=["mlp", "cnn"])
def test_chunking_invariance_and_cpu_agreement_on_cuda(over):
    cpu_x, cpu_h, _ = run_scenario("loop", None, **over)
    ref_x, ref_h, loop = run_scenario("auto", None, device="cuda", **over)
    assert loop.problem.plan.device.startswith("cuda") and loop.problem.plan.peak_bytes > 0
    torch.testing.assert_close(ref_x.cpu(), cpu_x, rtol=0, atol=1e-9)
    for plan, block, chunk in (("auto", None, 1), ("auto", None, 3), ("stacked", 2, None),
                               ("vmap", None, None), ("loop", None, 3)):
        x, hist, _ = run_scenario(plan, block, chunk, device="cuda", **over)
        torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-10)
        assert [m["bytes_up"] for m in strip(hist)] == [m["bytes_up"] for m in strip(ref_h)]


def test_cost_model_on_cuda_fills_the_memory_budget():
    from fedsim.plan import choose_plan

    _, _, loop = run_scenario("auto", None, device="cuda", rounds=1)
    plan = choose_plan(loop.problem)
    assert (plan.kind, plan.block) == ("stacked", 8)  # every client in one pass (memory permitting)


@pytest.mark.parametrize("kind,params", [("char-lstm", {"embed": 3, "hidden": 6}),
                                         ("transformer", {"layers": 2, "d_model": 8, "heads": 2})])
def test_token_models_on_cuda_equal_cpu(kind, params):
    cpu, x0 = token_problem(kind, params)
    ref_x, _ = run_problem(cpu, x0, "loop", None)
    gpu, x0g = token_problem(kind, params, device="cuda")
    for plan in ("stacked", "vmap", "loop"):
        x, _ = run_problem(gpu, x0g, plan, None)
        torch.testing.assert_close(x.cpu(), ref_x, rtol=0, atol=1e-9)
