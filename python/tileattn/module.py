"""``Module``: the parameter bookkeeping every tileattn layer shares.

A module owns NumPy arrays (its parameters) and child modules. Names are
dotted paths as in PyTorch (``out_proj.weight``), so state dicts move between
tileattn and PyTorch with the same keys.

Loading never replaces a parameter array: values are copied *into* the
existing arrays. A layer may therefore keep several parameters as views of one
packed buffer (``MultiHeadAttention`` packs its Q/K/V weights so that one
matrix multiply projects all three) and the packing survives loads and
attribute assignment.

Parameters are handed out read-only (``_parameters.py`` says why): writes
go through the module (assignment, ``load_state_dict``, an optimiser), which
counts them in ``version`` so what is derived from the weights is remade.

``freeze()`` makes a module inference-only: each weight matrix is then held
once, packed for the core's GEMM (``_frozen.py``), and read back unpacked.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from . import _core, _parameters, _state_dict
from ._errors import DTypeError, FrozenModuleError, InvalidParameterError, ShapeError
from ._frozen import FrozenParameter
from ._state_dict import IncompatibleKeys, as_value
from ._validate import COMPUTE_DTYPES, dtype_in, flag, shape_str


# Every Module subclass by class name, so tileattn.load can rebuild a saved one.
MODULE_CLASSES: Dict[str, type] = {}


def module_dtype(dtype: Any) -> np.dtype:
    """The dtype a module computes in: float32 or float64."""
    return dtype_in("dtype", dtype, COMPUTE_DTYPES, "float32 or float64")


class Module:
    """Base class of tileattn's layers.

    Subclasses call ``register_parameter`` and ``add_module`` in ``__init__``
    (or assign a ``Module`` to an attribute) and implement ``forward``;
    ``module(...)`` calls ``forward``.

    Attributes
    ----------
    dtype : np.dtype
        float32 or float64; every parameter has this dtype.
    training : bool
        The mode ``train()`` / ``eval()`` set (False, inference, at first):
        the default of ``training`` in calls whose ``forward`` takes it. An
        explicit ``training=`` argument wins. Not part of the state dict.
    frozen : bool
        Whether ``freeze()`` made the module inference-only.
    """

    dtype: np.dtype
    # A class attribute, so modules pickled before the modes existed load in
    # eval mode; train() and eval() set it on each instance.
    training = False
    # Whether forward takes a keyword-only ``training`` (set per subclass).
    _forward_takes_training = False
    # True for a part split out of a layer whose names must not change: its
    # parameters and children are named as its parent's own (``q_proj.weight``,
    # not ``projections.q_proj.weight``), and its parent's attribute lookup
    # finds its children.
    inline_names = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODULE_CLASSES[cls.__name__] = cls
        param = inspect.signature(cls.forward).parameters.get("training")
        cls._forward_takes_training = param is not None and param.kind == param.KEYWORD_ONLY

    def __init__(self, dtype: Any = np.float32) -> None:
        d = self.__dict__
        d["_params"] = {}
        d["_modules"] = {}
        d["_grads"] = {}
        d["_saved"] = None
        d["_version"] = 0
        d["dtype"] = module_dtype(dtype)

    # -- frozen (inference-only) modules ----------------------------------------
    @property
    def frozen(self) -> bool:
        f: bool = self.__dict__.get("_frozen", False)
        return f

    def freeze(self) -> "Module":
        """Make this module and its descendants inference-only, holding each
        weight matrix once: packed for the core's GEMM, the row-major copy
        dropped (a float32 layer's weights take half the memory; with
        ``compute_dtype="bfloat16"`` only the bf16 copy is kept, a third).
        Outputs keep their bits. Parameters still read as arrays (unpacked
        copies, read-only), ``state_dict()``, ``tileattn.save`` and pickling
        work, and ``load_state_dict`` / assignment pack the new values.
        Training does not: ``train()``, a ``training=True`` call,
        ``backward``, ``editing()`` and optimisers raise
        ``FrozenModuleError``. As ``torch.jit.freeze``, it needs eval mode.
        Returns self."""
        modules = [m for _, m in self.named_modules()]
        if any(m.training for m in modules):
            raise FrozenModuleError(
                f"{type(self).__name__}.freeze: the module is in train mode; call eval() first")
        for m in modules:   # parents first: a fused matrix is packed before its parts
            if not m.frozen:
                d = m.__dict__
                # Its own dict (copy.copy shares it; the copy stays as it is),
                # and no gradients or saved activations: nothing trains it.
                d["_params"], d["_grads"], d["_saved"] = dict(d["_params"]), {}, None
                m._freeze_parameters()
                d["_frozen"] = True
        _core.release_free_memory()     # else the allocator keeps what was let go
        return self

    def _freeze_parameters(self) -> None:
        """Hook: replace this module's weight matrices by ``FrozenParameter``s
        (the default keeps every parameter an array)."""

    def _refuse_if_frozen(self, what: str) -> None:
        if self.frozen:
            raise FrozenModuleError(
                f"{type(self).__name__}.{what}: the module is frozen (inference-only, its weights "
                f"held packed); build or load an unfrozen module to train it")

    # -- registration -------------------------------------------------------
    def register_parameter(self, name: str, value: Optional[np.ndarray]) -> None:
        """Own ``value`` (converted to the module's dtype) as parameter ``name``.
        ``None`` declares an absent optional parameter (e.g. a bias turned off)."""
        if "." in name or not name:
            raise InvalidParameterError(f"parameter name: expected a non-empty name without '.', got {name!r}")
        if value is not None:   # a copy: the caller's array does not become read-only
            value = _parameters.adopt(self, np.array(value, dtype=self.dtype, order="C"))
        self._params[name] = value

    def add_module(self, name: str, module: Optional["Module"]) -> None:
        if "." in name or not name:
            raise InvalidParameterError(f"module name: expected a non-empty name without '.', got {name!r}")
        self._modules[name] = module

    def _rebind(self, name: str, array: np.ndarray) -> None:
        """Make parameter ``name`` *be* ``array`` (a view into a packed buffer).
        For subclasses that pack parameters; users assign or load instead."""
        old = self._params[name]
        if isinstance(old, FrozenParameter):   # held packed: no array to share
            self._refuse_if_frozen(f"share_storage({name!r})")
        if old is None or array.shape != old.shape or array.dtype != self.dtype:
            raise ShapeError(f"{name}: cannot rebind to an array of shape {array.shape}")
        self._params[name] = _parameters.adopt(self, array)
        self._parameters_changed()

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: parameters and children.
        d = self.__dict__
        if name in d.get("_params", ()):
            p = d["_params"][name]
            return p.value() if isinstance(p, FrozenParameter) else p
        if name in d.get("_modules", ()):
            return d["_modules"][name]
        for child in d.get("_modules", {}).values():
            if child is not None and child.inline_names and name in child._modules:
                return child._modules[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            self._assign(name, value)
        elif isinstance(value, Module):
            self.add_module(name, value)
        else:
            object.__setattr__(self, name, value)

    def _assign(self, name: str, value: Any) -> None:
        """``module.weight = w`` copies ``w`` into the existing array, so packed
        views (and anything derived from them) stay consistent."""
        old = self._params[name]
        if old is None or value is None:
            raise InvalidParameterError(
                f"{name}: cannot switch an optional parameter on or off after construction")
        a = as_value(name, value)
        if a.shape != old.shape:
            raise ShapeError(f"{name}: expected shape {shape_str(old.shape)}, got {shape_str(a.shape)}")
        if isinstance(old, FrozenParameter):
            old.write(a)
            self._parameters_changed()
            return
        with _parameters.updating([old]):
            np.copyto(old, a, casting="unsafe")

    @contextmanager
    def editing(self) -> Iterator["Module"]:
        """``with module.editing(): module.weight[:] = ...``: edits by hand;
        what is derived from the parameters is remade after the block."""
        self._refuse_if_frozen("editing")
        with _parameters.updating(self.parameters()):
            yield self

    @property
    def version(self) -> int:
        """Counts writes of this module's own parameters; what is derived
        from them (a packed weight) is remade when it moves."""
        v: int = self.__dict__.get("_version", 0)
        return v

    def _parameters_changed(self) -> None:
        """Run after this module's parameters were written: counts the write."""
        self.__dict__["_version"] = self.version + 1

    # -- traversal ------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        """(dotted name, module) for this module and every descendant."""
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(prefix if child.inline_names else
                                               f"{prefix}.{name}" if prefix else name)

    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        """(name, child) as the dotted names see them: an inline child's
        children in its place."""
        for name, child in self._modules.items():
            if child is None:
                continue
            if child.inline_names:
                yield from child.named_children()
            else:
                yield name, child

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
        """(dotted name, array) for every parameter, children included, in
        registration order. The arrays are the module's own (not copies),
        but for a frozen module's weights: read-only unpacked copies."""
        for name, _, _, p in self._parameter_slots(prefix):
            yield name, p.value() if isinstance(p, FrozenParameter) else p

    def _parameter_slots(self, prefix: str = ""
                         ) -> Iterator[Tuple[str, "Module", str, "np.ndarray | FrozenParameter"]]:
        """(dotted name, owning module, own name, stored value) for every
        parameter: an array, or a frozen module's ``FrozenParameter``."""
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._params.items():
                if p is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), mod, name, p

    def parameters(self) -> List[np.ndarray]:
        """The parameter arrays (the module's own, not copies; read-only: write
        through the module or an optimiser)."""
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self._parameter_values_or_frozen())

    def _parameter_values_or_frozen(self) -> Iterator["np.ndarray | FrozenParameter"]:
        for _, _, _, p in self._parameter_slots():
            yield p

    @property
    def nbytes(self) -> int:
        """Bytes this module and its descendants hold for their weights: the
        parameter arrays, and the packed copies the GEMM streams (made on
        first use; after ``freeze()`` the only copy of each matrix)."""
        arrays = sum(p.nbytes for p in self._parameter_values_or_frozen()
                     if isinstance(p, np.ndarray))
        return arrays + sum(m._packed_nbytes() for _, m in self.named_modules())

    def _packed_nbytes(self) -> int:
        """Hook: bytes of the packed weights this module itself keeps."""
        return 0

    # -- gradients --------------------------------------------------------------
    def named_grads(self) -> Iterator[Tuple[str, np.ndarray]]:
        """(name, gradient array) for every parameter, allocated on first use."""
        for _, mod in self.named_modules():
            mod._refuse_if_frozen("grads")
        for mod_name, mod in self.named_modules():
            for name, p in mod._params.items():
                if p is not None:
                    g = mod._grads.get(name)
                    if g is None or g.shape != p.shape:
                        g = mod._grads[name] = np.zeros_like(p)
                    yield (f"{mod_name}.{name}" if mod_name else name), g

    @property
    def grads(self) -> Dict[str, np.ndarray]:
        """{name: gradient array}, the names of ``named_parameters()``. The
        arrays are the ones ``backward`` accumulates into (not copies)."""
        return dict(self.named_grads())

    def zero_grad(self) -> None:
        for _, g in self.named_grads():
            g.fill(0)

    # -- backward plumbing ----------------------------------------------------
    def backward(self, grad_output: Any) -> Any:
        """Gradient of the input(s) from the gradient of the last training
        forward's output; parameter gradients are accumulated (see ``grads``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def _accumulate(self, name: str, value: np.ndarray) -> None:
        """Add ``value`` into the gradient of this module's parameter ``name``."""
        self._refuse_if_frozen("backward")
        p = self._params[name]
        assert p is not None
        g = self._grads.get(name)
        if g is None or g.shape != p.shape:
            g = self._grads[name] = np.zeros_like(p)
        g += value

    def _save(self, state: Any) -> None:
        """Keep what ``backward`` needs (only training forwards call this)."""
        self._refuse_if_frozen("forward(training=True)")
        self.__dict__["_saved"] = state

    def _take_saved(self) -> Any:
        """The state of the last training forward, released (one backward per
        forward, as PyTorch frees its graph); a typed error if there is none."""
        self._refuse_if_frozen("backward")
        state = self.__dict__.get("_saved")
        if state is None:
            raise InvalidParameterError(
                f"{type(self).__name__}.backward: nothing to differentiate; call the module "
                f"with training=True first (inference calls keep no activations), and call "
                f"backward once per training forward")
        self.__dict__["_saved"] = None
        return state

    # -- state dicts ----------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters, keyed by dotted name (PyTorch's layout)."""
        return {name: p.copy() for name, p in self.named_parameters()}

    def _convert_state_dict(self, sd: Dict[str, Any]) -> Dict[str, Any]:
        """Hook: rename foreign keys (relative to this module) to its own names,
        e.g. PyTorch's ``in_proj_weight``. The default keeps sd as is."""
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy ``state_dict``'s values into the parameters.

        Parameters
        ----------
        state_dict : mapping of dotted name -> array-like
            Values are cast to the module's dtype. Foreign names a layer
            knows (e.g. PyTorch's ``in_proj_weight``) are accepted.
        strict : bool
            Raise when a key is missing or unexpected. A value of the wrong
            shape is an error either way.

        Returns
        -------
        IncompatibleKeys
            (missing_keys, unexpected_keys); both empty when strict.

        Raises
        ------
        InvalidParameterError
            Missing or unexpected keys (strict), listing every one of them
            and every mis-shaped key too.
        ShapeError
            Only mis-shaped keys; each named with both shapes. Also a
            ``keras_state_dict`` whose heads or dims differ from the module's.

        Nothing is modified unless the whole load succeeds.
        """
        return _state_dict.load(self, state_dict, strict)

    # -- config, calling, pickling --------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments (JSON-serialisable) that rebuild this module;
        ``tileattn.save`` stores them beside the weights."""
        raise NotImplementedError(f"{type(self).__name__} does not define get_config")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._forward_takes_training and "training" not in kwargs:
            kwargs["training"] = self.training
        elif self.frozen and isinstance(kwargs["training"] if "training" in kwargs else None,
                                        (bool, np.bool_)) and kwargs["training"]:
            self._refuse_if_frozen("forward(training=True)")
        return self.forward(*args, **kwargs)

    def train(self, mode: bool = True) -> "Module":
        """Set the mode of this module and every descendant: ``training``
        becomes the default of calls that take it (dropout, and keeping what
        ``backward`` needs). Returns self, so ``m = Model(...).train()``."""
        training = flag("mode", mode)
        if training:
            for _, module in self.named_modules():
                module._refuse_if_frozen("train")
        for _, module in self.named_modules():
            module.__dict__["training"] = training
        return self

    def eval(self) -> "Module":
        """``train(False)``: inference calls (no dropout, nothing kept)."""
        return self.train(False)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_saved", None)      # activations of a training forward: not weights
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Bypass __setattr__: the parameter dicts are restored wholesale
        # (pickled arrays come back writeable: lock them again).
        self.__dict__["_saved"] = None
        self.__dict__.update(state)
        for p in self._params.values():
            if isinstance(p, np.ndarray):
                _parameters.adopt(self, p)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = [f"  ({n}): " + repr(m).replace("\n", "\n  ")
                    for n, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + (")" if not children else "\n" + "\n".join(children) + "\n)")


class ModuleList(Module):
    """Child modules named ``0``, ``1``, ... (PyTorch's ``layers.N.`` keys)."""

    def __init__(self, modules: List[Module], dtype: Any = np.float32) -> None:
        super().__init__(dtype)
        for i, m in enumerate(modules):
            self.add_module(str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter([m for m in self._modules.values() if m is not None])

    def __getitem__(self, i: int) -> Module:
        m: Optional[Module] = self._modules[str(range(len(self))[i])]
        if m is None:
            raise IndexError(i)
        return m
