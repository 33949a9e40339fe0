"""Keras' kernel and bias initializers, by name, on NumPy.

The formulas are Keras 3's (``keras.src.initializers``): the variance-scaling
family divides its scale by a fan that ``compute_fans`` takes from the
kernel's shape, the random ones have Keras' default parameters, and the
truncated normal redraws values beyond two standard deviations. The bits
differ from Keras' (another random generator); the distributions do not.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np

from .._errors import InvalidParameterError, ShapeError

Shape = Tuple[int, ...]
Initializer = Callable[[np.random.Generator, Shape, np.dtype], np.ndarray]

# name -> (scale, mode, distribution) of keras.initializers.VarianceScaling
_VARIANCE_SCALING = {
    "GlorotUniform": (1.0, "fan_avg", "uniform"),
    "GlorotNormal": (1.0, "fan_avg", "truncated_normal"),
    "HeUniform": (2.0, "fan_in", "uniform"),
    "HeNormal": (2.0, "fan_in", "truncated_normal"),
    "LecunUniform": (1.0, "fan_in", "uniform"),
    "LecunNormal": (1.0, "fan_in", "truncated_normal"),
}
# name -> its constructor's parameters with Keras' defaults
_FAN_AXES = {"input_axes": None, "output_axes": None}
_PARAMETERS: Dict[str, Dict[str, Any]] = {
    **{name: dict(_FAN_AXES) for name in _VARIANCE_SCALING},
    "VarianceScaling": {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal",
                        **_FAN_AXES},
    "RandomNormal": {"mean": 0.0, "stddev": 0.05},
    "RandomUniform": {"minval": -0.05, "maxval": 0.05},
    "TruncatedNormal": {"mean": 0.0, "stddev": 0.05},
    "Zeros": {},
    "Ones": {},
    "Constant": {"value": 0.0},
}
_MODES = ("fan_in", "fan_out", "fan_avg")
_DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")
# A standard normal truncated to (-2, 2) has this standard deviation; Keras
# divides by it so that the truncated draw keeps the intended variance.
_TRUNCATED_STD = 0.87962566103423978


def compute_fans(shape: Shape, input_axes: Any = None,
                 output_axes: Any = None) -> Tuple[int, int]:
    """Keras' (fan_in, fan_out): the products over ``input_axes`` and
    ``output_axes`` when both are given; else a kernel of 3 or more axes
    counts as a convolution whose receptive field is every axis but the last
    two, so an attention kernel (E, heads, dim) has fan_in E*heads and
    fan_out E*dim."""
    if input_axes is not None and output_axes is not None:
        return (math.prod(shape[a] for a in input_axes),
                math.prod(shape[a] for a in output_axes))
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _class_name(name: str) -> str:
    """'glorot_uniform' -> 'GlorotUniform' (Keras accepts both spellings)."""
    return name if "_" not in name and name[:1].isupper() else \
        "".join(part.capitalize() for part in name.split("_"))


def _truncated_normal(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    """Standard normal draws, each redrawn until it lies inside (-2, 2)."""
    x = rng.standard_normal(shape)
    outside = np.abs(x) >= 2.0
    while outside.any():
        x[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(x) >= 2.0
    return x


def _variance_scaling(scale: float, mode: str, distribution: str,
                      axes: Tuple[Any, Any]) -> Initializer:
    def draw(rng: np.random.Generator, shape: Shape, dtype: np.dtype) -> np.ndarray:
        fan_in, fan_out = compute_fans(shape, *axes)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[mode]
        variance = scale / max(1.0, fan)
        if distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return rng.uniform(-limit, limit, shape).astype(dtype)
        if distribution == "untruncated_normal":
            return (rng.standard_normal(shape) * math.sqrt(variance)).astype(dtype)
        return (_truncated_normal(rng, shape) * (math.sqrt(variance) / _TRUNCATED_STD)).astype(dtype)
    return draw


def _from_parameters(cls: str, p: Dict[str, Any], argument: str) -> Initializer:
    axes = (p.get("input_axes"), p.get("output_axes"))
    if cls in _VARIANCE_SCALING:
        return _variance_scaling(*_VARIANCE_SCALING[cls], axes)
    if cls == "VarianceScaling":
        if p["mode"] not in _MODES or p["distribution"] not in _DISTRIBUTIONS \
                or not float(p["scale"]) > 0:
            raise InvalidParameterError(
                f"{argument}: VarianceScaling expects scale > 0, mode in {_MODES} and "
                f"distribution in {_DISTRIBUTIONS}; got {p}")
        return _variance_scaling(float(p["scale"]), p["mode"], p["distribution"], axes)
    if cls == "RandomNormal":
        return lambda rng, shape, dtype: (
            rng.normal(p["mean"], p["stddev"], shape).astype(dtype))
    if cls == "RandomUniform":
        return lambda rng, shape, dtype: (
            rng.uniform(p["minval"], p["maxval"], shape).astype(dtype))
    if cls == "TruncatedNormal":
        return lambda rng, shape, dtype: (
            (_truncated_normal(rng, shape) * p["stddev"] + p["mean"]).astype(dtype))
    value = {"Zeros": 0.0, "Ones": 1.0}.get(cls, p.get("value"))
    return lambda rng, shape, dtype: np.full(shape, value, dtype)


def _from_callable(fn: Callable[..., Any], argument: str) -> Initializer:
    """A Keras-style callable ``fn(shape, dtype=None)`` (a Keras initializer
    object is one) whose result NumPy can read."""
    def draw(rng: np.random.Generator, shape: Shape, dtype: np.dtype) -> np.ndarray:
        a = np.asarray(fn(shape, dtype=dtype.name))
        if a.shape != shape:
            raise ShapeError(f"{argument}: the initializer returned shape {a.shape} "
                             f"for a weight of shape {shape}")
        return a.astype(dtype)
    return draw


def get_initializer(spec: Any, argument: str) -> Initializer:
    """An initializer from what Keras' ``initializers.get`` takes: a name
    ('glorot_uniform' or 'GlorotUniform'), a serialised
    ``{"class_name": ..., "config": {...}}`` (its ``seed`` is replaced by the
    layer's), or a callable ``fn(shape, dtype=None)``."""
    if isinstance(spec, str):
        cls, config = _class_name(spec), {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("class_name"), str):
        cls = _class_name(spec["class_name"])
        config = {k: v for k, v in dict(spec.get("config") or {}).items() if k != "seed"}
    elif callable(spec):
        return _from_callable(spec, argument)
    else:
        raise InvalidParameterError(
            f"{argument}: expected an initializer name, a serialised initializer "
            f"{{'class_name': ..., 'config': ...}} or a callable fn(shape, dtype), got {spec!r}")
    if cls not in _PARAMETERS:
        raise InvalidParameterError(
            f"{argument}: unknown initializer {spec!r}; expected one of "
            f"{', '.join(sorted(_PARAMETERS))} (or their snake_case names)")
    unknown = sorted(set(config) - set(_PARAMETERS[cls]))
    if unknown:
        raise InvalidParameterError(
            f"{argument}: {cls} takes {sorted(_PARAMETERS[cls]) or 'no parameters'}, "
            f"got {unknown}")
    return _from_parameters(cls, {**_PARAMETERS[cls], **config}, argument)
