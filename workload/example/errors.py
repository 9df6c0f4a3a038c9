"""Errors of the example workload. Every error it raises derives from :class:`ExampleError`,
itself a :class:`workload.errors.WorkloadError`, so a caller that handles the SDK's root error
handles these too.

The tree::

    ExampleError
    ├── InputDataError           an input lacks a column, has a malformed value or repeats an id
    ├── InsufficientDataError    too few joined people (or one outcome only) to report safely
    └── SynthesisError           no synthetic sample free of real rows could be drawn

Messages name columns and row numbers, never values: the values are the parties' plaintext.
"""

from __future__ import annotations

from workload.errors import WorkloadError

__all__ = [
    "ExampleError",
    "InputDataError",
    "InsufficientDataError",
    "SynthesisError",
]


class ExampleError(WorkloadError):
    """Root of every error the example workload raises."""


class InputDataError(ExampleError):
    """An input is not what the workload expects: a missing column, a malformed value, an empty
    identifier or an identifier that appears twice."""


class InsufficientDataError(ExampleError):
    """The joined data is too small to report on without exposing individuals (fewer than k
    people), or it holds only one outcome, so no model can be trained or evaluated."""


class SynthesisError(ExampleError):
    """No synthetic row set free of copies of real rows could be drawn: the data's value space
    is so small that the model keeps reproducing real rows."""
