"""INT8 / FP16 against FP32: mAP@[.5:.95] on the held-out set and ONNX Runtime CPU speed, in one run.

    python bench/quant_bench.py [--model engines/models/detector.onnx] [--data data/val]
        [--source pipeline/samples/demo.mp4] [--frames 64] [--images 300] [--threads 2] [--keep DIR]

Calibrates the model with ``engines.deploy.calibrate`` (INT8 Q/DQ for TensorRT, INT8 U8S8 for the
ONNX Runtime CPU, FP16), evaluates all of them with ``training.evaluate.evaluate_model`` (same
preprocess, postprocess and COCO mAP as everywhere else) and times ONNX Runtime on one
preprocessed batch of held-out images, the models interleaved in one loop so they share the
machine's load. The last line is::

    int8_vs_fp32_map=-0.42 fp16_vs_fp32_map=0.00 int8_speed_ratio=0.61 int8cpu_speed_ratio=1.93

``*_map`` are differences in mAP points (100 x mAP@[.5:.95], variant minus FP32); ``*_speed_ratio``
are FP32 time / variant time per batch on the CPU (above 1: the variant is faster). ``int8`` is the
symmetric Q/DQ model meant for TensorRT (its speed on the CPU is not what it is for); ``int8cpu``
is the ``--target cpu`` model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from engines.deploy.calibrate import main as calibrate_main
    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from streamdet.card import load_card
    from streamdet.preprocess_ops import preprocess_batch
    from training.dataset import load_coco_dataset
    from training.evaluate import EvaluationError, evaluate_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "engines" / "models" / "detector.onnx"))
    p.add_argument("--data", default=str(ROOT / "data" / "val"))
    p.add_argument("--source", action="append", default=None, help="calibration video/dir (default: the demo video)")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--images", type=int, default=300, help="held-out images to evaluate")
    p.add_argument("--batch", type=int, default=8, help="batch for evaluation and timing")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--speed-iters", type=int, default=10)
    p.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    p.add_argument("--keep", default=None, help="write the variants to this directory (default: a temporary one)")
    args = p.parse_args(argv)

    model = Path(args.model)
    if not model.is_file():
        print(f"error: {model}: model not found", file=sys.stderr)
        return 1
    sources = args.source or [str(ROOT / "pipeline" / "samples" / "demo.mp4")]
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        variants = {"fp32": model, "int8": out / f"{model.stem}.int8.onnx", "fp16": out / f"{model.stem}.fp16.onnx",
                    "int8cpu": out / f"{model.stem}.int8cpu.onnx"}
        src_args = [a for s in sources for a in ("--source", s)]
        common = [str(model), *src_args, "--frames", str(args.frames), "--method", args.method]
        t0 = time.perf_counter()
        if calibrate_main([*common, "--out-int8", str(variants["int8"]), "--out-fp16", str(variants["fp16"])]) != 0:
            return 1
        if calibrate_main([*common, "--out-int8", str(variants["int8cpu"]), "--target", "cpu"]) != 0:
            return 1
        print(f"calibration: {time.perf_counter() - t0:.1f} s")

        maps: dict[str, float] = {}
        card_path = model.with_suffix(".json")
        for name, path in variants.items():
            try:
                r = evaluate_model(model_path=path, data_dir=args.data, card_path=card_path, batch_size=args.batch,
                                   max_images=args.images, intra_op_threads=args.threads, show_progress=False)
            except EvaluationError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            maps[name] = 100.0 * float(r["bbox"]["mAP50-95"] or 0.0)
            print(f"{name:8s} mAP50-95={maps[name]:.2f}  ({r['images']} images)")

        card = load_card(card_path)
        ds = load_coco_dataset(args.data)
        imgs = [ds.read_image_rgb(im) for im in list(ds.coco["images"])[: args.batch]]
        x, _ = preprocess_batch(imgs, card)
        engines = {n: OnnxRuntimeEngine(model_path=pth, intra_op_threads=args.threads) for n, pth in variants.items()}
        times: dict[str, list[float]] = {n: [] for n in engines}
        for eng in engines.values():
            eng.start()
            eng.infer(x)  # warm-up
        for _ in range(args.speed_iters):
            for n, eng in engines.items():
                t = time.perf_counter()
                eng.infer(x)
                times[n].append(time.perf_counter() - t)
        for eng in engines.values():
            eng.stop()
        med = {n: statistics.median(v) for n, v in times.items()}
        for n, v in med.items():
            print(f"{n:8s} {1000 * v / x.shape[0]:.1f} ms/image (ONNX Runtime CPU, {args.threads} threads, "
                  f"batch {x.shape[0]}, median of {args.speed_iters})")
    print(f"int8_vs_fp32_map={maps['int8'] - maps['fp32']:.2f} fp16_vs_fp32_map={maps['fp16'] - maps['fp32']:.2f} "
          f"int8_speed_ratio={med['fp32'] / med['int8']:.2f} int8cpu_speed_ratio={med['fp32'] / med['int8cpu']:.2f} "
          f"int8cpu_vs_fp32_map={maps['int8cpu'] - maps['fp32']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
