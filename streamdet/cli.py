"""What every streamdet command line shares: one ``error:`` line and an exit code for bad input.

Each tool (``python -m training.train``, ``python -m training.calibrate``, ...) is a parser and a
``run(args)`` function; :func:`run_tool` does the rest the same way for all of them: parse, run,
turn the tool's own errors into one ``error: ...`` line on stderr and exit status 1, and an
``OSError`` into ``error: FILE: reason``. :func:`enum_type` makes an Enum option print and accept
its values (``--method percentile``), not ``CalibrationMethod.PERCENTILE``. :class:`Command`
runs a command with subcommands (``streamdet run``, ``streamdet-train evaluate``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn, TypeVar

from streamdet.constants import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

E = TypeVar("E", bound=Enum)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``error: ... (see --help)`` line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print one ``error:`` line on stderr and exit with status 2 (argparse's usage error)."""
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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


def relative_path_note(path: str | os.PathLike[str]) -> str:
    """For an error about a missing file: where a relative path was looked for (empty for an absolute one).

    Returns:
        ``" (a relative path is taken from the current directory, /cwd)"`` or ``""``.
    """
    return "" if os.path.isabs(path) else f" (a relative path is taken from the current directory, {os.getcwd()})"


@contextmanager
def name_os_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Give an ``OSError`` raised inside that names no file ``path``, so its ``error:`` line names one.

    :func:`run_tool` prints ``error: FILE: reason`` for an ``OSError``; a failed ``write`` on a full
    disk (and the like) carries no file name, so the tool names the path it was working on.

    Args:
        path: the tool's main file (its model, output or run directory).

    Raises:
        OSError: the one raised inside, with ``filename`` set to ``path`` where it was empty.
    """
    try:
        yield
    except OSError as e:
        if not e.filename:
            e.filename = os.fspath(path)
        raise


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


@dataclass(frozen=True)
class Subcommand:
    """One subcommand of a command with subcommands (``streamdet run``, ``streamdet calibrate``).

    Attributes:
        name: what users type after the command.
        help: one line for the command's ``--help``.
        main: the tool's entry point; it takes the remaining arguments and returns the exit code.
    """

    name: str
    help: str
    main: Callable[[list[str]], int]


@dataclass(frozen=True)
class Command:
    """A command with subcommands; calling it runs one (a console-script entry point).

    Attributes:
        prog: the command's name.
        description: one paragraph for ``PROG --help``.
        commands: the subcommands, in the order ``--help`` lists them.
        epilog: text after the list of subcommands in ``--help``.
    """

    prog: str
    description: str
    commands: tuple[Subcommand, ...]
    epilog: str | None = None

    def __call__(self, argv: Sequence[str] | None = None) -> int:
        """Run ``PROG COMMAND [ARGS...]``: pick the subcommand and hand it the rest of the arguments.

        Each subcommand parses its own arguments (``PROG COMMAND --help`` prints its options), so a
        tool behaves the same as a subcommand and as ``python -m ...``.

        Args:
            argv: arguments without the program name (``sys.argv[1:]`` when None).

        Returns:
            The subcommand's exit code; 0 for ``--help``; 2 (one ``error:`` line) for an unknown or
            missing subcommand.
        """
        args = list(sys.argv[1:] if argv is None else argv)
        by_name = {c.name: c for c in self.commands}
        if not args or args[0] in ("-h", "--help"):
            print(self.usage(), file=sys.stdout if args else sys.stderr)
            return EXIT_OK if args else EXIT_USAGE
        command = by_name.get(args[0])
        if command is None:
            print(f"error: {self.prog}: unknown command {args[0]!r} (choose from {', '.join(by_name)}; see --help)",
                  file=sys.stderr)
            return EXIT_USAGE
        return command.main(args[1:])

    def usage(self) -> str:
        """The ``--help`` text: usage line, description, the subcommands with their help, epilog."""
        width = max(len(c.name) for c in self.commands)
        lines = [f"usage: {self.prog} COMMAND [ARGS...]", "", self.description, "", "commands:"]
        lines += [f"  {c.name:<{width}}  {c.help}" for c in self.commands]
        lines += ["", f"'{self.prog} COMMAND --help' lists a command's options."]
        if self.epilog:
            lines += ["", self.epilog]
        return "\n".join(lines)
