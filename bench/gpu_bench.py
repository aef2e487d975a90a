"""GPU path throughput: end-to-end fps vs engine-only fps, and GPU preprocess + NMS cost per frame.

    python bench/gpu_bench.py [--model engines/models/detector.onnx] [--backend tensorrt|cuda]
        [--batches 1,8,32] [--iters 50] [--device cuda]
    python bench/gpu_bench.py --device cpu --backend cuda --model M.onnx --batches 1,2 --iters 2   # smoke test

Per batch size ``B`` on 1280x720 frames (the bundled demo video's):

* engine-only: ``infer_device`` on a letterboxed batch already on the GPU;
* end-to-end: host RGB frames -> CUDA frame slots (``pipeline.gpu.cuda_slotpool``, one upload per
  frame) -> GPU letterbox + normalize (``pipeline.gpu.gpu_preprocess``) -> engine -> GPU NMS and
  letterbox undo (``pipeline.gpu.gpu_nms``) -> detections on the host; video decoding is not
  included (PyAV decodes on the CPU in the pipeline, in parallel processes);
* per-frame costs of the upload, the GPU preprocess and the NMS (CUDA events on the GPU).

One line per batch size::

    batch=8 engine_fps=… e2e_fps=… e2e_vs_engine=0.93 upload_ms=… preprocess_ms=… nms_ms=… detections=…

It needs a CUDA GPU (and TensorRT for ``--backend tensorrt``); without one it says so and exits 1.
``--device cpu`` runs the same code on the CPU (``--backend cuda`` runs the ``.pt2`` program,
``--backend onnxruntime`` the ONNX) as a smoke test; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class _Timer:
    """Wall time on the CPU, CUDA events on the GPU (milliseconds)."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, t0: Any) -> float:
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return float(t0.elapsed_time(ev))
        return 1000.0 * (time.perf_counter() - t0)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


class _HostEngineOnDevice:
    """ONNX Runtime behind ``infer_device`` (CPU smoke test only): tensor -> numpy -> ORT -> tensor."""

    def __init__(self, engine: Any, torch: Any) -> None:
        self.engine, self.torch = engine, torch

    def infer_device(self, batch: Any) -> list[Any]:
        return [self.torch.from_numpy(o) for o in self.engine.infer(batch.numpy())]


def _demo_frames(n: int, frame_wh: tuple[int, int]) -> list[Any]:
    """``n`` RGB frames of the demo video (looped), resized to ``frame_wh`` if it differs."""
    import av
    import cv2

    frames = []
    with av.open(str(ROOT / "pipeline" / "samples" / "demo.mp4")) as c:
        for f in c.decode(video=0):
            img = f.to_ndarray(format="rgb24")
            if (img.shape[1], img.shape[0]) != frame_wh:
                img = cv2.resize(img, frame_wh, interpolation=cv2.INTER_LINEAR)
            frames.append(img)
            if len(frames) >= n:
                break
    while len(frames) < n:
        frames.extend(frames[: n - len(frames)])
    return frames


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from engines.base import Backend, EngineError
    from engines.select import select_engine, tensorrt_available
    from pipeline.gpu.cuda_slotpool import CudaFramePool
    from pipeline.gpu.gpu_nms import postprocess_detect_torch
    from pipeline.gpu.gpu_preprocess import GpuLetterbox
    from streamdet.card import load_card
    from streamdet.postprocess import PostprocessConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "engines" / "models" / "detector.onnx"))
    p.add_argument("--backend", default=None, choices=[b.value for b in Backend],
                   help="default: tensorrt when TensorRT imports, else cuda")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (smoke test)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--frame-wh", default="1280x720")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here (torch.cuda.is_available() is False): bench/gpu_bench.py measures the GPU "
              "path; --device cpu runs it on the CPU as a smoke test only", file=sys.stderr)
        return 1
    model = Path(args.model)
    if not model.with_suffix(".json").is_file():
        print(f"error: {model.with_suffix('.json')}: model card not found", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    fw, fh = (int(v) for v in args.frame_wh.lower().split("x"))
    backend = Backend(args.backend) if args.backend else (Backend.TENSORRT if tensorrt_available() else Backend.CUDA)
    card = load_card(model.with_suffix(".json"))
    try:
        engine: Any = select_engine(backend, args.device, model)
        engine.start()
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    runner = engine if hasattr(engine, "infer_device") else _HostEngineOnDevice(engine, torch)
    max_b = max(batches)
    if getattr(engine, "max_batch", 0) and max_b > engine.max_batch:
        print(f"error: {model}: the engine takes at most batch {engine.max_batch}, asked for {max_b}", file=sys.stderr)
        return 1
    host_frames = _demo_frames(max_b, (fw, fh))
    pool = CudaFramePool.create(name="bench", num_slots=max_b + 2, frame_hw=(fh, fw), device=args.device)
    letterbox = GpuLetterbox(card=card, max_batch=max_b, device=device)
    cfg = PostprocessConfig()
    timer = _Timer(torch, device)
    nc = card.head.num_classes
    print(f"backend {backend.value} device {device} model {model.name} frames {fw}x{fh} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU smoke test'})")

    for b in batches:
        frames = host_frames[:b]

        def e2e(record: dict[str, list[float]] | None, frames: list[Any] = frames, b: int = b) -> int:
            t = timer.start()
            slots = []
            for f in frames:
                s = pool.acquire()
                assert s is not None
                pool.write(s, f)
                slots.append(s)
            t_up = timer.stop(t)
            t = timer.start()
            assert pool.ring is not None
            x, lbs = letterbox([pool.ring[s] for s in slots])
            t_pre = timer.stop(t)
            outs = runner.infer_device(x)
            t = timer.start()
            dets = postprocess_detect_torch(outs[0], lbs, num_classes=nc, cfg=cfg)
            t_nms = timer.stop(t)
            for s in slots:
                pool.release(s)
            if record is not None:
                record["upload"].append(t_up / b)
                record["pre"].append(t_pre / b)
                record["nms"].append(t_nms / b)
            return sum(len(d) for d in dets)

        for _ in range(args.warmup):
            e2e(None)
        rec: dict[str, list[float]] = {"upload": [], "pre": [], "nms": []}
        timer.sync()
        t0 = time.perf_counter()
        n_det = 0
        for _ in range(args.iters):
            n_det += e2e(rec)
        timer.sync()
        e2e_fps = b * args.iters / (time.perf_counter() - t0)

        # engine only, on a letterboxed batch already on the device
        x, _ = letterbox([pool.ring[s] for s in range(b)]) if pool.ring is not None else (None, None)
        for _ in range(args.warmup):
            runner.infer_device(x)
        timer.sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            runner.infer_device(x)
        timer.sync()
        engine_fps = b * args.iters / (time.perf_counter() - t0)
        print(f"batch={b} engine_fps={engine_fps:.1f} e2e_fps={e2e_fps:.1f} e2e_vs_engine={e2e_fps / engine_fps:.2f} "
              f"upload_ms={statistics.median(rec['upload']):.3f} preprocess_ms={statistics.median(rec['pre']):.3f} "
              f"nms_ms={statistics.median(rec['nms']):.3f} detections={n_det / (b * args.iters):.1f}/frame")
    engine.stop()
    pool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
