"""What Keras' MultiHeadAttention and GroupQueryAttention share: building
from the first call's shapes, Keras' initializers, ``get_weights`` /
``set_weights`` in Keras' order and shapes, and the call with Keras' masks.

The weights live in a ``tileattn.MultiHeadAttention`` (``module``), whose
projections, attention core and ``attention_axes`` layouts do the work; the
optional gate of ``use_gate=True`` is a ``Linear`` beside it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Type, TypeVar

import numpy as np

from .. import _validate as check
from .._axes import check_attention_axes, layouts
from .._errors import InvalidParameterError, ShapeError
from .._mha_core import attend_heads
from .._mha_saved import cast_inputs, check_features, shape_weights
from ..attention import MultiHeadAttention as TileMultiHeadAttention
from ..io import keras_state_dict
from ..linear import Linear
from ..module import module_dtype
from . import _keras_init, _keras_masks

WeightSpec = Tuple[str, Tuple[int, ...]]   # (Keras variable path, shape)
# Constructor arguments that act only in Keras' training or kernel choice;
# accepted so that Keras code and configs load, kept for get_config.
NO_EFFECT = ("flash_attention", "kernel_regularizer", "bias_regularizer",
             "activity_regularizer", "kernel_constraint", "bias_constraint")
# The keyword options both layers take after their sizes, with Keras' defaults.
KERAS_OPTIONS: Dict[str, Any] = {
    "kernel_initializer": "glorot_uniform", "bias_initializer": "zeros", "use_gate": False,
    "seed": None, "dtype": None, "name": None, **{k: None for k in NO_EFFECT}}
# Keras' Layer base arguments a layer's get_config() holds and from_config drops.
_LAYER_KEYS = ("trainable", "autocast")
AttentionT = TypeVar("AttentionT", bound="KerasAttention")


class Built(NamedTuple):
    """The layer as its first call (or ``build``) made it."""

    module: TileMultiHeadAttention
    gate: Optional[Linear]
    query_rank: int


def output_shape_tuple(output_shape: Any) -> Optional[Tuple[int, ...]]:
    """Keras' ``output_shape``: an int or a sequence of ints (None: the
    query's last axis)."""
    if output_shape is None:
        return None
    if isinstance(output_shape, int) and not check.is_bool(output_shape):
        output_shape = (output_shape,)
    try:
        dims = tuple(output_shape)
    except TypeError:
        raise InvalidParameterError(f"output_shape: expected an int or a tuple of ints, "
                                    f"got {output_shape!r}") from None
    if not dims:
        raise InvalidParameterError("output_shape: expected at least one size, got ()")
    return tuple(check.positive_int("output_shape", d) for d in dims)


def _policy_dtype(dtype: Any) -> np.dtype:
    """A dtype, or Keras' serialised DTypePolicy (``{"config": {"name": ...}}``)."""
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name", dtype)
    return module_dtype("float32" if dtype is None else dtype)


