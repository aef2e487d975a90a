"""What every streamdet command line shares: one ``error:`` line and an exit code for bad input.

Each tool (``python -m training.train``, ``python -m training.calibrate``, ...) is a parser (a
:class:`OneLineErrorParser`) and a ``run(args)`` function; :func:`run_tool` does the rest the same
way for all of them: parse, run, turn the tool's own errors into one ``error: ...`` line on stderr
and exit status 1, an ``OSError`` into ``error: FILE: reason``, and a :class:`UsageError` (options
that parse but do not go together) into one line and exit status 2, as argparse does for a bad
argument. The ``type=`` converters :func:`finite_float` and :func:`bounded_int` (and
:data:`positive_int`, :data:`non_negative_int`) check a number's range while parsing, so a bad
value is one line naming its option, exit status 2. :func:`enum_type` makes an Enum option print
and accept its values (``--method percentile``), not ``CalibrationMethod.PERCENTILE``.
:class:`Command` runs a command with subcommands (``streamdet run``, ``streamdet-train evaluate``)
and names the program in a tool's usage and help as the user typed it (``streamdet calibrate``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn, TypeVar

from streamdet.constants import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

E = TypeVar("E", bound=Enum)
T = TypeVar("T", int, float)

_PROGRAM: ContextVar[str | None] = ContextVar("streamdet_program", default=None)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``error: ... (see --help)`` line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print one ``error:`` line on stderr and exit with status 2 (argparse's usage error)."""
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class UsageError(ValueError):
    """Arguments that parse one by one but not together (``--images`` fewer than ``--batch``).

    :func:`run_tool` prints the message as one ``error:`` line and returns exit status 2, the status
    of a bad argument; the message names the option: ``--images: expected at least ...``.
    """


def _number(value: float) -> str:
    """A bound as users type it: ``1`` for 1.0, ``0.5``, ``4294967295``."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else repr(float(value))


def _range_text(ge: float | None, gt: float | None, le: float | None) -> str:
    """``" from 0 to 5"``, ``" > 0 and <= 1"``, ``" >= 1"`` or ``""``."""
    if ge is not None and le is not None:
        return f" from {_number(ge)} to {_number(le)}"
    parts = [f"{op} {_number(v)}" for op, v in ((">=", ge), (">", gt), ("<=", le)) if v is not None]
    return " " + " and ".join(parts) if parts else ""


def _in_range(value: float, ge: float | None, gt: float | None, le: float | None) -> bool:
    return not ((ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le))


def _checked(parse: Callable[[str], T], expected: str, name: str, ok: Callable[[T], bool]) -> Callable[[str], T]:
    """An argparse ``type=``: ``parse`` the text, then ``ok`` the value (else ``ArgumentTypeError``, ``expected``)."""

    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    convert.__name__ = name
    return convert


def finite_float(*, ge: float | None = None, gt: float | None = None,
                 le: float | None = None) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite number in a range (``nan`` and ``inf`` are refused).

    A bad value is one ``error: argument --lr: expected a finite number > 0 and <= 1, got 'nan'``
    line and exit status 2 (through :class:`OneLineErrorParser`).

    Args:
        ge: the smallest allowed value, if any.
        gt: a value that the number must exceed, if any.
        le: the largest allowed value, if any.

    Returns:
        A converter from the typed text to the float that raises ``argparse.ArgumentTypeError``.
    """
    return _checked(float, "expected a finite number" + _range_text(ge, gt, le), "finite_float",
                    lambda v: math.isfinite(v) and _in_range(v, ge, gt, le))


def bounded_int(*, ge: int | None = None, le: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for an integer in ``[ge, le]`` (either bound may be omitted).

    A bad value is one ``error: argument --frames: expected an integer >= 1, got '0'`` line and
    exit status 2 (through :class:`OneLineErrorParser`).

    Args:
        ge: the smallest allowed value, if any.
        le: the largest allowed value, if any.

    Returns:
        A converter from the typed text to the int that raises ``argparse.ArgumentTypeError``.
    """
    return _checked(int, "expected an integer" + _range_text(ge, None, le), "bounded_int",
                    lambda v: _in_range(v, ge, None, le))


positive_int = bounded_int(ge=1)
"""An argparse ``type=`` for a count: an integer >= 1."""

non_negative_int = bounded_int(ge=0)
"""An argparse ``type=`` for an integer >= 0 (a limit where 0 means none, a seed)."""


@contextmanager
def program_name(name: str) -> Iterator[None]:
    """Name the program ``name`` in the usage, help and errors of the tools run inside.

    :class:`Command` wraps each subcommand in it (``streamdet calibrate``, not ``python -m
    training.calibrate``); :func:`run_tool` applies it to the tool's parser.

    Args:
        name: the program as the user typed it.
    """
    token = _PROGRAM.set(name)
    try:
        yield
    finally:
        _PROGRAM.reset(token)


def invoked_as(default: str) -> str:
    """The program name the user typed: the innermost :func:`program_name`, else ``default``."""
    return _PROGRAM.get() or default


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

    The parser's program name becomes the one the user typed (:func:`invoked_as`).

    Args:
        parser: the tool's parser (a :class:`OneLineErrorParser`: one line, exit status 2 on a bad
            argument).
        run: the tool's work; it raises one of ``errors`` (or ``OSError``) on bad input, and
            :class:`UsageError` on options that do not go together.
        argv: arguments without the program name (``sys.argv[1:]`` when None).
        errors: the tool's own error types; each becomes ``error: <message>``.

    Returns:
        0 on success; 1 after printing one ``error:`` line on stderr; 2 after one for a
        :class:`UsageError`.
    """
    parser.prog = invoked_as(parser.prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
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
        tool behaves the same as a subcommand and as ``python -m ...``; it runs inside
        :func:`program_name` ``("PROG COMMAND")``, so its usage names the command the user typed.

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
        with program_name(f"{self.prog} {command.name}"):
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
