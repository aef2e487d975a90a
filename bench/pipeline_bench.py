"""Pipeline throughput against a naive loop and against the engine alone, on the same model and frames.

    python bench/pipeline_bench.py --video PATH [--model MODEL.onnx] [--frames N] [--rounds R] [--profile]
                                   [--placement MODE] [--soak LOOPS]

Measured in one run, on the first ``N`` frames of the video:

(a) the pipeline (``pipeline.runner.Pipeline``, no sinks; decoders placed per ``decode.placement``), fps from
    the go signal to the last frame out of postprocess (process start-up excluded);
(b) a naive single-process loop: ``cv2.VideoCapture`` -> ``cv2.resize`` -> ONNX Runtime ->
    ``cv2.dnn.NMSBoxes``, one frame at a time;
(c) the engine alone (``engines.onnxruntime_backend.OnnxRuntimeEngine``, same batch size, same
    concurrent batches and threads per run as the pipeline's engine: ``engine.concurrent_batches``
    instances, each on its own thread taking the next batch) on frames decoded and letterboxed
    beforehand.

``--concurrent N`` sets ``engine.concurrent_batches`` for (a) and (c) (default: the setting, auto
2 on a CPU with 2 or more cores); ``--threads`` sets ``engine.intra_op_threads``.

``--masks on|off|compare`` (segment and semantic models): the pipeline runs with
``postprocess.masks`` on, off, or both (``compare``: fps with masks on and off), and the mask
postprocess cost per frame is measured in-process on the engine's outputs for those frames:
``mask_ms_per_frame`` = (postprocess with masks + COCO RLE encoding of the published masks) -
(postprocess boxes only).

``--rounds R`` (default 3) repeats (c), (b), (a) and (c) again R times: each round compares the
pipeline with the mean of the engine-only runs just before and after it, and the ratios on the
last line are the medians over the rounds. On the shared 2-core machine the engine alone drifts by
up to 20 % within seconds (26.8 → 22.1 fps, same batches), which a single (c)-then-(a) pair turns
into a ratio error of the same size.

``--profile``: while the pipeline runs, each stage process's CPU time (user + system, all its
threads, from ``/proc/<pid>/stat``) and context switches (voluntary + involuntary, all threads)
are sampled, and printed per frame next to the runner's own CPU, so that the time the stages take
from the engine on a small machine is visible.

``--placement separate|with_preprocess|auto|compare``: where the decoders run
(``decode.placement``; default: the setting). ``compare`` runs the pipeline both ways in each
round (in alternating order) and adds ``with_preprocess_vs_separate=X.XX``, the median of the
rounds' fps ratios; the last line's ratios are then those of ``with_preprocess``.

``--soak LOOPS`` also runs the pipeline over the video LOOPS times and prints the resident memory
of the stage processes over time (it must stay flat). The last line is
``pipeline_vs_engine_only=X.XX pipeline_vs_naive=Y.YY``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the pipeline's light stages (runner.LIGHT_STAGE_ENV)
os.environ.setdefault("MKL_NUM_THREADS", "1")  # before numpy is imported: the in-process mask cost measurement

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_frames(video: str, n: int) -> list[np.ndarray]:
    import av

    frames = []
    with av.open(video) as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) >= n:
                break
    return frames


def bench_engine_only(model: Path, card: Any, frames: list[np.ndarray], batch: int, threads: int,
                      concurrent: int = 1, cpu: list[float] | None = None) -> float:
    """Frames per second of ``concurrent`` engine instances, each on its own thread taking the next batch.

    ``cpu``, if given, gets the CPU seconds this process spent (all threads) while they ran appended.
    """
    import threading

    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from streamdet.preprocess_ops import preprocess_batch

    batches = [preprocess_batch(frames[i:i + batch], card)[0] for i in range(0, len(frames), batch)]
    engines = [OnnxRuntimeEngine(model_path=model, intra_op_threads=threads) for _ in range(concurrent)]
    for engine in engines:
        engine.start()
        engine.infer(batches[0])  # warm-up
    todo = iter(batches)
    lock = threading.Lock()

    def work(engine: OnnxRuntimeEngine) -> None:
        while True:
            with lock:
                b = next(todo, None)
            if b is None:
                return
            engine.infer(b)

    try:
        workers = [threading.Thread(target=work, args=(e,)) for e in engines]
        t0, cpu0 = time.perf_counter(), time.process_time()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if cpu is not None:
            cpu.append(time.process_time() - cpu0)
        return len(frames) / (time.perf_counter() - t0)
    finally:
        for engine in engines:
            engine.stop()


def bench_naive(model: Path, card: Any, video: str, n: int, score_threshold: float, iou_threshold: float) -> float:
    """cv2.VideoCapture -> cv2.resize -> ONNX Runtime -> cv2.dnn.NMSBoxes, one frame at a time."""
    import cv2
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    iw, ih = card.input_wh
    nc = card.head.num_classes
    cap = cv2.VideoCapture(video)
    sess.run(None, {name: np.zeros((1, 3, ih, iw), np.float32)})  # warm-up
    done = 0
    t0 = time.perf_counter()
    while done < n:
        ok, bgr = cap.read()
        if not ok:
            break
        x = cv2.resize(bgr, (iw, ih))[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        out = sess.run(None, {name: x})[0][0]  # (4 + C, N)
        scores = out[4:4 + nc].max(axis=0)
        keep = scores > score_threshold
        cxcywh = out[:4, keep].T
        boxes = np.column_stack([cxcywh[:, 0] - cxcywh[:, 2] / 2, cxcywh[:, 1] - cxcywh[:, 3] / 2,
                                 cxcywh[:, 2], cxcywh[:, 3]])
        cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), score_threshold, iou_threshold)
        done += 1
    cap.release()
    return done / (time.perf_counter() - t0)


def bench_mask_cost(model: Path, card: Any, frames: list[np.ndarray], batch: int, cfg: Any) -> dict[str, float]:
    """Per-frame milliseconds of postprocess boxes only, with masks, and RLE encoding (engine outputs computed once).

    Instance masks are computed as the pipeline does (``masks_as_rle``: the RLE encoding is part of
    the postprocess); ``rle_ms`` is the per-class RLE of semantic class maps (done when publishing).
    """
    import dataclasses

    from engines.onnxruntime_backend import OnnxRuntimeEngine
    from streamdet.masks import class_map_to_rles, masks_to_rle
    from streamdet.postprocess import postprocess
    from streamdet.preprocess_ops import preprocess_batch

    runs = []
    with OnnxRuntimeEngine(model_path=model, intra_op_threads=0) as engine:
        for i in range(0, len(frames), batch):
            x, lbs = preprocess_batch(frames[i:i + batch], card)
            runs.append(([np.asarray(o) for o in engine.infer(x)], lbs))
    n = len(frames)
    # as the pipeline's postprocess stage: masks computed straight as COCO RLEs on the box windows
    off_cfg, on_cfg = dataclasses.replace(cfg, masks=False), dataclasses.replace(cfg, masks=True, masks_as_rle=True)
    t0 = time.perf_counter()
    for outs, lbs in runs:
        postprocess(outs, lbs, card, off_cfg)
    t_off = time.perf_counter() - t0
    dets = []
    t0 = time.perf_counter()
    for outs, lbs in runs:
        dets += postprocess(outs, lbs, card, on_cfg)
    t_on = time.perf_counter() - t0
    t0 = time.perf_counter()
    for d in dets:
        if d.masks is not None and len(d.masks):
            masks_to_rle(d.masks)
        if d.semantic is not None:
            class_map_to_rles(d.semantic)
    t_rle = time.perf_counter() - t0
    return {"boxes_only_ms": 1000 * t_off / n, "with_masks_ms": 1000 * t_on / n, "rle_ms": 1000 * t_rle / n,
            "mask_ms": 1000 * (t_on + t_rle - t_off) / n, "dets_per_frame": sum(len(d) for d in dets) / n}


def proc_cpu_switches(pid: int) -> tuple[float, int] | None:
    """CPU seconds (user + system, all threads) and context switches (all threads) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        switches = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        return cpu, switches
    except (OSError, ValueError, IndexError):
        return None


