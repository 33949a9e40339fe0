"""tileattn: fast, lean multi-head attention for the CPU.

A threaded, tiled (flash-attention style) C++ kernel behind a NumPy API.
See ``scaled_dot_product_attention`` for the conventions: masks are True =
"may attend", causal masks are bottom-right aligned, and rows that can see
no key give zeros.
"""

from . import _core
from ._config import _apply_isa_env, config, show_config
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._errors import FileFormatError, FrozenModuleError
from ._threads import _check_env, get_num_threads, set_num_threads
from ._version import __version__
from .functional import scaled_dot_product_attention
from .backward import scaled_dot_product_attention_backward
from .varlen import varlen_attention
from . import optim
from .module import Module
from .linear import Linear
from .norm import LayerNorm, qk_layer_norm
from .attention import MultiHeadAttention
from .cache import KVCache
from .encoder import FeedForward, TransformerEncoder, TransformerEncoderLayer
from .lstm import LSTM
from . import models
from .positional import rope, sinusoidal_positions
from .io import keras_state_dict, load, load_keras_weights, save
from .masks import causal_mask, window_mask

_check_env()
_apply_isa_env()

__all__ = [
    "DTypeError",
    "FeedForward",
    "FileFormatError",
    "FrozenModuleError",
    "InvalidParameterError",
    "KVCache",
    "LSTM",
    "LayerNorm",
    "Linear",
    "Module",
    "MultiHeadAttention",
    "ShapeError",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "__version__",
    "causal_mask",
    "config",
    "get_num_threads",
    "keras_state_dict",
    "load",
    "load_keras_weights",
    "models",
    "rope",
    "save",
    "optim",
    "qk_layer_norm",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "set_num_threads",
    "show_config",
    "sinusoidal_positions",
    "varlen_attention",
    "window_mask",
]
