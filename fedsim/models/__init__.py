"""Models: factories of `torch.nn.Module`, and their flat-parameter, client-stacked execution.

Every model is an ordinary `nn.Module` (so it can be exported, inspected and used in Flower).
For training many clients at once the engine never instantiates one module per client: the
parameters of m clients live in one flat tensor [m, P] and `StackedModel` runs all m models
(client-folded layers, `torch.func.vmap`, or a per-client loop; see `fedsim.models.stacked`).

Built-in kinds: logreg, mlp, cnn, femnist-cnn, cifar-cnn, resnet (`fedsim.models.vision`);
char-lstm, char-gru, transformer (`fedsim.models.text`).
"""

from fedsim.models import text, vision  # noqa: F401 - register the built-in kinds
from fedsim.models.registry import MODELS, build_model
from fedsim.models.spec import ParamSpec, check_supported, init_params
from fedsim.models.stacked import KINDS, StackedModel

__all__ = ["KINDS", "MODELS", "ParamSpec", "StackedModel", "build_model", "check_supported", "init_params"]
