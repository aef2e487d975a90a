"""COCO evaluation of an ONNX model on a dataset directory (pycocotools), and semantic mIoU.

Every image goes through the same preprocess (:func:`streamdet.preprocess_ops.preprocess_batch`),
engine (:class:`engines.onnxruntime_backend.OnnxRuntimeEngine`) and postprocess
(:mod:`streamdet.postprocess`) as in the pipeline, with the mAP settings of
:data:`streamdet.postprocess.EVAL_CONFIG` (score threshold 0.001, NMS IoU 0.7, 300 detections per
image, multi-label: one candidate per class above the threshold, as ultralytics' validator), then
pycocotools ``COCOeval`` scores the boxes (and, for instance-segmentation models, the masks as RLE).
Semantic models are scored by mean IoU.

CLI::

    python -m training.evaluate --model MODEL.onnx --data DIR [--card MODEL.json] [--batch 8]
        [--plot PR.png] [--max-images N] [--json-out FILE] [--single-label] [--text [--min-score S]]

``--text`` (character models on ``--scene plate_chars`` sets) also reads each crop's plate text
(:mod:`training.plates_text`) and appends ``text_exact=0.xxx text_exact_24px=0.xxx``.

The last line printed is ``mAP50-95=0.xxx mAP50=0.xxx`` (detect), with
``mask_mAP50-95=0.xxx mask_mAP50=0.xxx`` appended for instance segmentation, or ``mIoU=0.xxx``
(semantic). Bad input prints one line ``error: <path>: <problem>`` and exits 1.

References: T.-Y. Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014, and the
``pycocotools`` ``COCOeval`` implementation (101-point interpolated AP, IoU .50:.05:.95).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from engines.base import EngineError
from engines.onnxruntime_backend import OnnxRuntimeEngine
from streamdet.card import ModelCard, ModelCardError, Task, card_from_ultralytics_metadata, card_path_for, load_card
from streamdet.cli import OneLineErrorParser, finite_float, non_negative_int, positive_int, run_tool
from streamdet.masks import prototype_masks_to_rle
from streamdet.postprocess import (
    EVAL_CONFIG,
    PostprocessConfig,
    candidates_to_detections,
    check_outputs_against_card,
    decode_ultralytics_detect,
    postprocess_detect,
    postprocess_semantic,
    segment_mask_logits,
)
from streamdet.preprocess_ops import preprocess_batch
from training.cli_common import remove_leftovers
from training.coco_eval import (
    IouType,
    detections_to_coco,
    evaluate_coco,
    plot_pr_curves,
    round_result,
    run_cocoeval,
    summarize_cocoeval,
)
from training.dataset import CocoDataset, DatasetError, load_coco_dataset
from training.metrics import confusion_matrix, iou_per_class, mean_iou

__all__ = [
    "EvaluationError", "IouType", "detections_to_coco", "evaluate_coco", "evaluate_model", "iou_per_class", "main",
    "miou", "plot_pr_curves", "run_cocoeval", "semantic_confusion", "summarize_cocoeval",
]


class EvaluationError(ValueError):
    """Bad input to the evaluator; the message is ``<path>: <problem>``."""


def semantic_confusion(
    pred_map: npt.NDArray[np.integer[Any]], gt_map: npt.NDArray[np.integer[Any]], num_classes: int
) -> npt.NDArray[np.int64]:
    """Confusion matrix of one semantic map.

    Args:
        pred_map: ``(H, W)`` predicted class ids.
        gt_map: ``(H, W)`` ground-truth class ids; pixels with id ``>= num_classes`` (e.g. 255) are ignored.
        num_classes: ``C`` (including background).

    Returns:
        ``(C, C)`` int64 counts, rows = ground truth, columns = prediction.

    Raises:
        ValueError: on different shapes or predicted ids ``>= num_classes``.
    """
    p = np.asarray(pred_map)
    g = np.asarray(gt_map)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"expected two (H, W) maps of one size, got {p.shape} and {g.shape}")
    return confusion_matrix(p, g, num_classes, ignore_index=num_classes)


def miou(
    pred_maps: Iterable[npt.NDArray[np.integer[Any]]],
    gt_maps: Iterable[npt.NDArray[np.integer[Any]]],
    num_classes: int,
) -> float:
    """Mean IoU over classes, accumulated over all pixels of all maps.

    Each class's IoU is its dataset-wide ``TP / (TP + FP + FN)``; the mean is over the classes
    (background included) that appear in the ground truth or the prediction at least once,
    like mmsegmentation's ``mIoU`` (``nanmean``). Ground-truth ids ``>= num_classes`` are ignored.

    Args:
        pred_maps: ``(H, W)`` predicted class maps.
        gt_maps: matching ``(H, W)`` ground-truth maps.
        num_classes: ``C`` (including background).

    Returns:
        mIoU in ``[0, 1]`` (NaN when no pixel was counted).

    Raises:
        ValueError: on mismatched maps or map counts.
    """
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    preds, gts = list(pred_maps), list(gt_maps)
    if len(preds) != len(gts):
        raise ValueError(f"expected as many predicted as ground-truth maps, got {len(preds)} and {len(gts)}")
    for p, g in zip(preds, gts, strict=True):
        cm += semantic_confusion(p, g, num_classes)
    return mean_iou(cm)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        remove_leftovers(tmp)


def _load_card_for(model_path: Path, card_path: Path | None, engine: OnnxRuntimeEngine) -> tuple[ModelCard, str]:
    """The model's card and where it came from (a path, or the ONNX metadata)."""
    if card_path is not None:
        return load_card(card_path), str(card_path)
    beside = card_path_for(model_path)
    if beside.is_file():
        return load_card(beside), str(beside)
    try:
        card = card_from_ultralytics_metadata(engine.metadata, engine.input_name, engine.input_shape,
                                              list(engine.output_names), engine.output_shapes, name=model_path.stem)
    except ModelCardError as e:
        raise EvaluationError(f"{model_path}: no model card at {beside} and {e}") from e
    return card, "(ultralytics metadata)"


