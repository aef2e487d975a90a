"""Plate-text accuracy of a character model on letterboxed plate crops (``training.evaluate --text``).

Each crop of a ``plate_chars`` dataset (``python -m training.dataset --scene plate_chars``) goes
through the pipeline's preprocess, the ONNX model and :func:`streamdet.postprocess.decode_ultralytics_detect`
with :data:`READ_CONFIG` (score > :data:`streamdet.reading.READ_MIN_SCORE`, class-agnostic NMS at
IoU 0.5, one class per box); :func:`streamdet.reading.read_text` reads the characters left to
right, and the text is compared with the image record's ``"text"``. Exact match is reported over
all crops and over plates at least ``min_plate_px`` high in their frame (``"plate_h_px"``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engines.onnxruntime_backend import OnnxRuntimeEngine
from streamdet.card import card_path_for, load_card
from streamdet.postprocess import PostprocessConfig, candidates_to_detections, decode_ultralytics_detect
from streamdet.preprocess_ops import preprocess_batch
from streamdet.reading import READ_MIN_SCORE, read_text
from training.dataset import load_coco_dataset

READ_CONFIG = PostprocessConfig(score_threshold=READ_MIN_SCORE, iou_threshold=0.5, class_agnostic=True,
                                multi_label=False, masks=False)
"""Postprocess settings for reading: confident characters, one detection per glyph."""
MIN_PLATE_PX = 24.0
"""The text goal counts plates at least this high in the frame, pixels."""


def text_accuracy(
    *,
    model_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    card_path: str | os.PathLike[str] | None = None,
    min_score: float = READ_MIN_SCORE,
    min_plate_px: float = MIN_PLATE_PX,
    batch_size: int = 16,
    intra_op_threads: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Exact-match plate-text accuracy on a ``plate_chars`` dataset.

    Args:
        model_path: the character model (``.onnx``, ultralytics detect or segment layout).
        data_dir: dataset directory whose image records carry ``"text"`` and ``"plate_h_px"``.
        card_path: model card (default: ``MODEL.json`` beside the model).
        min_score: score a character needs to be read (also the postprocess threshold).
        min_plate_px: plate height of the "large plates" figure, frame pixels.
        batch_size: crops per inference batch.
        intra_op_threads: ONNX Runtime threads (0: one per core).
        show_progress: progress bar on stderr.

    Returns:
        ``{"text_exact", "text_exact_large", "n", "n_large", "min_score", "min_plate_px",
        "errors"}`` (``errors``: up to 20 ``[file, truth, read]`` triples).

    Raises:
        ValueError: if an image record has no ``"text"`` (the message names the file).
    """
    ds = load_coco_dataset(data_dir)
    images = list(ds.coco["images"])
    for im in images:
        if "text" not in im:
            raise ValueError(f"{ds.root / 'annotations.json'}: image {im['id']} has no \"text\" "
                             "(not a plate_chars set)")
    card = load_card(card_path if card_path is not None else card_path_for(Path(model_path)))
    alphabet = list(card.class_names)
    cfg = PostprocessConfig(score_threshold=min(min_score, READ_CONFIG.score_threshold), iou_threshold=0.5,
                            class_agnostic=True, multi_label=False, masks=False)
    engine = OnnxRuntimeEngine(model_path=model_path, intra_op_threads=intra_op_threads)
    engine.start()
    ok = np.zeros(len(images), bool)
    large = np.array([float(im.get("plate_h_px", 0.0)) >= min_plate_px for im in images])
    errors: list[list[str]] = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="read", disable=not show_progress, file=sys.stderr):
            chunk = images[start : start + batch_size]
            x, lbs = preprocess_batch([ds.read_image_rgb(im) for im in chunk], card)
            outs = engine.infer(x)
            names = list(engine.output_names)
            out0 = outs[names.index("output0") if "output0" in names else 0]
            for j, (cand, lb, im) in enumerate(zip(decode_ultralytics_detect(out0, num_classes=len(alphabet), cfg=cfg),
                                                   lbs, chunk, strict=True)):
                det = candidates_to_detections(cand, lb)
                text, _ = read_text(det.boxes_xyxy, det.scores, det.class_ids, alphabet, min_score)
                ok[start + j] = text == im["text"]
                if not ok[start + j] and len(errors) < 20:
                    errors.append([str(im["file_name"]), str(im["text"]), text])
    finally:
        engine.stop()
    return {
        "text_exact": float(ok.mean()) if ok.size else float("nan"),
        "text_exact_large": float(ok[large].mean()) if large.any() else float("nan"),
        "n": int(ok.size),
        "n_large": int(large.sum()),
        "min_score": min_score,
        "min_plate_px": min_plate_px,
        "errors": errors,
    }
