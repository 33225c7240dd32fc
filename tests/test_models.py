"""Stacked models: every kind of execution equals a per-client loop of the plain module.

Checked in float64 for m = 3 clients with different weights: the logits AND the gradients of
a per-client loss with respect to every client's flat parameters, for every built-in model and
for user modules with recurrent layers, seq-first layouts, bidirectional cells and h0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedsim.errors import ConfigError
from fedsim.models import KINDS, MODELS, StackedModel, build_model, init_params
from fedsim.models.recurrent import FunctionalRNN
from tests.conftest import run_cli, small_scenario, write_scenario
from tests.fixtures.models import TwoLayer

BUILTIN = [  # kind, params, input shape, token inputs?
    ("logreg", {}, (12,), False),
    ("mlp", {"hidden": [16, 8], "activation": "tanh"}, (12,), False),
    ("cnn", {"channels": [4, 6], "hidden": 12}, (1, 8, 8), False),
    ("femnist-cnn", {}, (1, 12, 12), False),
    ("cifar-cnn", {}, (3, 8, 8), False),
    ("resnet", {"depth": 8, "width": 4}, (3, 8, 8), False),
    ("char-lstm", {"embed": 3, "hidden": 7, "layers": 2, "vocab": 10}, (9,), True),
    ("char-gru", {"embed": 3, "hidden": 7, "layers": 2, "vocab": 10}, (9,), True),
    ("transformer", {"layers": 2, "d_model": 8, "heads": 2, "context": 12, "vocab": 10}, (9,), True),
]


def _inputs(shape: tuple[int, ...], tokens: bool, m: int = 3, b: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    if tokens:
        return torch.randint(0, 10, (m, b, *shape), generator=gen)
    return torch.randn(m, b, *shape, generator=gen, dtype=torch.float64)


def _reference(module: nn.Module, x: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor):
    """Logits [m, B, C] and d(sum_i loss_i)/dx [m, P] from one plain module call per client."""
    sm_spec = StackedModel(module).spec
    outs, grads = [], []
    for i in range(x.shape[0]):
        xi = x[i].clone().requires_grad_(True)
        out = functional_call(module, sm_spec.unflatten(xi), (inputs[i],))
        loss = nn.functional.cross_entropy(out, labels[i])
        grads.append(torch.autograd.grad(loss, xi)[0])
        outs.append(out.detach())
    return torch.stack(outs), torch.stack(grads)


def _check_all_kinds(make, inputs: torch.Tensor, expect: tuple[str, ...] = KINDS) -> StackedModel:
    sm = StackedModel(make())
    x = init_params(make, sm.spec, seed=1, ids=[0, 1, 2])
    assert not torch.equal(x[0], x[1]), "clients must have different weights"
    labels = torch.randint(0, 3, inputs.shape[:2], generator=torch.Generator().manual_seed(2))
    ref_out, ref_grad = _reference(sm.module, x, inputs, labels)
    status = sm.status(inputs)
    assert [k for k in KINDS if status[k] == ""] == list(expect), status
    for kind in expect:
        xx = x.clone().requires_grad_(True)
        out = sm.forward(xx, inputs, kind)
        loss = nn.functional.cross_entropy(out.transpose(1, 2), labels, reduction="none").mean(1).sum()
        grad = torch.autograd.grad(loss, xx)[0]
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12, msg=f"{kind} logits")
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12, msg=f"{kind} gradients")
    return sm


@pytest.mark.parametrize("kind,params,shape,tokens", BUILTIN, ids=[c[0] for c in BUILTIN])
def test_every_builtin_model_stacked_equals_vmap_equals_per_client_loop(kind, params, shape, tokens):
    make = lambda: build_model(kind, params, input_shape=shape, num_classes=3).double()  # noqa: E731
    sm = _check_all_kinds(make, _inputs(shape, tokens))
    assert sm.compiled


def test_every_registered_kind_is_covered():
    assert {c[0] for c in BUILTIN} == set(MODELS.names())


@pytest.mark.parametrize("name", ["SeqLSTM", "SeqFirstGRU", "BiRNN", "TwoLayer"])
def test_user_recurrent_modules_compile_to_the_stacked_plan(name):
    """nn.LSTM / nn.GRU / nn.RNN inside a user's module: batched cells, not a vmap crash."""
    make = lambda: build_model(f"tests.fixtures.models:{name}", {}, input_shape=(12,),  # noqa: E731
                               num_classes=3).double()
    _check_all_kinds(make, _inputs((12,), False))


def test_token_conv_with_padding_idx_and_grouped_conv1d():
    make = lambda: build_model("tests.fixtures.models:TokenConv", {}, input_shape=(7,),  # noqa: E731
                               num_classes=3).double()
    inputs = _inputs((7,), True)
    inputs[:, :, :2] = 0  # padding positions: their embedding row gets no gradient
    sm = _check_all_kinds(make, inputs, expect=("stacked", "loop"))
    assert "padding_idx" in sm.status(inputs)["vmap"]  # torch.func.vmap's backward gets it wrong
    x = init_params(make, sm.spec, seed=1, ids=[0, 1, 2]).requires_grad_(True)
    (g,) = torch.autograd.grad(sm.forward(x, inputs, "stacked").sum(), x)
    assert torch.all(sm.spec.unflatten(g)["embed.weight"][:, 0] == 0)


