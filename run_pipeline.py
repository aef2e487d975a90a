"""Run the streamdet pipeline: decode -> preprocess -> engine -> postprocess -> sinks.

With no arguments it runs the bundled detector on the bundled demo video and publishes the
detections on ``tcp://127.0.0.1:5556`` (watch them with ``python -m pipeline.subscribe
tcp://127.0.0.1:5556``). Exit status: 0 finished, 1 failed (bad input, model, port in use,
decode error), 2 invalid settings or arguments, 130 stopped by SIGINT, 143 by SIGTERM.
"""

from __future__ import annotations

from pipeline.cli import build_parser, overrides_from_args, run_main

__all__ = ["build_parser", "main", "overrides_from_args"]


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline from the command line (``streamdet run`` runs the same code).

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    return run_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
