"""What this build of tileattn is and what it runs on."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

from . import _core
from ._errors import InvalidParameterError
from ._version import __version__

ISA_NAMES = ("avx512_bf16", "avx512", "avx2", "baseline")

# How each path computes bf16 products (compute_dtype="bfloat16").
_BF16_METHODS = {"avx512_bf16": "vdpbf16ps (AVX512-BF16)"}


def bf16_method(isa: str) -> str:
    """How the ISA path ``isa`` runs products on bf16 operands."""
    return _BF16_METHODS.get(isa, "widened to float32, FMA (no bf16 units used)")


def _apply_isa_env() -> None:
    """Honour TILEATTN_ISA=avx512_bf16|avx512|avx2|baseline, refusing a path
    the CPU lacks."""
    name = os.environ.get("TILEATTN_ISA", "")
    if not name:
        return
    if name not in ISA_NAMES:
        raise InvalidParameterError(
            f"TILEATTN_ISA={name!r}: expected one of {', '.join(ISA_NAMES)}"
        )
    if name not in _core.isas_supported():
        raise InvalidParameterError(
            f"TILEATTN_ISA={name!r}: this CPU or build cannot run it; "
            f"available: {', '.join(_core.isas_supported())}"
        )
    _core.set_isa(name)


def config() -> dict[str, Any]:
    """The build and runtime configuration as a dict (see :func:`show_config`)."""
    info = _core.build_info()
    return {
        "version": __version__,
        "compiler": info["compiler"],
        "build_flags": info["flags"].strip(),
        "isa_paths_built": list(info["isas_built"]),
        "isa_paths_supported": list(_core.isas_supported()),
        "isa_path_in_use": _core.isa(),
        "bf16_products": bf16_method(_core.isa()),
        "cpu_features": {k: bool(v) for k, v in _core.cpu_features().items()},
        "machine": platform.machine(),
        "num_threads": int(_core.num_threads()),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def show_config() -> None:
    """Print version, compiler, ISA paths, threads and NumPy version."""
    cfg = config()
    features = " ".join(k for k, v in cfg["cpu_features"].items() if v) or "(none detected)"
    lines = [
        f"tileattn {cfg['version']}",
        f"  compiler        : {cfg['compiler']}  [{cfg['build_flags']}]",
        f"  ISA paths built : {', '.join(cfg['isa_paths_built'])}",
        f"  ISA paths usable: {', '.join(cfg['isa_paths_supported'])}",
        f"  ISA path in use : {cfg['isa_path_in_use']}",
        f"  bf16 products   : {cfg['bf16_products']}",
        f"  CPU features    : {features} ({cfg['machine']})",
        f"  threads         : {cfg['num_threads']}",
        f"  numpy           : {cfg['numpy']}  python {cfg['python']}",
    ]
    print("\n".join(lines))
