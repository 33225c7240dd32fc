"""Stacked models: the compiled batched path equals per-client modules; dotted-path models."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from fedsim.errors import ConfigError
from fedsim.models import StackedModel, build_model, init_params
from tests.conftest import run_cli, small_scenario, write_scenario
from tests.fixtures.models import TwoLayer


@pytest.mark.parametrize("kind,params,shape", [
    ("logreg", {}, (64,)), ("mlp", {"hidden": [16, 8], "activation": "tanh"}, (64,)),
    ("cnn", {"channels": [4, 6], "hidden": 12}, (1, 8, 8))])
def test_compiled_forward_equals_per_client_modules(kind, params, shape):
    make = lambda: build_model(kind, params, input_shape=shape, num_classes=10).double()  # noqa: E731
    sm = StackedModel(make())
    assert sm.compiled
    x = init_params(make, sm.spec, seed=1, ids=[0, 1, 2])
    inputs = torch.randn(3, 5, *shape, dtype=torch.float64)
    ref = torch.stack([functional_call(sm.module, sm.spec.unflatten(x[i]), (inputs[i],)) for i in range(3)])
    torch.testing.assert_close(sm.forward(x, inputs), ref, rtol=0, atol=1e-12)
    assert not torch.equal(x[0], x[1]), "independent inits must differ"


def test_non_sequential_module_folds_and_vmaps_and_matches():
    make = lambda: TwoLayer((6,), 3).double()  # noqa: E731
    sm = StackedModel(make())
    assert sm.compiled  # its layers are Linear: the client-folded plan applies
    x = init_params(make, sm.spec, seed=0, ids=[4, 5])
    inputs = torch.randn(2, 7, 6, dtype=torch.float64)
    ref = torch.stack([functional_call(sm.module, sm.spec.unflatten(x[i]), (inputs[i],)) for i in range(2)])
    for kind in ("stacked", "vmap", "loop"):
        torch.testing.assert_close(sm.forward(x, inputs, kind), ref, rtol=0, atol=1e-12)


def test_init_is_keyed_and_leaves_global_rng_alone():
    make = lambda: build_model("mlp", {}, input_shape=(4,), num_classes=2)  # noqa: E731
    spec = StackedModel(make()).spec
    state = torch.random.get_rng_state()
    a, b = init_params(make, spec, seed=7), init_params(make, spec, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, init_params(make, spec, seed=8))
    assert torch.equal(state, torch.random.get_rng_state())


def test_dotted_path_model_runs_end_to_end(tmp_path, capsys):
    sc = small_scenario(model={"kind": "tests.fixtures.models:TwoLayer", "width": 5})
    code, out, err = run_cli(["run", write_scenario(tmp_path, sc), "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0, err


def test_batchnorm_is_rejected_clearly():
    with pytest.raises(ConfigError, match="BatchNorm|running"):
        StackedModel(build_model("tests.fixtures.models:with_batchnorm", {}, input_shape=(3,),
                                 num_classes=2))
