"""tileattn: fast, lean multi-head attention for the CPU.

A threaded, tiled (flash-attention style) C++ kernel behind a NumPy API.
See ``scaled_dot_product_attention`` for the conventions: masks are True =
"may attend", causal masks are bottom-right aligned, and rows that can see
no key give zeros.
"""

from . import _core
from ._config import _apply_isa_env, config, show_config
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._threads import _check_env, get_num_threads, set_num_threads
from ._version import __version__
from .functional import scaled_dot_product_attention

_check_env()
_apply_isa_env()

__all__ = [
    "DTypeError",
    "InvalidParameterError",
    "ShapeError",
    "__version__",
    "config",
    "get_num_threads",
    "scaled_dot_product_attention",
    "set_num_threads",
    "show_config",
]
