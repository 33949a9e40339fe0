"""The typed errors tileattn raises for bad input.

Each subclasses the built-in exception a NumPy user would catch anyway, so
``except ValueError`` keeps working.
"""


class ShapeError(ValueError):
    """An array has the wrong rank or shape, or shapes do not agree."""


class DTypeError(TypeError):
    """An array has a dtype tileattn cannot use, or dtypes do not agree."""


class InvalidParameterError(ValueError):
    """A scalar option is out of range or of the wrong kind."""


class FileFormatError(ValueError):
    """A file ``tileattn.load`` cannot use: unreadable, truncated, corrupt or
    crafted (its arrays, metadata or config do not hold together). The
    message names the file and what is wrong with it."""


class FrozenModuleError(RuntimeError):
    """Training (or an in-place edit) asked of a module that ``freeze()``
    made inference-only: its weights are held packed, with no master copy
    to update. PyTorch raises RuntimeError for the like."""
