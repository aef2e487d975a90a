"""The build CLIs' OSError lines: an error that names no file names the tool's main path instead.

:func:`streamdet.cli.run_tool` prints ``error: FILE: reason`` for an ``OSError`` that carries a
file name; :func:`name_os_errors` gives the others (a failed ``write`` on a full disk, ...) the
path the tool was working on, as ``error: PATH: reason``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["name_os_errors"]


@contextmanager
def name_os_errors(path: str | os.PathLike[str], error: type[Exception]) -> Iterator[None]:
    """Re-raise an ``OSError`` without a file name as ``error("<path>: <reason>")``.

    Args:
        path: the path to name (the tool's model or output file).
        error: the tool's own error type (one of the ``errors`` given to ``run_tool``).

    Yields:
        Nothing; the body runs inside.

    Raises:
        error: for an ``OSError`` whose ``filename`` is empty; other ``OSError`` s pass unchanged.
    """
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise error(f"{os.fspath(path)}: {e.strerror or e}") from e