class StageProfile:
    """Pipeline monitor: CPU time and context switches of each stage process and of the runner, per frame.

    Counted from the first sample after the first frame came out of the pipeline (start-up, model
    loading and warm-up left out) to the last sample (the runner calls monitors every 0.5 s).
    """

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, int]] = {}
        self.last: dict[str, tuple[float, int]] = {}
        self.frames0 = self.frames1 = 0
        self.runner0 = self.runner1 = 0.0
        self.t0 = self.t1 = 0.0

    def __call__(self, pipe: Any) -> None:
        frames = pipe.frames_done
        if frames == 0:
            return
        now = {label: got for label, pid in pipe.stage_pids().items() if (got := proc_cpu_switches(pid)) is not None}
        if not self.first:
            self.first, self.frames0, self.runner0, self.t0 = now, frames, time.process_time(), time.monotonic()
        self.last.update(now)
        self.frames1, self.runner1, self.t1 = frames, time.process_time(), time.monotonic()

    def total_cpu_s(self) -> float:
        """CPU seconds of the stage processes and the runner between the first and the last sample."""
        stages = sum(cpu - self.first.get(label, (0.0, 0))[0] for label, (cpu, _) in self.last.items())
        return stages + self.runner1 - self.runner0

    def lines(self) -> list[str]:
        n = self.frames1 - self.frames0
        if n <= 0:
            return ["too few samples to profile (a longer run: --frames)"]
        out = []
        for label, (cpu, sw) in sorted(self.last.items()):
            cpu0, sw0 = self.first.get(label, (0.0, 0))
            out.append(f"{label:>14}: {1000 * (cpu - cpu0) / n:6.2f} ms CPU/frame, "
                       f"{(sw - sw0) / n:6.1f} switches/frame")
        cores = os.cpu_count() or 1
        wall = 1000 * (self.t1 - self.t0) / n
        out.append(f"{'runner':>14}: {1000 * (self.runner1 - self.runner0) / n:6.2f} ms CPU/frame")
        out.append(f"{'all':>14}: {1000 * self.total_cpu_s() / n:6.2f} ms CPU/frame of {wall * cores:.2f} available "
                   f"({wall:.2f} ms wall/frame x {cores} cores; {n} frames)")
        return out