def _output_order(engine: OnnxRuntimeEngine, card: ModelCard) -> list[int]:
    """Positions of the card's outputs in the engine's output list (positional when names differ)."""
    names = list(engine.output_names)
    want = list(card.head.outputs)
    if len(want) == len(names) and set(want) == set(names):
        return [names.index(n) for n in want]
    return list(range(len(names)))


def _check_input(model_path: Path, engine: OnnxRuntimeEngine, card: ModelCard) -> None:
    shape = engine.input_shape
    if len(shape) != 4:
        raise EvaluationError(f"{model_path}: expected a 4-D NCHW input, got shape {shape}")
    h, w = shape[2], shape[3]
    if (isinstance(h, int) and h != card.input.height) or (isinstance(w, int) and w != card.input.width):
        raise EvaluationError(f"{model_path}: model input is {w}x{h} (WxH) but the card says "
                              f"{card.input.width}x{card.input.height}")


def _segm_results(
    out0: npt.NDArray[Any], protos: npt.NDArray[Any], card: ModelCard, cfg: PostprocessConfig, lbs: Sequence[Any],
    image_ids: Sequence[int], category_ids: Sequence[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Box and mask COCO results of one segment batch (masks straight to RLE, no frame-sized arrays)."""
    nc, nm = card.head.num_classes, card.head.num_mask_coeffs
    boxes_json: list[dict[str, Any]] = []
    masks_json: list[dict[str, Any]] = []
    cands = decode_ultralytics_detect(out0, num_classes=nc, cfg=cfg)
    for b, (cand, lb, image_id) in enumerate(zip(cands, lbs, image_ids, strict=True)):
        det = candidates_to_detections(cand, lb)
        boxes_json.extend(detections_to_coco(det, image_id, category_ids))
        logits = segment_mask_logits(out0[b], protos[b], cand, num_classes=nc, num_mask_coeffs=nm)
        rles = prototype_masks_to_rle(logits, det.boxes_xyxy, lb, cfg.mask_threshold)
        for rle, sc, c in zip(rles, det.scores.tolist(), det.class_ids.tolist(), strict=True):
            masks_json.append({"image_id": image_id, "category_id": int(category_ids[c]), "segmentation": rle,
                               "score": round_result(sc, 5)})
    return boxes_json, masks_json


def evaluate_model(
    *,
    model_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    card_path: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    max_images: int | None = None,
    cfg: PostprocessConfig = EVAL_CONFIG,
    plot_path: str | os.PathLike[str] | None = None,
    intra_op_threads: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an ONNX model on a dataset directory.

    Args:
        model_path: the ``.onnx`` model.
        data_dir: dataset directory (``annotations.json``, ``images/``, ``semantic/``; see
            ``training.dataset``).
        card_path: model card (default: ``MODEL.json`` beside the model, else the ultralytics
            metadata inside the ONNX file).
        batch_size: images per inference batch (a model with a fixed batch size uses its own).
        max_images: evaluate only the first ``max_images`` images (in annotation-file order).
        cfg: postprocess settings (default :data:`~streamdet.postprocess.EVAL_CONFIG`).
        plot_path: where to save a precision-recall plot (detect and segment models).
        intra_op_threads: ONNX Runtime threads (0: one per core).
        show_progress: show a progress bar on stderr.

    Returns:
        ``{"task", "model", "data", "images", "summary", ...}``: for detect models ``"bbox"`` (see
        :func:`summarize_cocoeval`), plus ``"segm"`` for segment models; for semantic models
        ``"mIoU"`` and ``"per_class_IoU"``. ``"summary"`` is the final metrics line.

    Raises:
        EvaluationError: on bad input (missing or malformed dataset, model, card, or a card that
            contradicts the model or the dataset); the message is ``<path>: <problem>``.
    """
    model = Path(model_path)
    if batch_size < 1:
        raise EvaluationError(f"--batch: expected a positive batch size, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise EvaluationError(f"--max-images: expected a positive count, got {max_images}")
    try:
        ds = load_coco_dataset(data_dir)
    except DatasetError as e:
        raise EvaluationError(str(e)) from e
    ann_path = ds.root / "annotations.json"
    images = list(ds.coco["images"])[: max_images if max_images is not None else None]
    if not images:
        raise EvaluationError(f"{ann_path}: no images to evaluate")

    engine = OnnxRuntimeEngine(model_path=model, intra_op_threads=intra_op_threads)
    try:
        engine.start()
    except EngineError as e:
        raise EvaluationError(str(e)) from e
    try:
        try:
            card, card_src = _load_card_for(model, Path(card_path) if card_path is not None else None, engine)
        except ModelCardError as e:
            raise EvaluationError(str(e)) from e
        order = _output_order(engine, card)
        try:
            check_outputs_against_card(card, [engine.output_shapes[i] for i in order],
                                       [engine.output_names[i] for i in order])
        except ModelCardError as e:
            raise EvaluationError(f"{model}: model outputs contradict the model card {card_src}: {e}") from e
        _check_input(model, engine, card)
        return _evaluate_loop(ds, images, engine, order, card, model, batch_size, cfg, plot_path, show_progress)
    finally:
        engine.stop()


def _evaluate_loop(
    ds: CocoDataset, images: list[dict[str, Any]], engine: OnnxRuntimeEngine, order: list[int], card: ModelCard,
    model: Path, batch_size: int, cfg: PostprocessConfig, plot_path: str | os.PathLike[str] | None,
    show_progress: bool,
) -> dict[str, Any]:
    ann_path = ds.root / "annotations.json"
    task = card.task
    n_cls = card.head.num_classes
    cats = sorted(ds.coco["categories"], key=lambda c: c["id"])
    if task is Task.SEMANTIC:
        if n_cls != len(cats) + 1:
            raise EvaluationError(f"{ann_path}: dataset has {len(cats)} categories (+ background = "
                                  f"{len(cats) + 1}), semantic model card has {n_cls} classes")
    elif n_cls != len(cats):
        raise EvaluationError(f"{ann_path}: dataset has {len(cats)} categories, model card has {n_cls} classes")
    category_ids = [int(c["id"]) for c in cats]
    fixed = engine.input_shape[0] if isinstance(engine.input_shape[0], int) and engine.input_shape[0] > 0 else None
    bs = fixed or batch_size
    box_results: list[dict[str, Any]] = []
    mask_results: list[dict[str, Any]] = []
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    bar = tqdm(total=len(images), desc="evaluate", unit="img", disable=not show_progress or None, file=sys.stderr)
    try:
        for start in range(0, len(images), bs):
            chunk = images[start : start + bs]
            try:
                rgb = [ds.read_image_rgb(im) for im in chunk]
            except DatasetError as e:
                raise EvaluationError(str(e)) from e
            x, lbs = preprocess_batch(rgb, card)
            if fixed is not None and x.shape[0] < fixed:
                x = np.concatenate([x, np.zeros((fixed - x.shape[0], *x.shape[1:]), dtype=x.dtype)])
            try:
                raw = engine.infer(x)
            except Exception as e:  # onnxruntime raises several private exception types
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EvaluationError(f"{model}: inference failed ({msg[:200]})") from e
            outs = [raw[i][: len(chunk)] for i in order]
            ids = [int(im["id"]) for im in chunk]
            try:
                if task is Task.SEMANTIC:
                    for d, im in zip(postprocess_semantic(outs, lbs, card), chunk, strict=True):
                        gt_map = ds.read_semantic(im)
                        assert d.semantic is not None
                        if gt_map.shape != d.semantic.shape:
                            raise EvaluationError(f"{ds.semantic_path(im)}: expected a {d.semantic.shape} class map "
                                                  f"like its image, got {gt_map.shape}")
                        confusion += semantic_confusion(d.semantic, gt_map, n_cls)
                elif task is Task.SEGMENT:
                    bj, mj = _segm_results(outs[0], outs[1], card, cfg, lbs, ids, category_ids)
                    box_results.extend(bj)
                    mask_results.extend(mj)
                else:
                    for d, image_id in zip(postprocess_detect(outs, lbs, card, cfg), ids, strict=True):
                        box_results.extend(detections_to_coco(d, image_id, category_ids))
            except DatasetError as e:
                raise EvaluationError(str(e)) from e
            bar.update(len(chunk))
    finally:
        bar.close()

    result: dict[str, Any] = {"task": task.value, "model": str(model), "data": str(ds.root), "images": len(images)}
    if task is Task.SEMANTIC:
        ious = iou_per_class(confusion)
        m = mean_iou(confusion)
        names = ["background", *[str(c["name"]) for c in cats]]
        result["mIoU"] = None if math.isnan(m) else m
        result["per_class_IoU"] = {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, ious, strict=True)}
        result["summary"] = f"mIoU={_fmt(result['mIoU'])}"
        return result
    result["postprocess"] = {"score_threshold": cfg.score_threshold, "iou_threshold": cfg.iou_threshold,
                             "max_detections": cfg.max_detections, "multi_label": cfg.multi_label}
    ids_sel = {int(im["id"]) for im in images}
    gt = {**ds.coco, "images": images, "annotations": [a for a in ds.coco["annotations"] if a["image_id"] in ids_sel]}
    try:
        ev_box = run_cocoeval(gt, box_results, IouType.BBOX)
        result["bbox"] = summarize_cocoeval(ev_box, gt, IouType.BBOX)
        evals: dict[str, COCOeval | None] = {"box": ev_box}
        summary = f"mAP50-95={_fmt(result['bbox']['mAP50-95'])} mAP50={_fmt(result['bbox']['mAP50'])}"
        if task is Task.SEGMENT:
            ev_mask = run_cocoeval(gt, mask_results, IouType.SEGM)
            result["segm"] = summarize_cocoeval(ev_mask, gt, IouType.SEGM)
            evals["mask"] = ev_mask
            summary += f" mask_mAP50-95={_fmt(result['segm']['mAP50-95'])} mask_mAP50={_fmt(result['segm']['mAP50'])}"
    except ValueError as e:
        raise EvaluationError(f"{ann_path}: {e}") from e
    result["summary"] = summary
    if plot_path is not None:
        plot_pr_curves(evals, plot_path)
    return result


def _fmt(v: float | None) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _print_report(result: Mapping[str, Any]) -> None:
    print(f"model {result['model']}  data {result['data']}  images {result['images']}  task {result['task']}")
    if result["task"] == Task.SEMANTIC.value:
        print(f"{'class':<16}{'IoU':>8}")
        for name, v in result["per_class_IoU"].items():
            print(f"{name:<16}{_fmt(v):>8}")
    else:
        for key, label in (("bbox", "box"), ("segm", "mask")):
            if key not in result:
                continue
            m = result[key]
            print(f"{label}: mAP@[.5:.95]={_fmt(m['mAP50-95'])} mAP50={_fmt(m['mAP50'])} mAP75={_fmt(m['mAP75'])} "
                  f"AR100={_fmt(m['AR100'])}")
            print(f"{'class':<16}{'AP50-95':>9}{'AP50':>8}")
            for name, ap in m["per_class"].items():
                print(f"{name:<16}{_fmt(ap['AP50-95']):>9}{_fmt(ap['AP50']):>8}")
    print(result["summary"])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point.

    Args:
        argv: command-line arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 1 on bad input (one ``error: <path>: <problem>`` line on stderr), 2 on a bad
        argument (one ``error:`` line naming it).
    """
    ap = OneLineErrorParser(prog="python -m training.evaluate",
                            description="COCO mAP (pycocotools) or mIoU of an ONNX model on a dataset directory.")
    ap.add_argument("--model", required=True, type=Path, help="ONNX model")
    ap.add_argument("--data", required=True, type=Path, help="dataset directory (annotations.json, images/, semantic/)")
    ap.add_argument("--card", type=Path, default=None, help="model card (default: MODEL.json beside the model)")
    ap.add_argument("--batch", type=positive_int, default=8, help="images per batch")
    ap.add_argument("--plot", type=Path, default=None, help="save a precision-recall plot (PNG)")
    ap.add_argument("--max-images", type=positive_int, default=None, help="evaluate only the first N images")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the metrics as JSON")
    ap.add_argument("--conf", type=finite_float(ge=0, le=1), default=EVAL_CONFIG.score_threshold,
                    help="score threshold (0..1)")
    ap.add_argument("--iou", type=finite_float(ge=0, le=1), default=EVAL_CONFIG.iou_threshold,
                    help="NMS IoU threshold (0..1)")
    ap.add_argument("--single-label", action="store_true",
                    help="one candidate per anchor (its best class) instead of one per class above --conf")
    ap.add_argument("--threads", type=non_negative_int, default=0,
                    help="ONNX Runtime intra-op threads (0: one per core)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--text", action="store_true",
                    help="also read each plate crop's text and report exact match (plate_chars sets)")
    ap.add_argument("--min-score", type=finite_float(ge=0, le=1), default=0.25,
                    help="--text: score a character needs to be read (0..1)")
    return run_tool(ap, _run, argv, errors=(EvaluationError,))


def _run(args: argparse.Namespace) -> None:
    """Evaluate as the CLI's arguments say, print the report, and write ``--json-out``."""
    try:
        cfg = dataclasses.replace(EVAL_CONFIG, score_threshold=args.conf, iou_threshold=args.iou,
                                  multi_label=not args.single_label)
    except ValueError as e:
        raise EvaluationError(f"--conf/--iou: {e}") from e
    try:
        result = evaluate_model(model_path=args.model, data_dir=args.data, card_path=args.card,
                                batch_size=args.batch, max_images=args.max_images, cfg=cfg, plot_path=args.plot,
                                intra_op_threads=args.threads, show_progress=not args.quiet)
        if args.text:
            from training.plates_text import text_accuracy

            try:
                t = text_accuracy(model_path=args.model, data_dir=args.data, card_path=args.card,
                                  min_score=args.min_score, intra_op_threads=args.threads,
                                  show_progress=not args.quiet)
            except ValueError as e:
                raise EvaluationError(str(e)) from e
            result["text"] = t
            result["summary"] += f" text_exact={_fmt(t['text_exact'])} text_exact_24px={_fmt(t['text_exact_large'])}"
        if args.json_out is not None:
            _write_json_atomic(args.json_out, result)
    except OSError as e:
        raise EvaluationError(f"{e.filename or args.json_out}: cannot write ({e.strerror or e})") from e
    _print_report(result)


if __name__ == "__main__":
    raise SystemExit(main())
