"""The ``streamdet-train`` command: every training tool as a subcommand (:data:`training.tools.TOOLS`).

``streamdet-train train ...`` is ``python -m training.train ...``, and so on for each tool. The
tools need the ``train`` extra (PyTorch); without it the command says so in one line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from streamdet.constants import EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``streamdet-train COMMAND [ARGS...]``.

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        The tool's exit status; 1 with one ``error:`` line when a training dependency is missing;
        2 for an unknown or missing command.
    """
    try:
        from training.tools import TOOLS
    except ModuleNotFoundError as e:
        print(f"error: streamdet-train needs {e.name}, from the train extra: pip install 'streamdet[train]'",
              file=sys.stderr)
        return EXIT_FAILURE
    return TOOLS(argv)


if __name__ == "__main__":
    raise SystemExit(main())
