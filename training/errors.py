"""The one error type of the training tools: a bad input or state whose message names the file or option."""

from __future__ import annotations


class TrainError(ValueError):
    """A training run cannot start or continue (bad arguments, missing or bad checkpoint).

    The message names the file or option; the CLIs print it as one ``error:`` line (exit 1).
    """


class ExportError(RuntimeError):
    """A checkpoint cannot be exported (bad checkpoint, path or parity); the message is ``<path>: <problem>``."""
