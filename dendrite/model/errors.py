"""The exceptions a model directory that cannot be loaded raises.

Every one is a `ValueError` (the directory's contents are a bad input, not a
bug), carries a one-line message naming the file and, where there is one, the
tensor or config key, and is raised before any device memory is allocated
when the problem can be seen from file headers alone.
"""

from __future__ import annotations

__all__ = ["MissingFileError", "ModelLoadError", "UnsupportedModelError"]


class ModelLoadError(ValueError):
    """A model directory that Dendrite cannot load."""


class MissingFileError(ModelLoadError, FileNotFoundError):
    """A file or directory the model needs is absent."""


class UnsupportedModelError(ModelLoadError):
    """An architecture, activation, RoPE variant or dtype Dendrite does not implement."""
