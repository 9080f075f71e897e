"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""

from __future__ import annotations


class EvomergeError(Exception):
    """Base of every error caused by the user's input rather than a bug."""


class ConfigError(EvomergeError):
    """A recipe, search space or option is invalid; the message names the file, field and value."""


class ModelError(EvomergeError):
    """A model folder cannot be used: missing, unsafe format, corrupt, or incompatible with the others."""


class RunDirError(EvomergeError):
    """A run directory is missing, already exists, was made by another search space, or is corrupt."""


class DiskFullError(EvomergeError):
    """A write failed because the disk is full (or over quota); the message names the disk and the space needed."""
