"""What the PyTorch-style layers share besides masks: dtype and activation
arguments given the PyTorch way, state dicts under PyTorch's names, and the
train/eval switch."""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from .. import _validate as check
from .._errors import FrozenModuleError, InvalidParameterError
from .._state_dict import IncompatibleKeys
from ..module import Module, module_dtype

_QKV = ("q_proj", "k_proj", "v_proj")


def numpy_dtype(dtype: Any) -> np.dtype:
    """A ``dtype=`` argument (None, ``torch.float64``, ``np.float32``,
    "float64") as the module dtype: float32 or float64. No torch import:
    a torch dtype is read by its name."""
    if dtype is None:
        return np.dtype(np.float32)
    text = str(dtype)
    return module_dtype(text[len("torch."):] if text.startswith("torch.") else dtype)


def activation_name(activation: Any) -> str:
    """PyTorch's ``activation``: a name, or ``F.relu``/``F.gelu`` (read by
    their ``__name__``, so torch need not be imported)."""
    if isinstance(activation, str):
        return activation
    name = getattr(activation, "__name__", None)
    if name in ("relu", "gelu", "silu"):
        return str(name)
    raise InvalidParameterError(
        f"activation: expected 'relu', 'gelu' or torch.nn.functional.relu/gelu, "
        f"got {activation!r}")


def torch_names(sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A tileattn state dict with every attention's ``q_proj``/``k_proj``/
    ``v_proj`` parameters under ``nn.MultiheadAttention``'s names, where
    they stood: ``in_proj_weight`` (packed rows q, k, v) when the three read
    one width, else ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``;
    the biases always packed in ``in_proj_bias``."""
    out: Dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if not key.endswith("q_proj.weight"):
            if not any(key.endswith(f"{p}.{a}") for p in _QKV for a in ("weight", "bias")):
                out[key] = value
            continue
        prefix = key[:-len("q_proj.weight")]
        weights = [sd[f"{prefix}{p}.weight"] for p in _QKV]
        if len({w.shape[1] for w in weights}) == 1:
            out[f"{prefix}in_proj_weight"] = np.concatenate(weights)
        else:
            out.update({f"{prefix}{p}_weight": w for p, w in zip(_QKV, weights)})
        if f"{prefix}q_proj.bias" in sd:
            out[f"{prefix}in_proj_bias"] = np.concatenate([sd[f"{prefix}{p}.bias"] for p in _QKV])
    return out


class TorchStyle:
    """The PyTorch module habits the compat layers share: ``training`` (True
    after construction, as in PyTorch), ``train()``/``eval()``, calling the
    layer runs ``forward``, and state dicts under PyTorch's names. The
    weights live in the tileattn module ``self.module``."""

    module: Module
    training: bool = True

    def train(self, mode: bool = True) -> "TorchStyle":
        """Training mode: dropout applies (as PyTorch's does). Returns self."""
        training = check.flag("mode", mode)
        if training and self.module.frozen:
            raise FrozenModuleError(
                f"{type(self).__name__}.train: the layer is frozen (inference-only); build or "
                f"load an unfrozen one to train it")
        self.training = training
        return self

    def freeze(self) -> "TorchStyle":
        """Inference-only, each weight matrix held once, packed
        (``tileattn.Module.freeze``); in eval mode, as ``torch.jit.freeze``
        asks. Returns self."""
        if self.training:
            raise FrozenModuleError(
                f"{type(self).__name__}.freeze: the layer is in train mode (PyTorch's default "
                f"after construction); call eval() first")
        self.module.freeze()
        return self

    def eval(self) -> "TorchStyle":
        """Inference mode: no dropout. Returns self."""
        return self.train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters under PyTorch's names (``torch.from_numpy``
        of each loads into the torch module)."""
        return torch_names(self.module.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any],
                        strict: bool = True) -> IncompatibleKeys:
        """Load a PyTorch state dict as it is (torch tensors or arrays); see
        ``tileattn.Module.load_state_dict`` (nothing changes on failure)."""
        return self.module.load_state_dict(state_dict, strict)
