"""Errors that Adapter Atlas reports to a person (page or CLI) as one specific sentence."""

from __future__ import annotations


class AtlasError(Exception):
    """Base class: the message names the file, the tensor or field, and what was expected."""


class AdapterLoadError(AtlasError):
    """An adapter could not be read (missing file, bad JSON, wrong tensor shapes, unsafe zip...)."""


class IncompatibleAdaptersError(AtlasError):
    """Adapters cannot be compared or merged together (different bases, shapes, ranks...)."""
