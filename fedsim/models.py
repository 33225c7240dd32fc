"""Models: factories of `torch.nn.Module`, and their flat-parameter, client-stacked execution.

Every model is an ordinary `nn.Module` (so it can be exported, inspected and used in Flower).
For training many clients at once the engine never instantiates one module per client: the
parameters of m clients live in one flat tensor [m, P] and `StackedModel.forward` runs all m
models in one pass. Sequential models built from Linear / Conv2d / pooling / activation layers
are compiled to batched matmuls (`baddbmm`) and grouped convolutions; any other module runs
through `torch.func.vmap(functional_call)`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedsim import rng
from fedsim.errors import ConfigError
from fedsim.registry import Registry

MODELS = Registry("models", builtins=("fedsim.models",), reserved=("input_shape", "num_classes"))

_ACTS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                                              "gelu": nn.GELU}


@MODELS.register("logreg")
def logreg(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input (convex)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@MODELS.register("mlp")
def mlp(*, input_shape: tuple[int, ...], num_classes: int,
        hidden: list[Annotated[int, Field(gt=0)]] = [64],  # noqa: B006 - validated copy
        activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu") -> nn.Module:
    """Multi-layer perceptron: input -> hidden sizes -> classes, with one activation kind."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("cnn")
def cnn(*, input_shape: tuple[int, ...], num_classes: int,
        channels: list[Annotated[int, Field(gt=0)]] = [16, 32],  # noqa: B006
        hidden: Annotated[int, Field(ge=0)] = 64, kernel: Annotated[int, Field(gt=0)] = 3) -> nn.Module:
    """Small CNN for images [C, H, W]: (conv-relu-maxpool2) per channel entry, then an MLP head."""
    if len(input_shape) != 3:
        raise ConfigError("cnn needs image data [C, H, W]; use a dataset with flatten: false",
                          key="kind", value=list(input_shape))
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel, padding=kernel // 2), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers.append(nn.Flatten())
    width = c * h * w
    if hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_model(kind: str, params: dict[str, Any], *, input_shape: tuple[int, ...],
                num_classes: int) -> nn.Module:
    """Model from the registry, or any nn.Module class / factory by dotted path."""
    factory = MODELS.get(kind)
    if kind in MODELS.names():
        return MODELS.build(kind, params, input_shape=tuple(input_shape), num_classes=num_classes)
    sig = inspect.signature(factory)
    runtime = {k: v for k, v in (("input_shape", tuple(input_shape)), ("num_classes", num_classes))
               if k in sig.parameters}
    try:
        module = factory(**params, **runtime)
    except TypeError as exc:
        raise ConfigError(f"cannot build model {kind}: {exc}", key="kind", value=kind) from None
    if not isinstance(module, nn.Module):
        raise ConfigError("dotted-path model must return a torch.nn.Module", key="kind", value=kind)
    return module


@dataclass(frozen=True)
class ParamSpec:
    """Where each named parameter of a module lives in the flat vector [P]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @staticmethod
    def of(module: nn.Module) -> ParamSpec:
        names, shapes, offsets, off = [], [], [], 0
        for name, p in module.named_parameters():
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(off)
            off += p.numel()
        for name, b in module.named_buffers():
            if b.is_floating_point():
                raise ConfigError(f"models with float buffers (e.g. BatchNorm running stats: {name}) "
                                  "cannot be multiplexed; use GroupNorm/LayerNorm", key="kind")
        return ParamSpec(tuple(names), tuple(shapes), tuple(offsets), off)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of x [..., P] shaped as the module's parameters (leading dims kept)."""
        lead = x.shape[:-1]
        return {n: x[..., o:o + math.prod(s)].view(*lead, *s)
                for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)}

    def segments(self) -> list[tuple[str, int, int]]:
        """(name, start, stop) of every parameter tensor in the flat vector."""
        return [(n, o, o + math.prod(s))
                for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)]


def init_params(module_factory: Callable[[], nn.Module], spec: ParamSpec, seed: int,
                ids: list[int] | None = None) -> torch.Tensor:
    """Initial flat parameters keyed by (seed, INIT[, id]): [P], or [len(ids), P] with one init per id.

    Uses the module's own initialisers under a private, keyed generator state (no global RNG
    is disturbed: `torch.random.fork_rng`).
    """
    def one(*key_ids: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.key(seed, rng.INIT, *key_ids) & ((1 << 63) - 1))
            return spec.flatten(module_factory())
    if ids is None:
        return one()
    return torch.stack([one(i) for i in ids])


