"""Engine-only speed of a model: ONNX Runtime on CPU, real letterboxed frames, one batch size.

    python bench/engine_bench.py [--model engines/models/detector.onnx] [--video PATH] [--batch 1] [--threads 0]

Prints the median and p90 latency per batch, frames per second, and the model card's params and
GFLOPs; the last line is machine-readable: ``engine_fps=X ms_per_frame=Y batch=B threads=T``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.onnxruntime_backend import OnnxRuntimeEngine  # noqa: E402
from streamdet.card import card_path_for, load_card  # noqa: E402
from streamdet.preprocess_ops import preprocess_batch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "engines" / "models" / "detector.onnx")
    ap.add_argument("--video", type=Path, default=ROOT / "pipeline" / "samples" / "demo.mp4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    card = load_card(card_path_for(args.model))
    with av.open(str(args.video)) as c:
        frames: list[Any] = [f.to_ndarray(format="rgb24") for _, f in zip(range(32), c.decode(video=0))]
    batches = [preprocess_batch([frames[(i + k) % len(frames)] for k in range(args.batch)], card)[0]
               for i in range(0, len(frames), args.batch)]
    with OnnxRuntimeEngine(model_path=args.model, intra_op_threads=args.threads) as engine:
        for b in batches[:3]:
            engine.infer(b)  # warm-up
        times = []
        for i in range(args.iters):
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            engine.infer(b)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    p90 = float(np.percentile(times, 90))
    ms_per_frame = 1000 * med / args.batch
    print(f"model {args.model.name}: params={card.params} GFLOPs={card.gflops} input_wh={card.input_wh}")
    print(f"batch {args.batch}: median {1000 * med:.2f} ms, p90 {1000 * p90:.2f} ms per batch over {args.iters} runs")
    print(f"engine_fps={1000 / ms_per_frame:.1f} ms_per_frame={ms_per_frame:.2f} "
          f"batch={args.batch} threads={args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
