"""What every streamdet command line shares: one ``error:`` line and an exit code for bad input.

Each tool (``python -m training.train``, ``python -m training.calibrate``, ...) is a parser and a
``run(args)`` function; :func:`run_tool` does the rest the same way for all of them: parse, run,
turn the tool's own errors into one ``error: ...`` line on stderr and exit status 1, and an
``OSError`` into ``error: FILE: reason``. :func:`enum_type` makes an Enum option print and accept
its values (``--method percentile``), not ``CalibrationMethod.PERCENTILE``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TypeVar

from streamdet.constants import EXIT_FAILURE, EXIT_OK

E = TypeVar("E", bound=Enum)


def enum_type(enum: type[E]) -> Callable[[str], E]:
    """An argparse ``type=`` for an Enum whose values are what users type.

    :func:`enum_option` uses it; a wrong value raises ``argparse.ArgumentTypeError``, which
    argparse reports as one ``invalid choice`` line (exit status 2).

    Args:
        enum: the Enum class (its values are strings).

    Returns:
        A converter from the typed string to the member.
    """

    def convert(text: str) -> E:
        try:
            return enum(text)
        except ValueError:
            values = ", ".join(repr(m.value) for m in enum)
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {values})") from None

    convert.__name__ = enum.__name__
    return convert


def enum_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, enum: type[E], *,
                default: E, help: str) -> None:  # noqa: A002  (argparse's own keyword)
    """Add ``--flag VALUE`` for an Enum: accepts and prints the members' values.

    Args:
        parser: the parser (or argument group) to add the option to.
        flag: the option, e.g. ``"--method"``.
        enum: the Enum class whose string values are the choices.
        default: the default member.
        help: the help text; ``(one of: a, b; default a)`` is appended.
    """
    values = [str(m.value) for m in enum]
    parser.add_argument(flag, type=enum_type(enum), default=default, metavar="{" + ",".join(values) + "}",
                        help=f"{help} (one of: {', '.join(values)}; default {default.value})")


def run_tool(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
             argv: Sequence[str] | None = None, *,
             errors: tuple[type[BaseException], ...] = (ValueError,)) -> int:
    """Parse the arguments, run the tool, and report its failures as one line.

    Args:
        parser: the tool's parser (argparse exits with status 2 on a bad argument, as usual).
        run: the tool's work; it raises one of ``errors`` (or ``OSError``) on bad input.
        argv: arguments without the program name (``sys.argv[1:]`` when None).
        errors: the tool's own error types; each becomes ``error: <message>``.

    Returns:
        0 on success, 1 after printing one ``error:`` line on stderr.
    """
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        where = e.filename if e.filename is not None else parser.prog
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
