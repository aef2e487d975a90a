"""Constants shared by every package: defined here once, imported everywhere else.

Each one is a contract between packages (a trained model, its card, the pipeline that serves it and
the processes that exchange its tensors), so a second copy would be a bug waiting for its first
divergence.
"""

from __future__ import annotations

import signal
from typing import Final

PAD_VALUE: Final = 114
"""Grey level (uint8, every channel) of the letterbox border: ultralytics' and YOLOv5's value."""

DEFAULT_INPUT_WH: Final[tuple[int, int]] = (640, 384)
"""Model input ``(width, height)`` in pixels that training and card defaults use (multiples of 32)."""

TENSOR_ITEMSIZE: Final[dict[str, int]] = {"float32": 4, "float16": 2}
"""Element types of a model input tensor (the card's input dtype) and their bytes per element."""

TENSOR_DTYPES: Final[tuple[str, ...]] = tuple(TENSOR_ITEMSIZE)
"""Element types a model input tensor may have on the wire and in the tensor rings."""

EXIT_OK: Final = 0
"""Process exit code: success."""

EXIT_FAILURE: Final = 1
"""Process exit code: a run or tool failed (bad input, a stage died, a model could not load)."""

EXIT_USAGE: Final = 2
"""Process exit code: the command line or settings were wrong (argparse's own code)."""

EXIT_SIGINT: Final = 128 + signal.SIGINT
"""Process exit code after Ctrl-C (the shell's ``128 + signal`` convention)."""

EXIT_SIGTERM: Final = 128 + signal.SIGTERM
"""Process exit code after SIGTERM."""

EXIT_SIGHUP: Final = 128 + signal.SIGHUP
"""Process exit code after SIGHUP (a closed terminal, a dropped ssh session)."""
