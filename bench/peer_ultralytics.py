"""The ultralytics side of ``bench/peer_bench.py``: run inside the ultralytics virtual environment.

    VENV/bin/python bench/peer_ultralytics.py predict --model M.onnx --source V.mp4 --out OUT.jsonl [--frames N]
    VENV/bin/python bench/peer_ultralytics.py train-export --data DATA.yaml --out OUT.onnx [--minutes 20]

``predict`` runs ``YOLO(model, task="detect").predict(source, stream=True, ...)`` and writes one JSON
line per frame: ``{"frame_index": i, "detections": [[x1, y1, x2, y2, score, class_id], ...]}`` in
frame pixels at full float32 precision, then one summary line ``{"summary": ...}`` (frames, the
letterboxed input size ultralytics chose, its mean per-image preprocess / inference /
postprocess milliseconds).

``train-export`` builds ``yolov8n.yaml`` (no weights: nothing is downloaded), trains it on a
YOLO-format dataset for a time budget on the CPU (ultralytics' own trainer and defaults, but one
warm-up epoch, images cached in memory and no validation until the end) and
exports it with ``format=onnx dynamic=True imgsz=640``: a genuine ultralytics export with
dynamic batch, height and width.

This file imports nothing from streamdet (the virtual environment does not have it). It is kept
offline: ``YOLO_OFFLINE=1`` (no online checks, no analytics), ``YOLO_AUTOINSTALL=false`` (no
``pip install`` at run time) and the font check (``Arial.ttf``, used only for plots, which are
off) skipped. ``YOLO_CONFIG_DIR`` is set by the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


def _no_downloads() -> None:
    """Keep ultralytics from reaching the network (fonts are only needed for plots, which are off)."""
    import ultralytics.data.utils as data_utils
    import ultralytics.utils.checks as checks

    def no_font(font: str = "Arial.ttf") -> None:
        return None

    checks.check_font = no_font
    data_utils.check_font = no_font  # type: ignore[attr-defined]


def _set_ort_threads(threads: int) -> None:
    """Give every ONNX Runtime session ``threads`` intra-op threads (0: ONNX Runtime's default, as ultralytics)."""
    if threads <= 0:
        return
    import onnxruntime as ort

    original = ort.InferenceSession.__init__

    def init(self: Any, path_or_bytes: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> None:
        if sess_options is None:
            sess_options = ort.SessionOptions()
        sess_options.intra_op_num_threads = threads
        original(self, path_or_bytes, sess_options, *args, **kwargs)

    ort.InferenceSession.__init__ = init  # type: ignore[method-assign]


def predict(args: argparse.Namespace) -> int:
    """Run ultralytics' streaming predictor over a video and write the boxes of every frame."""
    from ultralytics import YOLO
    from ultralytics.data import augment

    _no_downloads()
    _set_ort_threads(args.threads)
    shapes: list[tuple[int, ...]] = []
    letterbox_call = augment.LetterBox.__call__

    def recording_call(self: Any, *a: Any, **kw: Any) -> Any:
        out = letterbox_call(self, *a, **kw)
        if not shapes and hasattr(out, "shape"):
            shapes.append(tuple(out.shape))
        return out

    augment.LetterBox.__call__ = recording_call  # type: ignore[method-assign]
    model = YOLO(args.model, task="detect")
    kwargs: dict[str, Any] = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "verbose": False,
                              "device": "cpu"}
    if args.imgsz:
        kwargs["imgsz"] = args.imgsz
    if args.no_rect:  # a model with a static input size: always the full letterbox (a dynamic batch axis alone
        kwargs["rect"] = False  # makes ultralytics letterbox to the minimum rectangle, which such a model rejects)
    n = 0
    speed = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
    with open(args.out, "w") as out:
        for r in model.predict(source=args.source, stream=True, **kwargs):
            b = r.boxes
            rows = [[*map(float, xyxy), float(s), int(c)]
                    for xyxy, s, c in zip(b.xyxy.tolist(), b.conf.tolist(), b.cls.tolist())]
            out.write(json.dumps({"frame_index": n, "detections": rows}) + "\n")
            for k in speed:
                speed[k] += float(r.speed.get(k) or 0.0)
            n += 1
            if args.frames and n >= args.frames:
                break
        hw = list(shapes[0][:2]) if shapes else None
        out.write(json.dumps({"summary": {"frames": n, "input_hw": hw,
                                          "ms_per_image": {k: v / max(n, 1) for k, v in speed.items()}}}) + "\n")
    return 0


def train_export(args: argparse.Namespace) -> int:
    """Train ``yolov8n.yaml`` from scratch for a few minutes, export a dynamic ONNX to ``args.out``."""
    from ultralytics import YOLO

    _no_downloads()
    work = Path(args.out).parent / "train"
    t0 = time.monotonic()
    model = YOLO("yolov8n.yaml", task="detect")
    model.train(data=args.data, imgsz=args.imgsz, epochs=args.epochs, time=args.minutes / 60.0, batch=16,
                workers=args.workers, device="cpu", project=str(work), name="run", exist_ok=True, plots=False,
                amp=False, seed=args.seed, deterministic=True, val=False, cache=True, warmup_epochs=1,
                verbose=False)
    trained = YOLO(str(work / "run" / "weights" / "last.pt"))
    exported = Path(trained.export(format="onnx", dynamic=True, imgsz=640, simplify=True))
    shutil.move(str(exported), args.out)
    print(json.dumps({"exported": args.out, "seconds": round(time.monotonic() - t0, 1)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="ultralytics predict(stream=True) over a video, boxes to JSONL")
    pr.add_argument("--model", required=True)
    pr.add_argument("--source", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--conf", type=float, default=0.25)
    pr.add_argument("--iou", type=float, default=0.7)
    pr.add_argument("--max-det", type=int, default=300)
    pr.add_argument("--imgsz", type=int, nargs="+", default=None, help="H W (default: the model's metadata)")
    pr.add_argument("--no-rect", action="store_true", help="rect=False: always letterbox to the full imgsz")
    pr.add_argument("--frames", type=int, default=0, help="stop after N frames (0: all)")
    pr.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    tr = sub.add_parser("train-export", help="train yolov8n.yaml briefly, export ONNX with dynamic axes")
    tr.add_argument("--data", required=True, help="dataset YAML (YOLO format)")
    tr.add_argument("--out", required=True, help="where the exported .onnx goes")
    tr.add_argument("--imgsz", type=int, default=320)
    tr.add_argument("--epochs", type=int, default=100, help="upper bound; the time budget decides")
    tr.add_argument("--minutes", type=float, default=20.0, help="training time budget (ultralytics time=)")
    tr.add_argument("--workers", type=int, default=1)
    tr.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        return predict(args) if args.cmd == "predict" else train_export(args)
    except Exception as e:  # noqa: BLE001 - one error line for the parent
        print(f"error: ultralytics {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
