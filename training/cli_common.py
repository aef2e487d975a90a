"""What the training CLIs share besides :func:`streamdet.cli.run_tool`: option types, the command, OSError paths.

The option types (argparse ``type=``) check each number's range while parsing, so a bad value is
one ``error: argument --OPTION: expected ...`` line and exit status 2 in every tool.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from streamdet.cli import bounded_int, finite_float

MAX_SEED = 2**32 - 1
"""The largest seed (seeds are 32-bit, as NumPy's legacy ones)."""
MAX_MULTIPLIER = 16.0
"""The largest ``--width-mult`` / ``--depth-mult``."""
MAX_THREADS = 1024
"""The largest ``--threads``."""
MAX_WORKERS = 256
"""The largest ``--workers`` (processes rendering the data cache)."""

seed_int = bounded_int(ge=0, le=MAX_SEED)
"""``--seed``, ``--data-seed``: an integer from 0 to 2^32 - 1."""
lr_float = finite_float(gt=0, le=1)
"""``--lr``: a peak AdamW learning rate, > 0 and at most 1."""
decay_float = finite_float(ge=0, le=1)
"""``--weight-decay``: AdamW's decoupled weight decay, 0..1."""
fraction_float = finite_float(ge=0, le=1)
"""A fraction of the images (``--h264-fraction``), 0..1."""
multiplier_float = finite_float(gt=0, le=MAX_MULTIPLIER)
"""``--width-mult``, ``--depth-mult``: > 0 and at most :data:`MAX_MULTIPLIER`."""
threads_int = bounded_int(ge=1, le=MAX_THREADS)
"""``--threads`` of a trainer: 1..:data:`MAX_THREADS`."""
workers_int = bounded_int(ge=1, le=MAX_WORKERS)
"""``--workers``: 1..:data:`MAX_WORKERS` processes."""


def wh_type(multiple: int = 1) -> Callable[[str], tuple[int, int]]:
    """An argparse ``type=`` for ``WIDTHxHEIGHT`` (positive, and multiples of ``multiple`` when > 1).

    Args:
        multiple: both sizes must be multiples of this (e.g. the model's deepest stride, 32).

    Returns:
        A converter from ``"640x384"`` to ``(640, 384)`` that raises ``argparse.ArgumentTypeError``.
    """

    def parse_wh(text: str) -> tuple[int, int]:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from e
        if w <= 0 or h <= 0 or w % multiple or h % multiple:
            what = f"positive multiples of {multiple} as WIDTHxHEIGHT" if multiple > 1 else "positive WIDTHxHEIGHT"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return (w, h)

    return parse_wh


def command_line(module: str, argv: Sequence[str], *, quote: bool = True) -> str:
    """The command recorded in checkpoints and cards: ``python -m MODULE ARGS``.

    Args:
        module: the tool's module, e.g. ``training.train``.
        argv: its arguments.
        quote: shell-quote the arguments (the dataset tools record them space-joined, unquoted).

    Returns:
        The command line.
    """
    return f"python -m {module} " + (shlex.join(argv) if quote else " ".join(argv))


def check_run_dir(out: Path, error: type[Exception]) -> None:
    """Check that ``out`` is a directory or can be made one: no file is in the way.

    Args:
        out: the run directory (``--out``).
        error: the tool's error type.

    Raises:
        Exception: ``error("OUT: not a directory")`` if ``out`` is a file, or ``error("OUT: PARENT is
            not a directory")`` if a file stands where one of its parents would be.
    """
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise error(f"{out}: not a directory" if p == out else f"{out}: {p} is not a directory")
            return


def remove_leftovers(*paths: Path) -> None:
    """Delete the temporary files of a failed (or finished) atomic write that still exist.

    Args:
        *paths: temporary files (missing ones are skipped).
    """
    for p in paths:
        if p.exists():
            p.unlink()


@contextmanager
def cannot_write(path: str | os.PathLike[str], error: type[Exception]) -> Iterator[None]:
    """Turn an ``OSError`` inside into ``error("PATH: cannot write (reason)")``.

    Args:
        path: the output named in the message.
        error: the tool's error type.

    Raises:
        Exception: ``error`` with that message, from the ``OSError``.
    """
    try:
        yield
    except OSError as e:
        raise error(f"{os.fspath(path)}: cannot write ({e.strerror or e})") from e
