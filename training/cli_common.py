"""What the training CLIs share besides :func:`streamdet.cli.run_tool`: size options, the command, OSError paths."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


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
