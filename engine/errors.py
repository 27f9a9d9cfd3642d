"""Errors that carry a message a person can act on.

Command-line entry points catch ``TensorfleetError`` and print its message as one line (no traceback);
anything else is a bug and keeps its traceback.
"""


class TensorfleetError(Exception):
    """Base class for user-facing errors: the message names what is wrong and what to do."""


class ModelLoadError(TensorfleetError):
    """A model path, file or weight could not be used (missing, truncated, corrupted, unsupported)."""


class ConfigError(TensorfleetError, ValueError):
    """A configuration value is invalid (e.g. a tensor-parallel size that does not divide the heads)."""