def test_plain_vmap_of_an_lstm_is_what_crashes():
    """The failure the stacked cells replace (so the test above is not vacuous)."""
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    params = {k: torch.stack([v.detach()] * 2) for k, v in lstm.named_parameters()}
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        torch.func.vmap(lambda p, x: functional_call(lstm, p, (x,))[0])(params, torch.randn(2, 5, 6, 3,
                                                                                             dtype=torch.float64))


@pytest.mark.parametrize("cell,kw", [(nn.LSTM, {"num_layers": 2}), (nn.GRU, {"bidirectional": True}),
                                     (nn.RNN, {"nonlinearity": "tanh", "batch_first": True}),
                                     (nn.LSTM, {"bidirectional": True, "num_layers": 2, "bias": False})])
def test_functional_cells_equal_torch_recurrent_modules(cell, kw):
    """FunctionalRNN (plain ops) reproduces torch's fused module: outputs and final states, with h0."""
    torch.manual_seed(0)
    mod = cell(3, 5, **kw).double()
    fn = FunctionalRNN(mod)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    d = (2 if mod.bidirectional else 1) * mod.num_layers
    h0 = torch.randn(d, 4 if mod.batch_first else 6, 5, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if cell is nn.LSTM else h0
    for args in ((x,), (x, hx)):
        ref, got = mod(*args), fn(*args)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
        pairs = zip(got[1] if cell is nn.LSTM else (got[1],), ref[1] if cell is nn.LSTM else (ref[1],),
                    strict=True)
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,reason", [("MixesBatch", "differ"), ("SharedPosition", "batch axis"),
                                         ("with_prelu", "PReLU")])
def test_modules_without_a_folded_form_fall_back_to_vmap(name, reason):
    make = lambda: build_model(f"tests.fixtures.models:{name}", {}, input_shape=(12,),  # noqa: E731
                               num_classes=3).double()
    sm = _check_all_kinds(make, _inputs((12,), False), expect=("vmap", "loop"))
    assert reason in sm.status(_inputs((12,), False))["stacked"]
    assert sm.resolve(None, _inputs((12,), False)) == "vmap"
    with pytest.raises(ConfigError, match="engine.plan.*stacked") as err:
        sm.resolve("stacked", _inputs((12,), False))
    assert "vmap, loop" in str(err.value)


@pytest.mark.parametrize("factory,match", [
    ("with_batchnorm", r"layer '1' \(BatchNorm1d\).*GroupNorm"),
    ("nested_batchnorm", r"layer '0\.1' \(BatchNorm1d\).*GroupNorm"),
    ("with_dropout", r"layer '1' \(Dropout\) has p=0\.5.*p=0"),
    ("UpdatesBuffer", r"buffer 'running'.*GroupNorm")])
def test_unsupported_layers_fail_at_setup_naming_the_layer_and_alternatives(factory, match):
    module = build_model(f"tests.fixtures.models:{factory}", {}, input_shape=(3,), num_classes=2)
    with pytest.raises(ConfigError, match=match):
        StackedModel(module).status(torch.randn(1, 2, 3))


def test_batchnorm_scenario_exits_2_naming_model_kind(tmp_path, capsys):
    sc = small_scenario(model={"kind": "tests.fixtures.models:with_batchnorm"})
    code, _, err = run_cli(["run", write_scenario(tmp_path, sc), "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and "model.kind" in err and "BatchNorm1d" in err and "GroupNorm" in err


def test_paper_parameter_counts():
    """McMahan et al. 2017's CNN has 1,663,370 parameters on MNIST; LEAF's models by hand."""
    count = lambda kind, shape, c, **kw: sum(p.numel() for p in build_model(  # noqa: E731
        kind, kw, input_shape=shape, num_classes=c).parameters())
    assert count("cifar-cnn", (1, 28, 28), 10) == 1_663_370
    assert count("cifar-cnn", (3, 32, 32), 10) == 2_156_490
    # conv 1*32*25+32, conv 32*64*25+64, fc 3136*2048+2048, fc 2048*62+62
    assert count("femnist-cnn", (1, 28, 28), 62) == 832 + 51_264 + 6_424_576 + 127_038
    # embedding 80*8; LSTM 4*256*(8+256) + 2*4*256; 4*256*(256+256) + 2*4*256; linear 256*80+80
    assert count("char-lstm", (80,), 80) == 640 + 272_384 + 526_336 + 20_560
    gru = 640 + 3 * 256 * 264 + 6 * 256 + 3 * 256 * 512 + 6 * 256 + 20_560
    assert count("char-gru", (80,), 80) == gru


@pytest.mark.parametrize("depth", [8, 20])
def test_resnet_depth_counts_weighted_layers(depth):
    """6n+2: the main-path 3x3 convolutions plus the final linear layer (1x1 shortcuts aside)."""
    net = build_model("resnet", {"depth": depth}, input_shape=(3, 32, 32), num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("kind,params,shape,key", [
    ("resnet", {"depth": 9}, (3, 8, 8), "depth"), ("transformer", {"d_model": 10, "heads": 4}, (5,), "heads"),
    ("transformer", {"context": 3}, (5,), "context"), ("char-lstm", {}, (3, 8, 8), "kind"),
    ("femnist-cnn", {}, (64,), "kind")])
def test_bad_model_settings_are_config_errors(kind, params, shape, key):
    with pytest.raises(ConfigError) as err:
        build_model(kind, params, input_shape=shape, num_classes=4)
    assert err.value.key == key


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


def test_twolayer_fixture_is_not_a_sequential():
    assert not isinstance(TwoLayer((6,), 3), nn.Sequential)
