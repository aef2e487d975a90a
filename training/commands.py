"""The ``streamdet-train`` command: every training tool as a subcommand.

``streamdet-train train ...`` is ``python -m training.train ...``, and so on for each tool; each
subcommand parses its own arguments (``streamdet-train evaluate --help``). The tools are imported
only when run, so ``streamdet-train --help`` works without PyTorch; the tools themselves need the
``train`` extra (``pip install 'streamdet[train]'``), except ``calibrate`` and ``build-engine``,
the deployment tools of :mod:`engines.build` (also ``streamdet calibrate`` / ``build-engine``).
"""

from __future__ import annotations

from streamdet.cli import Subcommand, dispatch


def _train(argv: list[str]) -> int:
    from training.train import main

    return main(argv)


def _evaluate(argv: list[str]) -> int:
    from training.evaluate import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from training.export import main

    return main(argv)


def _export_semantic(argv: list[str]) -> int:
    from training.export_semantic import main

    return main(argv)


def _dataset(argv: list[str]) -> int:
    from training.dataset import main

    return main(argv)


def _render_video(argv: list[str]) -> int:
    from training.render_video import main

    return main(argv)


def _calibrate(argv: list[str]) -> int:
    from engines.build.calibrate import main

    return main(argv)


def _build_engine(argv: list[str]) -> int:
    from engines.build.build_engine import main

    return main(argv)


COMMANDS = (
    Subcommand("train", "train a detector or semantic segmenter from scratch (python -m training.train)", _train),
    Subcommand("evaluate", "COCO mAP or mIoU of an ONNX model on a dataset (python -m training.evaluate)",
               _evaluate),
    Subcommand("export", "ONNX + model card from a detector checkpoint (python -m training.export)", _export),
    Subcommand("export-semantic", "ONNX + model card from a semantic checkpoint (python -m training.export_semantic)",
               _export_semantic),
    Subcommand("dataset", "write a synthetic COCO dataset over real video (python -m training.dataset)", _dataset),
    Subcommand("render-video", "render a demo video with ground truth (python -m training.render_video)",
               _render_video),
    Subcommand("calibrate", "INT8 / FP16 variants of an ONNX model (python -m training.calibrate)", _calibrate),
    Subcommand("build-engine", "a TensorRT engine file from an ONNX model (python -m training.build_engine)",
               _build_engine),
)
"""The ``streamdet-train`` subcommands, in the order ``--help`` lists them."""


def main(argv: list[str] | None = None) -> int:
    """The ``streamdet-train`` command: ``streamdet-train COMMAND [ARGS...]``.

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        The subcommand's exit status (2 for an unknown or missing command).
    """
    return dispatch("streamdet-train", "Train, evaluate, export and calibrate streamdet models.", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