def bench_pipeline(settings: Any, monitor: Any = None) -> tuple[float, Any]:
    from pipeline.runner import Pipeline

    summary = Pipeline(settings=settings, progress=False, monitor=monitor).run(handle_signals=False)
    if summary.exit_code != 0:
        raise SystemExit(f"error: pipeline run failed: {'; '.join(summary.errors)}")
    return summary.fps, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--video", required=True, help="video file")
    p.add_argument("--model", default=str(ROOT / "engines" / "models" / "detector.onnx"), help="ONNX model")
    p.add_argument("--frames", type=int, default=200, help="frames to measure on (default %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="engine batch size (default: the pipeline's setting)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads for the pipeline's engine (default: the setting)")
    p.add_argument("--concurrent", type=int, default=None,
                   help="engine.concurrent_batches for the pipeline and the engine alone (default: the setting)")
    p.add_argument("--soak", type=int, default=0, metavar="LOOPS",
                   help="also loop the video LOOPS times through the pipeline and report resident memory")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (c), (b), (a); the ratios are the medians of each round's (default %(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="print each stage's CPU time and context switches per frame (from /proc)")
    p.add_argument("--masks", choices=("on", "off", "compare"), default=None,
                   help="segment / semantic models: pipeline with masks on, off or both, plus the mask cost per frame")
    p.add_argument("--placement", choices=("separate", "with_preprocess", "auto", "compare"), default=None,
                   help="decode.placement of the pipeline runs, or compare separate and with_preprocess")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds: expected 1 or more, got {args.rounds}")

    from pipeline.runner import Pipeline, PipelineError, process_rss_kib
    from pipeline.settings import load_settings

    over: dict[str, Any] = {"sources": [args.video], "model": args.model, "max_frames": args.frames,
                            "quiet": True, "sinks": {"publish": None}}
    if args.batch is not None:
        over["preprocess"] = {"max_batch": args.batch}
    if args.threads is not None:
        over.setdefault("engine", {})["intra_op_threads"] = args.threads
    if args.concurrent is not None:
        over.setdefault("engine", {})["concurrent_batches"] = args.concurrent
    settings = load_settings(overrides=over)
    probe = Pipeline(settings=settings)
    try:
        probe.prepare()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    card = probe.card
    chain = probe.chains[0]  # batch, concurrent batches and threads as the pipeline's engine runs them
    batch, concurrent, threads = chain.max_batch, chain.concurrent_batches, chain.intra_op_threads
    frames = load_frames(args.video, args.frames)
    n = len(frames)
    print(f"model={Path(args.model).name} input={card.input_wh[0]}x{card.input_wh[1]} video={Path(args.video).name} "
          f"frame={frames[0].shape[1]}x{frames[0].shape[0]} frames={n} batch={batch} cpus={os.cpu_count()} "
          f"concurrent_batches={concurrent} threads_per_run={threads or 'auto'}")

    from streamdet.card import HeadLayout

    mask_modes = {"on": [True], "off": [False], "compare": [True, False]}[args.masks] if args.masks else [None]
    rounds: list[tuple[float, float, dict[bool | None, float]]] = []
    from pipeline.sources.options import DecodePlacement

    placements: list[DecodePlacement | None] = [None]
    if args.placement == "compare":
        placements = [DecodePlacement.SEPARATE, DecodePlacement.WITH_PREPROCESS]
    elif args.placement is not None:
        placements = [DecodePlacement(args.placement)]
    fps_by_placement: dict[DecodePlacement, list[float]] = {}
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}:")
        engine_before = bench_engine_only(Path(args.model), card, frames, batch, threads, concurrent)
        print(f"(c) engine only (batch {batch}, pre-decoded, pre-letterboxed): {engine_before:.1f} fps")
        if card.head.layout is HeadLayout.SEMANTIC_LOGITS:
            naive_fps = float("nan")
            print("(b) naive loop: skipped (semantic model)")
        else:
            naive_fps = bench_naive(Path(args.model), card, args.video, n, settings.postprocess.score_threshold,
                                    settings.postprocess.iou_threshold)
            print(f"(b) naive loop (cv2 decode + resize, ORT, cv2.dnn.NMSBoxes): {naive_fps:.1f} fps")
        fps_by_mode: dict[bool | None, float] = {}
        order = placements if r % 2 == 0 else placements[::-1]  # alternate which placement runs first
        for masks, placement in [(m, pl) for m in mask_modes for pl in order]:
            run_settings = settings if masks is None else settings.model_copy(
                update={"postprocess": settings.postprocess.model_copy(update={"masks": masks})})
            if placement is not None:
                run_settings = run_settings.model_copy(
                    update={"decode": run_settings.decode.model_copy(update={"placement": placement})})
            profile = StageProfile() if args.profile else None
            pipe_fps, summary = bench_pipeline(run_settings, profile)
            if placement is None or placement is placements[-1]:
                fps_by_mode[masks] = pipe_fps
            if placement is not None:
                fps_by_placement.setdefault(placement, []).append(pipe_fps)
            how = "" if masks is None else f" masks {'on' if masks else 'off'}"
            how += "" if placement is None else f" decode.placement {placement.value}"
            print(f"(a) pipeline{how}: {pipe_fps:.1f} fps ({summary.frames} frames in {summary.seconds:.2f} s, "
                  f"{summary.detections} detections)")
            if profile is not None:
                print("per-stage profile (from the first frame out, start-up left out):")
                for line in profile.lines():
                    print(line)
        engine_after = bench_engine_only(Path(args.model), card, frames, batch, threads, concurrent)
        engine_fps = (engine_before + engine_after) / 2
        print(f"(c) engine only again: {engine_after:.1f} fps; the pipeline is compared with the mean, "
              f"{engine_fps:.1f} fps")
        rounds.append((engine_fps, naive_fps, fps_by_mode))
    # each round's ratios (the engine-only runs bracket the pipeline run), then their medians
    by_round = [m[mask_modes[0]] / e for e, _, m in rounds]
    vs_engine = float(np.median(by_round))
    vs_naive = float(np.median([m[mask_modes[0]] / nv for _, nv, m in rounds]))
    if args.rounds > 1:
        print("pipeline / engine only by round: " + ", ".join(f"{x:.2f}" for x in by_round))
    if args.placement == "compare":
        sep = fps_by_placement[DecodePlacement.SEPARATE]
        together = fps_by_placement[DecodePlacement.WITH_PREPROCESS]
        ratios = [b / a for a, b in zip(sep, together, strict=True)]
        print("with_preprocess / separate by run: " + ", ".join(f"{x:.2f}" for x in ratios))
        print(f"with_preprocess_vs_separate={float(np.median(ratios)):.2f}")
    if args.masks:
        cost = bench_mask_cost(Path(args.model), card, frames, batch, settings.postprocess.to_config())
        print(f"mask postprocess per frame: boxes only {cost['boxes_only_ms']:.2f} ms, with masks "
              f"{cost['with_masks_ms']:.2f} ms, RLE encoding {cost['rle_ms']:.2f} ms "
              f"({cost['dets_per_frame']:.1f} detections/frame)")
        line = f"mask_ms_per_frame={cost['mask_ms']:.2f}"
        if args.masks == "compare":
            line += f" fps_masks_on={fps_by_mode[True]:.1f} fps_masks_off={fps_by_mode[False]:.1f}"
        print(line)

    if args.soak:
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()

        def monitor(pipe: Any) -> None:
            rss = sum(process_rss_kib(pid) for pid in pipe.child_pids())
            if rss:
                samples.append((time.monotonic() - t0, rss))

        soak = settings.model_copy(update={"max_frames": None,
                                           "decode": settings.decode.model_copy(update={"loop": args.soak})})
        fps, s2 = bench_pipeline(soak, monitor)
        if samples:
            q = max(1, len(samples) // 4)
            early = float(np.median([r for _, r in samples[q:2 * q] or samples[:1]]))
            late = float(np.median([r for _, r in samples[3 * q:]]))
            print(f"soak: {s2.frames} frames at {fps:.1f} fps; stage RSS (sum) early {early / 1024:.1f} MiB, "
                  f"late {late / 1024:.1f} MiB, growth {(late - early) / 1024:+.1f} MiB, "
                  f"peak {s2.peak_rss_kib / 1024:.1f} MiB")
            step = max(1, len(samples) // 8)
            print("soak RSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{r / 1024:.0f}" for t, r in samples[::step]))
    print(f"pipeline_vs_engine_only={vs_engine:.2f} pipeline_vs_naive={vs_naive:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
