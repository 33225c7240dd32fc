"""`StackedModel`: m copies of one architecture, parameters as rows of a flat [m, P] tensor.

Three ways to run the m models (the *kinds* of an execution plan, see `fedsim.plan`):

- ``stacked``: a shadow of the module whose parameter-owning layers are client-folded
  (`fedsim.models.leaves`): one pass over the m*B samples with batched matmuls, grouped
  convolutions and batched recurrent cells. Sequential MLPs additionally run feature-major
  (activations [m, features, B]), the layout in which their weight gradients come out
  contiguous.
- ``vmap``: ``torch.func.vmap(functional_call)`` over the client axis, with nn.LSTM / nn.GRU /
  nn.RNN swapped for `FunctionalRNN` (aten::lstm has no batching rule).
- ``loop``: the plain module (native fused kernels) called once per client.

All three compute the same function; a probe at the first call with a new input shape checks
``stacked`` and ``vmap`` against ``loop`` on two clients with different weights, and a kind
that fails (or disagrees) is marked unavailable with its reason.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fedsim.errors import ConfigError
from fedsim.models.leaves import AmbiguousBatch, NoBatchAxis, Run, fold
from fedsim.models.recurrent import FunctionalRNN, rnn_mode
from fedsim.models.rewrite import pool_before_relu
from fedsim.models.spec import ParamSpec, check_supported

KINDS = ("stacked", "vmap", "loop")
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.Identity, nn.ELU, nn.SiLU)
Params = dict[str, torch.Tensor]


class StackedModel:
    """Runs m copies of `module`; `forward*` take a `kind` (None: the first available one)."""

    def __init__(self, module: nn.Module) -> None:
        check_supported(module)
        self.module = module
        self.spec = ParamSpec.of(module)
        self._run = Run()
        self._exec = pool_before_relu(module)  # what every kind runs: exact rewrites, shared layers
        self._shadow, self.fold_reason = fold(self._exec, self._run)
        self._fm = _feature_major_plan(module)
        self._vmap_module, self.vmap_reason = _vmappable(self._exec)
        # Per-client image batches run channels-last through conv nets: on CPU oneDNN's NHWC
        # max-pool backward skips NCHW's zero-filled index scatter (measured ~10-25 % per step).
        self._channels_last = any(isinstance(mod, nn.Conv2d) for mod in module.modules())
        self._status: dict[tuple, dict[str, str]] = {}
        self.device = next((p.device for p in module.parameters()), torch.device("cpu"))

    def _to(self, device: torch.device) -> None:
        """Move the modules (their buffers matter: functional_call uses them) to `device`."""
        mods = (self.module, self._exec, self._shadow, self._vmap_module)
        for mod in {id(m): m for m in mods if m is not None}.values():
            mod.to(device)
        self.device = device

    @property
    def compiled(self) -> bool:
        """True when the module has a client-folded (``stacked``) form."""
        return self._shadow is not None

    def status(self, inputs: torch.Tensor) -> dict[str, str]:
        """kind -> "" if it runs inputs like these [m, B, *feature] correctly, else the reason."""
        key = (tuple(inputs.shape[2:]), inputs.dtype, inputs.device.type)
        if inputs.device != self.device:
            self._to(inputs.device)
        if key not in self._status:
            self._status[key] = self._probe(tuple(inputs.shape[2:]), inputs.dtype, inputs.device)
        return self._status[key]

    def resolve(self, kind: str | None, inputs: torch.Tensor) -> str:
        """The kind to use: `kind` if it is available for these inputs, else an error; None picks."""
        status = self.status(inputs)
        if kind is None:
            return next(k for k in KINDS if status.get(k) == "")
        if status.get(kind) != "":
            raise ConfigError(f"execution plan '{kind}' cannot run this model: {status.get(kind)}",
                              key="engine.plan", value=kind,
                              allowed=", ".join(k for k in KINDS if status.get(k) == ""))
        return kind

    # ---- forward passes ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, inputs: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """x [m, P], inputs [m, B, *feature] -> logits [m, B, C]."""
        return self.forward_views(self.spec.unflatten(x), inputs, kind)

    def forward_views(self, params: Params, inputs: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """Like `forward`, with the parameters as named tensors [m, *shape] (e.g. autograd leaves).

        Taking gradients with respect to these per-tensor leaves and concatenating them is
        cheaper than differentiating through views of one flat tensor (no zero-filled
        full-size gradient per view).
        """
        kind = self.resolve(kind, inputs)
        if kind == "stacked":
            return self._stacked(params, inputs)
        if kind == "vmap":
            return self._vmap(params, inputs)
        return self._loop(params, inputs)

    def logits_class_first(self, params: Params, inputs: torch.Tensor, kind: str | None = None
                           ) -> torch.Tensor:
        """Logits [m, C, B] (the layout `F.cross_entropy` reduces fastest) of inputs [m, B, *feature]."""
        kind = self.resolve(kind, inputs)
        if kind == "stacked" and self._fm is not None and (self._fm[0] or inputs.dim() == 3):
            return _run_feature_major(self._fm[1], params, inputs)
        return self.forward_views(params, inputs, kind).transpose(1, 2)

    def forward_shared(self, x: torch.Tensor, inputs: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """x [m, P], inputs [B, *feature] shared by all m models -> logits [m, B, C]."""
        shared = inputs.unsqueeze(0).expand(x.shape[0], *inputs.shape)
        if self.resolve(kind, shared) == "loop":
            params, inp = self.spec.unflatten(x), self._layout(inputs)
            return torch.stack([functional_call(self._exec, {k: v[i] for k, v in params.items()},
                                                (inp,)) for i in range(x.shape[0])])
        return self.forward(x, shared, kind)

    def _stacked(self, params: Params, inputs: torch.Tensor) -> torch.Tensor:
        m, b = inputs.shape[0], inputs.shape[1]
        self._run.params, self._run.m = params, m
        assert self._shadow is not None  # resolve() offers "stacked" only with a folded form
        try:
            out = self._shadow(inputs.reshape(m * b, *inputs.shape[2:]))
        finally:
            self._run.params = {}
        return out.view(m, b, *out.shape[1:])

    def _vmap(self, params: Params, inputs: torch.Tensor) -> torch.Tensor:
        from torch.func import vmap

        def one(p: Params, inp: torch.Tensor) -> torch.Tensor:
            return functional_call(self._vmap_module, p, (inp,))
        return vmap(one)(params, inputs)

    def _loop(self, params: Params, inputs: torch.Tensor) -> torch.Tensor:
        m = inputs.shape[0]
        if m == 1:  # a view, not a select: select's backward zero-fills a full [1, *shape] gradient
            one = {k: v.view(v.shape[1:]) for k, v in params.items()}
            return functional_call(self._exec, one, (self._layout(inputs[0]),)).unsqueeze(0)
        return torch.stack([functional_call(self._exec, {k: v[i] for k, v in params.items()},
                                            (self._layout(inputs[i]),)) for i in range(m)])

    def _layout(self, batch: torch.Tensor) -> torch.Tensor:
        """One client's batch [B, *feature] in the memory format its layers run fastest in."""
        if self._channels_last and batch.dim() == 4:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    # ---- the probe ---------------------------------------------------------------------------
    def _probe(self, feature: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, str]:
        """Run every kind on 2 clients with different weights; compare logits and gradients with
        ``loop``'s. kind -> "" (agrees) or why not."""
        gen = torch.Generator().manual_seed(0)
        base = self.spec.flatten(self.module).cpu()  # noise from a CPU generator, then moved
        x = torch.stack([base * (1 + 0.1 * torch.randn(base.shape, generator=gen, dtype=base.dtype))
                         for _ in range(2)]).to(device)
        buffers = {k: v.clone() for k, v in self.module.named_buffers()}
        status = {"stacked": self.fold_reason or "no probe batch size avoided every other axis size",
                  "vmap": self.vmap_reason or "", "loop": ""}
        with torch.enable_grad():
            for b in (5, 7, 11, 13, 17):
                inputs = _sample_inputs(self.module, 2, b, feature, dtype, device, gen)
                ref = self._reference(x, inputs, gen)
                try:
                    if self._shadow is not None:
                        self._run.probe_n = 2 * b
                        got = _with_grad(self._stacked, x, inputs, self.spec, ref[2])
                        status["stacked"] = _agree(got, ref)
                except AmbiguousBatch:
                    continue
                except (NoBatchAxis, RuntimeError, ValueError, TypeError, IndexError) as exc:
                    status["stacked"] = f"client-folded execution failed: {_first_line(exc)}"
                finally:
                    self._run.probe_n = None
                if not status["vmap"]:
                    try:
                        with warnings.catch_warnings():  # "batching rule not implemented" fallbacks
                            warnings.simplefilter("ignore", UserWarning)
                            status["vmap"] = _agree(_with_grad(self._vmap, x, inputs, self.spec, ref[2]), ref)
                    except Exception as exc:  # noqa: BLE001 - any failure means: not this kind
                        status["vmap"] = f"torch.func.vmap failed: {_first_line(exc)}"
                break
        for k, v in self.module.named_buffers():
            if not torch.equal(v, buffers[k].to(v.device)):
                raise ConfigError(f"the model updates buffer '{k}' in its forward pass (running "
                                  "statistics?), which one stacked model would share across clients; "
                                  "use parameter-free or GroupNorm/LayerNorm layers", key="kind", value=k)
        return status

    def _reference(self, x: torch.Tensor, inputs: torch.Tensor, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-client loop's logits, gradient and the random cotangent used for both."""
        out = self._loop(self.spec.unflatten(x), inputs)  # the model's own errors pass unchanged
        if out.dim() != 3:
            raise ConfigError(f"the model must return logits [batch, classes]; it returned shape "
                              f"{list(out.shape[1:])}", key="kind")
        cot = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        out, grad = _with_grad(self._loop, x, inputs, self.spec, cot)
        return out, grad, cot


def _with_grad(fn: Any, x: torch.Tensor, inputs: torch.Tensor, spec: ParamSpec, cot: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn's logits, d<logits, cot>/dx) for flat parameters x [m, P]."""
    leaf = x.detach().requires_grad_(True)
    out = fn(spec.unflatten(leaf), inputs)
    if out.shape != cot.shape:
        return out.detach(), torch.zeros_like(x)
    (grad,) = torch.autograd.grad((out * cot).sum(), leaf, allow_unused=True)
    return out.detach(), grad if grad is not None else torch.zeros_like(x)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _agree(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, ...]) -> str:
    """"" if logits and gradients equal the reference's to the dtype's tolerance, else a reason."""
    if got[0].shape != ref[0].shape:
        return f"output shape {list(got[0].shape)} differs from the per-client loop's {list(ref[0].shape)}"
    for what, a, b in (("outputs", got[0], ref[0]), ("gradients", got[1], ref[1])):
        tol = 1e-8 if b.dtype == torch.float64 else 1e-3
        if not torch.allclose(a, b, rtol=tol, atol=tol * (float(b.abs().max()) + 1.0)):
            return f"{what} differ from the per-client loop (does the model mix samples of a batch?)"
    return ""


def _sample_inputs(module: nn.Module, m: int, b: int, feature: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Probe inputs [m, b, *feature]: token ids below the smallest embedding size, or normals."""
    if dtype.is_floating_point:
        return torch.randn(m, b, *feature, generator=gen, dtype=dtype).to(device)
    sizes = [mod.num_embeddings for mod in module.modules() if isinstance(mod, nn.Embedding)]
    return torch.randint(0, min(sizes, default=2), (m, b, *feature), generator=gen).to(device, dtype)


def _vmappable(module: nn.Module) -> tuple[nn.Module, str]:
    """The module with recurrent layers swapped for `FunctionalRNN` (or itself), and a reason if not."""
    padded = [n for n, mod in module.named_modules()
              if isinstance(mod, nn.Embedding) and mod.padding_idx is not None]
    if padded:  # vmap's batched embedding backward keeps padding_idx for client 0's table only
        return module, (f"embedding '{padded[0]}' has padding_idx, whose gradient torch.func.vmap "
                        "gets wrong for all clients but the first (torch 2.13)")
    rnns = [(n, mod) for n, mod in module.named_modules() if isinstance(mod, nn.RNNBase)]
    if not rnns:
        return module, ""
    bad = [n for n, mod in rnns if rnn_mode(mod) is None]
    if bad:
        return module, f"recurrent layer '{bad[0]}' has options (proj_size) the functional cells lack"
    if any(n == "" for n, _ in rnns):
        return FunctionalRNN(module), ""  # type: ignore[arg-type]
    clone = copy.deepcopy(module)
    for name, mod in rnns:
        parent, _, attr = name.rpartition(".")
        setattr(clone.get_submodule(parent) if parent else clone, attr, FunctionalRNN(mod))
    return clone, ""


# ---- the feature-major fast path of Sequential MLPs --------------------------------------------
def _feature_major_plan(module: nn.Module) -> tuple[bool, list[tuple[str, Any]]] | None:
    """(starts with Flatten, [(op, arg)]) for a Sequential of Linear / elementwise layers after an
    optional leading Flatten, else None (without the Flatten it needs inputs [m, B, features])."""
    if not isinstance(module, nn.Sequential):
        return None
    names = {id(mod): name for name, mod in module.named_modules()}
    plan: list[tuple[str, Any]] = []
    flat = False
    for i, leaf in enumerate(module):
        pre = f"{names[id(leaf)]}."
        if type(leaf) is nn.Linear:
            plan.append(("linear", (pre + "weight", pre + "bias" if leaf.bias is not None else None)))
        elif isinstance(leaf, nn.Flatten) and leaf.start_dim == 1 and leaf.end_dim == -1 and i == 0:
            flat = True
        elif isinstance(leaf, _ELEMENTWISE) or (isinstance(leaf, nn.Dropout) and leaf.p == 0):
            plan.append(("act", leaf))
        else:
            return None
    return flat, plan


def _run_feature_major(plan: list[tuple[str, Any]], x: Params, inputs: torch.Tensor) -> torch.Tensor:
    """Linear/activation plans on activations [m, features, B]; returns logits [m, C, B]."""
    m, b = inputs.shape[0], inputs.shape[1]
    h = inputs.reshape(m, b, -1).transpose(1, 2)
    for op, arg in plan:
        if op == "linear":
            w = x[arg[0]]  # [m, out, in]
            h = torch.baddbmm(x[arg[1]].unsqueeze(2), w, h) if arg[1] is not None else torch.bmm(w, h)
        else:
            h = arg(h)
    return h