class KerasAttention:
    """Keras' attention-layer contract on tileattn; see ``compat.keras``."""

    def __init__(self, heads: Tuple[Any, Any, Any, Any], arg_names: Tuple[str, str, str],
                 layout: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        """``heads``: (query heads, key/value heads, key size, value size),
        spelled ``arg_names`` (the first three) by the subclass; ``layout``:
        its dropout, use_bias, sliding_window (output_shape, attention_axes);
        ``options``: the user's keyword options among ``KERAS_OPTIONS``."""
        unknown = sorted(set(options) - set(KERAS_OPTIONS))
        if unknown:
            raise InvalidParameterError(
                f"{type(self).__name__}: unknown arguments {unknown}; the keyword options are "
                f"{', '.join(KERAS_OPTIONS)}")
        args = {**KERAS_OPTIONS, **options, **layout}
        num_heads, num_kv_heads, key_dim, value_dim = heads
        heads_arg, kv_arg, dim_arg = arg_names
        self.num_heads = check.positive_int(heads_arg, num_heads)
        self.num_kv_heads = check.positive_int(kv_arg, num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError(f"{heads_arg} ({self.num_heads}) must be divisible by "
                                        f"{kv_arg} ({self.num_kv_heads})")
        self.key_dim = check.positive_int(dim_arg, key_dim)
        self.value_dim = check.optional_positive_int("value_dim", value_dim, self.key_dim)
        self.dropout = check.dropout_rate(args["dropout"])
        self.use_bias = check.flag("use_bias", args["use_bias"])
        self.use_gate = check.flag("use_gate", args["use_gate"])
        self.output_shape = output_shape_tuple(args.get("output_shape"))
        self.attention_axes = check_attention_axes(args.get("attention_axes"))
        window = args["sliding_window"]
        self.sliding_window = None if window is None else check.positive_int("sliding_window",
                                                                             window)
        self.kernel_initializer = args["kernel_initializer"]
        self.bias_initializer = args["bias_initializer"]
        self._kernel_init = _keras_init.get_initializer(self.kernel_initializer,
                                                        "kernel_initializer")
        self._bias_init = _keras_init.get_initializer(self.bias_initializer, "bias_initializer")
        self.seed = check.seed(args["seed"])
        self.dtype = _policy_dtype(args["dtype"])
        self.name: Optional[str] = args["name"]
        self._no_effect = {k: args[k] for k in NO_EFFECT}
        self._built: Optional[Built] = None

    def _shared_config(self) -> Dict[str, Any]:
        """The get_config entries both layers have, by Keras' names."""
        return {"name": self.name, "dtype": self.dtype.name, "dropout": self.dropout,
                "use_bias": self.use_bias, "use_gate": self.use_gate,
                "sliding_window": self.sliding_window,
                "kernel_initializer": self.kernel_initializer,
                "bias_initializer": self.bias_initializer, "seed": self.seed,
                **self._no_effect}

    @classmethod
    def from_config(cls: Type[AttentionT], config: Dict[str, Any]) -> AttentionT:
        """Build from ``get_config()``: this class's, or the Keras layer's."""
        return cls(**{k: v for k, v in config.items() if k not in _LAYER_KEYS})

    @property
    def built(self) -> bool:
        return self._built is not None

    @property
    def module(self) -> TileMultiHeadAttention:
        """The tileattn ``MultiHeadAttention`` holding the weights (its
        ``state_dict``, ``tileattn.save``), once built."""
        return self._require_built().module

    def _require_built(self) -> Built:
        if self._built is None:
            raise InvalidParameterError(
                f"{type(self).__name__} is not built yet: call it once or call "
                f"build(query_shape, value_shape)")
        return self._built

    # -- building -------------------------------------------------------------
    def build(self, query_shape: Any, value_shape: Any, key_shape: Any = None) -> None:
        """Create the weights for inputs of these shapes (None sizes allowed
        except the last axis), drawn with the layer's initializers."""
        self._built = self._make(query_shape, value_shape, key_shape)

    def _make(self, query_shape: Any, value_shape: Any, key_shape: Any) -> Built:
        shapes = [tuple(s) for s in (query_shape, value_shape,
                                     value_shape if key_shape is None else key_shape)]
        for arg, s in zip(("query", "value", "key"), shapes):
            if len(s) < 3 or not isinstance(s[-1], int):
                raise ShapeError(f"{arg}: expected (batch, *positions, features) with a known "
                                 f"features size, got shape {s}")
        q_shape, v_shape, k_shape = shapes
        if v_shape[1:-1] != k_shape[1:-1]:
            raise ShapeError(f"key and value must agree on every axis but the last; got "
                             f"value shape {v_shape} and key shape {k_shape}")
        self._check_rank(len(q_shape))
        out = self.output_shape or (q_shape[-1],)
        module = TileMultiHeadAttention(
            q_shape[-1], self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.key_dim,
            value_dim=self.value_dim, kdim=k_shape[-1], vdim=v_shape[-1],
            output_dim=math.prod(out), bias=self.use_bias, dropout=self.dropout,
            attention_axes=self.attention_axes, dtype=self.dtype, seed=self.seed)
        gate = (Linear(q_shape[-1], self.num_heads * self.value_dim, self.use_bias, self.dtype)
                if self.use_gate else None)
        built = Built(module, gate, len(q_shape))
        rng = np.random.default_rng(np.random.SeedSequence(self.seed).spawn(1)[0])
        self._load(built, [(self._kernel_init if path.endswith("kernel") else self._bias_init)(
            rng, shape, self.dtype) for path, shape in self._weight_specs(built)])
        return built

    def _check_rank(self, rank: int) -> None:
        """Keras orders score axes as attention_axes lists them; tileattn in
        increasing order, so other orders are refused rather than reordered."""
        if self.attention_axes is None:
            return
        resolved = [a % rank if -rank <= a < rank else a for a in self.attention_axes]
        if resolved != sorted(set(resolved)):
            raise InvalidParameterError(
                f"attention_axes: expected distinct axes in increasing order for inputs of "
                f"rank {rank}, got {self.attention_axes}")

    # -- weights --------------------------------------------------------------
    def _weight_specs(self, built: Built) -> List[WeightSpec]:
        """Keras' variables in ``get_weights()`` order: query, key, gate,
        value, attention_output; each kernel followed by its bias."""
        m = built.module
        out = self.output_shape or (m.output_dim,)
        parts: List[WeightSpec] = [("query", (m.embed_dim, self.num_heads, self.key_dim)),
                 ("key", (m.kdim, self.num_kv_heads, self.key_dim))]
        if self.use_gate:
            parts.append(("gate", (m.embed_dim, self.num_heads, self.value_dim)))
        parts += [("value", (m.vdim, self.num_kv_heads, self.value_dim)),
                  ("attention_output", (self.num_heads, self.value_dim) + out)]
        specs: List[WeightSpec] = []
        for part, kernel in parts:
            specs.append((f"{part}/kernel", kernel))
            if self.use_bias:
                specs.append((f"{part}/bias", out if part == "attention_output" else kernel[1:]))
        return specs

    def get_weights(self) -> List[np.ndarray]:
        """Copies of the weights in Keras' order and shapes (as
        ``keras_layer.get_weights()`` lists them)."""
        built = self._require_built()
        m = built.module
        own = {"query": m.q_proj, "key": m.k_proj, "value": m.v_proj,
               "attention_output": m.out_proj, "gate": built.gate}
        out = []
        for path, shape in self._weight_specs(built):
            part, kind = path.split("/")
            lin = own[part]
            assert lin is not None
            # tileattn keeps (out_features, in_features); Keras x @ kernel.
            a = lin.weight.T if kind == "kernel" else lin.bias
            out.append(np.array(a).reshape(shape))
        return out

    def set_weights(self, weights: Any) -> None:
        """Load ``keras_layer.get_weights()`` (Keras' order and shapes). Every
        array is checked first: a list for another head split, key_dim or
        feature size raises ShapeError and changes nothing."""
        built = self._require_built()
        specs = self._weight_specs(built)
        arrays = [np.asarray(w) for w in weights]
        if len(arrays) != len(specs):
            raise InvalidParameterError(
                f"weights: expected {len(specs)} arrays ({', '.join(p for p, _ in specs)}), "
                f"got {len(arrays)}")
        for i, ((path, shape), a) in enumerate(zip(specs, arrays)):
            if a.shape != shape:
                raise ShapeError(
                    f"weights[{i}] ({path}): expected shape {shape}, got {a.shape}; this layer "
                    f"has num_heads={self.num_heads}, num_key_value_heads={self.num_kv_heads}, "
                    f"key_dim={self.key_dim}, value_dim={self.value_dim}: build it with the "
                    f"head split of the layer the weights come from")
            if a.dtype.kind not in "fiu":
                raise InvalidParameterError(
                    f"weights[{i}] ({path}): expected real numbers, got dtype {a.dtype}")
        self._load(built, arrays)

    def _load(self, built: Built, arrays: List[np.ndarray]) -> None:
        """Arrays already checked against ``_weight_specs``, into the module."""
        named = dict(zip((p for p, _ in self._weight_specs(built)), arrays))
        m = built.module
        # The output kernel (heads, value_dim, *output_shape) as io's 3 axes.
        named["attention_output/kernel"] = named["attention_output/kernel"].reshape(
            self.num_heads, self.value_dim, m.output_dim)
        gate_kernel, gate_bias = named.pop("gate/kernel", None), named.pop("gate/bias", None)
        m.load_state_dict(keras_state_dict(named))
        if built.gate is not None:
            built.gate.weight = np.asarray(gate_kernel).reshape(m.embed_dim, -1).T
            if gate_bias is not None:
                built.gate.bias = gate_bias.reshape(-1)

    # -- call -----------------------------------------------------------------
    def __call__(self, query: Any, value: Any, key: Any = None, query_mask: Any = None,
                 value_mask: Any = None, key_mask: Any = None, attention_mask: Any = None,
                 return_attention_scores: bool = False, training: Optional[bool] = None,
                 use_causal_mask: bool = False) -> Any:
        check.flag("return_attention_scores", return_attention_scores)
        check.flag("use_causal_mask", use_causal_mask)
        train = False if training is None else check.flag("training", training)
        key = value if key is None else key
        built = self._built or self._make(np.shape(query), np.shape(value), np.shape(key))
        if np.ndim(query) != built.query_rank:
            raise ShapeError(f"query: the layer was built for rank {built.query_rank}, "
                             f"got shape {np.shape(query)}")
        mask = _keras_masks.combine(attention_mask, query_mask, value_mask, key_mask)
        y, scores = self._attend(built, query, value, key, mask, use_causal_mask,
                                 return_attention_scores, train)
        self._built = built     # a first call that fails leaves the layer unbuilt
        return (y, scores) if return_attention_scores else y

    def _attend(self, built: Built, query: Any, value: Any, key: Any,
                mask: Optional[np.ndarray], causal: bool, need_scores: bool,
                training: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The call on the checked pieces of tileattn's MultiHeadAttention
        forward, with Keras' gate between the attention and the output
        projection."""
        m = built.module
        q_in, k_in, v_in, self_attn, kv_same, _ = cast_inputs(query, key, value, m.dtype,
                                                              m.packed)
        check_features(q_in, k_in, v_in, (m.embed_dim, m.kdim, m.vdim), m.attention_axes)
        lays = layouts(q_in, k_in, v_in, m.attention_axes)
        q_lay, k_lay = lays
        axes = q_lay.perm[len(q_lay.batch_shape):-1]
        masks: Dict[str, Any] = {
            "attn_mask": None if mask is None else _keras_masks.to_core(mask, lays, self.num_heads),
            **_keras_masks.structural(causal, self.sliding_window, axes)}
        q3 = q_lay.to_sequence(q_in)
        k3 = q3 if self_attn else k_lay.to_sequence(k_in)
        v3 = k3 if kv_same else k_lay.to_sequence(v_in)
        q, k, v = m.split_heads(*m.projections.project(q3, k3, v3, self_attn, kv_same))
        y, w, _ = attend_heads(q, k, v, False, m.value_dim, dropout=m.dropout_draw(training),
                               need_weights=need_scores, training=False, masks=masks)
        if built.gate is not None:
            # sigmoid as (1 + tanh(x/2)) / 2: no exp overflow for large |x|
            y = y * (0.5 + 0.5 * np.tanh(0.5 * built.gate(q3)))
        y = q_lay.from_sequence(m.out_proj(y))
        y = y.reshape(y.shape[:-1] + (self.output_shape or (m.output_dim,)))
        scores = None if w is None else shape_weights(w, lays, False, self.num_heads, m.dtype)
        return y, scores
