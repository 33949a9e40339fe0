"""Drop-in layers for code written against other libraries, on NumPy arrays.

``tileattn.compat.pytorch`` takes PyTorch's signatures, defaults and mask
conventions; ``tileattn.compat.keras`` takes Keras 3's. Neither imports the
library it imitates. Import the submodule you need.
"""
