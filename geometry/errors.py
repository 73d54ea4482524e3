"""Errors that Adapter Atlas reports to a person (page or CLI) as one specific sentence.

One hierarchy: every error the library raises on bad input is an :class:`AtlasError`, so a page or a
script catches one class. Errors about argument values also subclass ``ValueError`` (what Python code
expects of a bad value)::

    AtlasError
    +-- AdapterLoadError            an adapter cannot be read
    +-- IncompatibleAdaptersError   adapters cannot be compared or merged together
    +-- InvalidArgumentError        (also ValueError) a parameter value out of its domain
    |   +-- MergeParameterError     a merge method's parameter (unknown, out of range)
    |       +-- UnknownMergeMethodError
    +-- MissingTaskDataError        no task data for an adapter
    +-- UnlabeledDataError          unlabeled inputs of a learned merge cannot be read
"""

from __future__ import annotations


class AtlasError(Exception):
    """Base class: the message names the file, the tensor or field, and what was expected."""


class AdapterLoadError(AtlasError):
    """An adapter could not be read (missing file, bad JSON, wrong tensor shapes, unsafe zip...)."""


class IncompatibleAdaptersError(AtlasError):
    """Adapters cannot be compared or merged together (different bases, shapes, ranks...)."""


class InvalidArgumentError(AtlasError, ValueError):
    """A parameter value outside its domain (an unknown metric, a negative rank, a malformed layer spec...)."""


class MergeParameterError(InvalidArgumentError):
    """A merge method's parameter is unknown to the method or out of its range."""


class UnknownMergeMethodError(MergeParameterError):
    """A merge method name that is not registered (:data:`geometry.merging.MERGE_METHODS`)."""


class MissingTaskDataError(AtlasError):
    """No task data (``tasks/<task>/<split>.jsonl``) for an adapter to be scored on."""


class UnlabeledDataError(AtlasError):
    """Unlabeled inputs cannot be read (no file or split, no ``text`` column, empty file...)."""