class StackedModel:
    """Runs m copies of one architecture, with parameters as rows of a flat [m, P] tensor."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.spec = ParamSpec.of(module)
        self._plan = _compile(module, self.spec)
        # MLPs and logistic regression run feature-major ([m, features, batch]): weight gradients
        # come out in parameter layout and the loss reduces over a contiguous class axis.
        self._feature_major = self._plan is not None and all(
            op in ("linear", "flatten", "act") for op, _ in self._plan)

    @property
    def compiled(self) -> bool:
        """True when the fast batched-matmul path is used (else vmap)."""
        return self._plan is not None

    def forward(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """x [m, P], inputs [m, B, *feature] -> logits [m, B, C]."""
        return self.forward_views(self.spec.unflatten(x), inputs)

    def forward_views(self, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """Like `forward`, with the parameters as named tensors [m, *shape] (e.g. autograd leaves).

        Taking gradients with respect to these per-tensor leaves and concatenating them is
        cheaper than differentiating through views of one flat tensor (no zero-filled
        full-size gradient per view).
        """
        if self._plan is not None:
            return _run_plan(self._plan, params, inputs)
        return self._vmap_forward(params, inputs)

    def logits_class_first(self, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """Logits [m, C, B] (the layout `F.cross_entropy` reduces fastest) of inputs [m, B, *feature]."""
        if self._feature_major:
            assert self._plan is not None
            return _run_plan_feature_major(self._plan, params, inputs)
        return self.forward_views(params, inputs).transpose(1, 2)

    def forward_shared(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """x [m, P], inputs [B, *feature] shared by all m models -> logits [m, B, C]."""
        return self.forward(x, inputs.unsqueeze(0).expand(x.shape[0], *inputs.shape))

    def _vmap_forward(self, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        def f(p: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            return functional_call(self.module, p, (inp,))
        return vmap(f)(params, inputs)


# ---- compiled plans for Sequential models -----------------------------------------------------

def _leaves(module: nn.Module) -> list[nn.Module] | None:
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for child in module:
            sub = _leaves(child)
            if sub is None:
                return None
            out += sub
        return out
    return [module]


_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.Identity, nn.ELU, nn.SiLU)


def _compile(module: nn.Module, spec: ParamSpec) -> list[tuple[str, Any]] | None:
    leaves = _leaves(module)
    if leaves is None:
        return None
    offset = set(spec.names)
    by_module = {}
    for name, mod in module.named_modules():
        by_module[id(mod)] = name
    plan: list[tuple[str, Any]] = []
    for leaf in leaves:
        prefix = by_module[id(leaf)]
        pre = f"{prefix}." if prefix else ""
        if isinstance(leaf, nn.Linear):
            plan.append(("linear", (pre + "weight", _opt(offset, pre + "bias"))))
        elif isinstance(leaf, nn.Conv2d) and leaf.groups == 1 and leaf.padding_mode == "zeros":
            plan.append(("conv", (pre + "weight", _opt(offset, pre + "bias"),
                                  leaf.stride, leaf.padding, leaf.dilation)))
        elif isinstance(leaf, nn.Flatten) and leaf.start_dim == 1 and leaf.end_dim == -1:
            plan.append(("flatten", None))
        elif isinstance(leaf, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            plan.append(("pool", leaf))
        elif isinstance(leaf, _ELEMENTWISE) or (isinstance(leaf, nn.Dropout) and leaf.p == 0):
            plan.append(("act", leaf))
        else:
            return None
    return plan


def _opt(names: set[str], name: str) -> str | None:
    return name if name in names else None


def _run_plan(plan: list[tuple[str, Any]], x: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    m, b = h.shape[0], h.shape[1]
    for op, arg in plan:
        if op == "linear":
            w = x[arg[0]]  # [m, out, in]
            if h.dim() != 3:
                h = h.reshape(m, b, -1)
            if arg[1] is not None:
                h = torch.baddbmm(x[arg[1]].unsqueeze(1), h, w.transpose(1, 2))
            else:
                h = torch.bmm(h, w.transpose(1, 2))
        elif op == "conv":
            (wo, bo, stride, padding, dilation) = arg
            w = x[wo]  # [m, out, in, k, k]
            c_in, hh, ww = h.shape[2], h.shape[3], h.shape[4]
            hb = h.transpose(0, 1).reshape(b, m * c_in, hh, ww)
            bias = x[bo].reshape(-1) if bo is not None else None
            out = F.conv2d(hb, w.reshape(-1, *w.shape[2:]), bias, stride, padding, dilation, groups=m)
            h = out.reshape(b, m, -1, out.shape[-2], out.shape[-1]).transpose(0, 1)
        elif op == "flatten":
            h = h.reshape(m, b, -1)
        elif op == "pool":
            shape = h.shape
            out = arg(h.reshape(m * b, *shape[2:]))
            h = out.reshape(m, b, *out.shape[1:])
        else:
            h = arg(h)
    return h


def _run_plan_feature_major(plan: list[tuple[str, Any]], x: dict[str, torch.Tensor],
                            inputs: torch.Tensor) -> torch.Tensor:
    """Linear/activation plans on activations [m, features, B]; returns logits [m, C, B]."""
    m, b = inputs.shape[0], inputs.shape[1]
    h = inputs.reshape(m, b, -1).transpose(1, 2)
    for op, arg in plan:
        if op == "linear":
            w = x[arg[0]]  # [m, out, in]
            h = torch.baddbmm(x[arg[1]].unsqueeze(2), w, h) if arg[1] is not None else torch.bmm(w, h)
        elif op == "act":
            h = arg(h)
    return h
