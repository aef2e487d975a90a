"""The training tools as the subcommands of ``streamdet-train`` (entry point: :mod:`training.commands`).

``streamdet-train train ...`` is ``python -m training.train ...``, and so on for each tool; each
subcommand parses its own arguments (``streamdet-train evaluate --help``). The command needs the
``train`` extra (``pip install 'streamdet[train]'``: PyTorch); ``calibrate`` and ``build-engine``
are the deployment tools of :mod:`engines.deploy`, also ``streamdet calibrate`` / ``build-engine``
without PyTorch.
"""

from __future__ import annotations

from engines.deploy.commands import BUILD_ENGINE, CALIBRATE
from streamdet.cli import Command, Subcommand
from training import dataset, evaluate, export, export_semantic, render_video, train

TOOLS = Command(
    "streamdet-train",
    "Train, evaluate, export and calibrate streamdet models.",
    (
        Subcommand("train", "train a detector or semantic segmenter from scratch (python -m training.train)",
                   train.main),
        Subcommand("evaluate", "COCO mAP or mIoU of an ONNX model on a dataset (python -m training.evaluate)",
                   evaluate.main),
        Subcommand("export", "ONNX + model card from a detector checkpoint (python -m training.export)", export.main),
        Subcommand("export-semantic",
                   "ONNX + model card from a semantic checkpoint (python -m training.export_semantic)",
                   export_semantic.main),
        Subcommand("dataset", "write a synthetic COCO dataset over real video (python -m training.dataset)",
                   dataset.main),
        Subcommand("render-video", "render a demo video with ground truth (python -m training.render_video)",
                   render_video.main),
        CALIBRATE,
        BUILD_ENGINE,
    ),
)
"""``streamdet-train COMMAND [ARGS...]``: call it with the arguments (``sys.argv[1:]`` when None)."""
