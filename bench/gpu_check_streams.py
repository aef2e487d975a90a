"""N simultaneous video streams through the GPU path at real-time pace (the GPU check's stream phases).

An in-process consumer and decoder processes built from the pipeline's own GPU components:

* decoder processes (``workers``, spawn), each owning several streams: PyAV decodes the clip
  (software, one thread per stream, to YUV 4:2:0; or NVDEC, frames downloaded as NV12), each
  frame is written into the worker's CUDA-IPC frame ring
  (:class:`pipeline.gpu.cuda_slotpool.CudaFramePool`, a YUV frame packed in a ``(H/2, W, 3)``
  slot: :func:`pipeline.gpu.nv12.yuv420_slot_hw`) and its slot id goes to the consumer; the slot
  comes back as a credit (no free slot: the worker waits, so a slow consumer shows as latency);
* the consumer (this process) opens each ring once (:class:`~pipeline.gpu.cuda_slotpool.CudaPoolCache`),
  batches the frames of all streams (up to ``max_batch``, waiting at most ``max_wait_ms``),
  converts YUV -> RGB and letterboxes on the device (:class:`pipeline.gpu.nv12.GpuYuvLetterbox`),
  runs the engine (``infer_device``, CUDA graphs), the device NMS
  (:func:`pipeline.gpu.gpu_nms.postprocess_detect_torch`) and copies the detections to the host.

Paced: stream ``i`` of ``N`` plays frame ``k`` at ``t0 + i / (N * fps) + k / fps`` (a camera);
latency is from that moment to the detections on the host, so decode time counts. Unpaced: every
stream decodes as fast as it can (throughput).

This is not the multi-process pipeline of ``pipeline/runner.py``: its decoders write RGB24 into
host shared memory (about 7.5 ms of CPU per 1080p frame, 15 of 16 cores for 64 streams), and the
preprocess and engine stages are separate processes connected by ZeroMQ. Here the frames stay YUV
and go to the device in the decoder, and one process batches, converts, infers and runs the NMS.
"""

from __future__ import annotations

import heapq
import math
import queue
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np


class DecodeMode(Enum):
    """How the worker decodes."""

    SOFTWARE = "software"
    NVDEC = "nvdec"


@dataclass(frozen=True, slots=True)
class StreamsConfig:
    """The stream harness' fixed settings.

    Attributes:
        clip: the H.264 file every stream plays.
        frame_hw: its ``(H, W)``.
        fps: frames per second of each stream.
        clip_seconds: its length (streams start at different whole seconds of it).
        device: ``"cuda"`` or ``"cpu"`` (dry run).
        workers: decoder processes.
        max_streams: the most streams of any trial (sizes the rings).
        slots_per_stream: ring slots per stream.
        max_batch: largest engine batch.
        max_wait_ms: how long a batch waits for more frames after its first.
    """

    clip: str
    frame_hw: tuple[int, int]
    fps: int
    clip_seconds: float
    device: str
    workers: int
    max_streams: int
    slots_per_stream: int = 4
    max_batch: int = 32
    max_wait_ms: float = 4.0


def _worker(wid: int, cfg: StreamsConfig, ctrl: Any, frames: Any, credits: Any) -> None:  # noqa: C901
    """A decoder process: serves trials until it gets ``None``."""

    from pipeline.gpu.cuda_slotpool import CudaFramePool
    from pipeline.gpu.nv12 import yuv420_slot_hw
    from pipeline.sources.ffmpeg import open_input
    from pipeline.sources.options import HWAccelMode, HWAccelOptions

    h, w = cfg.frame_hw
    per = math.ceil(cfg.max_streams / cfg.workers)
    try:
        pool = CudaFramePool.create(name=f"w{wid}", num_slots=max(2, per * cfg.slots_per_stream),
                                    frame_hw=yuv420_slot_hw(cfg.frame_hw), device=cfg.device)
    except Exception as e:  # report to the consumer, which stops the phase
        frames.put(("error", wid, f"{type(e).__name__}: {e}"))
        return
    frames.put(("handle", wid, pool.handle().encode()))
    while True:
        cmd = ctrl.get()
        if cmd is None:
            frames.cancel_join_thread()  # nothing left to send; do not wait for the consumer at exit
            break
        trial, streams, t0, duration, paced, mode = cmd
        hw = HWAccelOptions(mode=HWAccelMode.CUDA) if mode == DecodeMode.NVDEC.value else HWAccelOptions()
        fmt = "nv12" if hw.enabled else "yuv420p"
        open_s: dict[int, Any] = {}
        heap: list[tuple[float, int, int]] = []
        err = ""
        try:
            for sid, phase, offset_s in streams:
                c = open_input(cfg.clip, hwaccel=hw, timeout=10.0)
                st = c.streams.video[0]
                st.codec_context.thread_count = 1
                if offset_s > 0:
                    c.seek(int(offset_s / st.time_base), stream=st)
                open_s[sid] = [c, st, c.decode(st)]
                heap.append((t0 + phase, sid, 0))
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
        heapq.heapify(heap)
        cpu0, n, waits = time.process_time(), 0, 0.0
        end = t0 + duration
        while heap and not err:
            due, sid, k = heapq.heappop(heap)
            if due >= end:
                continue
            if paced:
                time.sleep(max(0.0, due - time.monotonic()))
            slot = pool.acquire()
            while slot is None:
                tw = time.monotonic()
                pool.release(credits.get())
                waits += time.monotonic() - tw
                slot = pool.acquire()
            while True:
                try:
                    pool.release(credits.get_nowait())
                except queue.Empty:
                    break
            c, st, it = open_s[sid]
            try:
                f = next(it)
            except StopIteration:
                c.seek(0, stream=st)
                open_s[sid][2] = it = c.decode(st)
                f = next(it)
            yuv = f.to_ndarray(format=fmt)
            pool.write(slot, yuv.reshape(h // 2, w, 3))
            frames.put(("frame", wid, slot, sid, k, due if paced else time.monotonic(), fmt))
            n += 1
            heapq.heappush(heap, (due + 1.0 / cfg.fps if paced else time.monotonic(), sid, k + 1))
        for c, _, _ in open_s.values():
            c.close()
        cpu = time.process_time() - cpu0
        frames.put(("done", wid, trial, n, cpu, waits, err))
        deadline = time.monotonic() + 10.0  # all slots back before the next trial
        while pool.credits.in_use and time.monotonic() < deadline:
            try:
                pool.release(credits.get(timeout=0.5))
            except queue.Empty:
                pass
    pool.close()


class StreamHarness:
    """Decoder processes and the consumer; one :meth:`trial` per stream count.

    Args:
        cfg: the settings.
        engine: a started engine with ``infer_device`` (the CUDA backend).
        card: the model card.
        matrix: the clip's YUV matrix (:func:`pipeline.gpu.nv12.yuv_matrix_for`).

    Raises:
        RuntimeError: a worker failed to start (its error).
    """

    def __init__(self, cfg: StreamsConfig, *, engine: Any, card: Any, matrix: Any) -> None:
        import multiprocessing as mp

        import torch

        from pipeline.gpu.cuda_slotpool import CudaPoolCache, CudaPoolHandle
        from pipeline.gpu.nv12 import GpuYuvLetterbox, YuvLayout
        from streamdet.postprocess import PostprocessConfig

        self.cfg, self.engine, self.card = cfg, engine, card
        self.torch = torch
        self.device = torch.device(cfg.device)
        ctx = mp.get_context("spawn")
        self.frames: Any = ctx.Queue()
        self.ctrl = [ctx.Queue() for _ in range(cfg.workers)]
        self.credits = [ctx.Queue() for _ in range(cfg.workers)]
        self.procs = [ctx.Process(target=_worker, args=(i, cfg, self.ctrl[i], self.frames, self.credits[i]),
                                  daemon=True) for i in range(cfg.workers)]
        for p in self.procs:
            p.start()
        self.cache = CudaPoolCache()
        self.rings: dict[int, Any] = {}
        for _ in range(cfg.workers):
            msg = self.frames.get(timeout=120)
            if msg[0] == "error":
                self.close()
                raise RuntimeError(f"decoder worker {msg[1]}: {msg[2]}")
            self.rings[msg[1]] = self.cache.open(CudaPoolHandle.decode(msg[2]))
        lb = {fmt: GpuYuvLetterbox(card=card, max_batch=cfg.max_batch, frame_hw=cfg.frame_hw, layout=lay,
                                   matrix=matrix, device=cfg.device)
              for fmt, lay in (("yuv420p", YuvLayout.I420), ("nv12", YuvLayout.NV12))}
        self.letterbox = lb
        self.post_cfg = PostprocessConfig()
        self.trials = 0

    def _batch(self, items: list[tuple[Any, ...]]) -> int:
        """Convert, infer and NMS one batch of frame messages; returns the detections."""
        from pipeline.gpu.gpu_nms import postprocess_detect_torch
        from pipeline.gpu.nv12 import yuv_view

        h, w = self.cfg.frame_hw
        fmt = items[0][6]
        views = [yuv_view(self.rings[it[1]][it[2]], (h, w)) for it in items]
        x, lbs = self.letterbox[fmt](views)
        outs = self.engine.infer_device(x)
        dets = postprocess_detect_torch(outs[0], lbs, num_classes=self.card.head.num_classes, cfg=self.post_cfg)
        if self.device.type == "cuda":
            self.torch.cuda.current_stream(self.device).synchronize()  # done reading the slots
        for it in items:
            self.credits[it[1]].put(it[2])
        return sum(len(d) for d in dets)

    def trial(self, n: int, *, seconds: float, paced: bool = True, mode: DecodeMode = DecodeMode.SOFTWARE,
              warmup_s: float = 1.0) -> dict[str, Any]:
        """Play ``n`` streams for ``seconds`` and measure.

        Returns:
            Figures: frames (done and scheduled), fps, latency p50/p90/p99/max (ms, after
            ``warmup_s``), the worst stream's p99, latency growth (p50 of the last third minus the
            first, ms), batch sizes, decoder CPU ms per frame and wait time, ``ok`` (paced: p99 <= 100
            ms, growth <= 25 ms and at least 95 % of the frames), errors.
        """
        cfg = self.cfg
        self.trials += 1
        assign: list[list[tuple[int, float, float]]] = [[] for _ in range(cfg.workers)]
        span = max(1, int(cfg.clip_seconds - seconds - 1))
        for i in range(n):
            assign[i % cfg.workers].append((i, i / (n * cfg.fps), float((i * 7) % span)))
        t0 = time.monotonic() + 0.5
        active = [i for i in range(cfg.workers) if assign[i]]
        for i in active:
            self.ctrl[i].put((self.trials, assign[i], t0, seconds, paced, mode.value))
        lat: list[tuple[float, int, float]] = []
        batches: list[int] = []
        done: dict[int, tuple[Any, ...]] = {}
        dets = 0
        pending: list[tuple[Any, ...]] = []
        hard_end = t0 + seconds + 30.0
        while len(done) < len(active) or pending:
            if time.monotonic() > hard_end:
                break
            try:
                msg = pending.pop(0) if pending else self.frames.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg[0] == "done":
                done[msg[1]] = msg
                continue
            if msg[0] != "frame":
                continue
            items = [msg]
            t_first = time.monotonic()
            while len(items) < cfg.max_batch:
                left = cfg.max_wait_ms / 1000.0 - (time.monotonic() - t_first)
                try:
                    m = self.frames.get(timeout=left) if left > 0 else self.frames.get_nowait()
                except queue.Empty:
                    break
                if m[0] == "frame" and m[6] == msg[6]:
                    items.append(m)
                else:
                    pending.append(m)
            dets += self._batch(items)
            now = time.monotonic()
            batches.append(len(items))
            lat.extend((it[5] - t0, it[3], 1000.0 * (now - it[5])) for it in items)
        return _figures(n, seconds, paced, mode, cfg.fps, warmup_s, lat, batches, done, dets)

    def close(self) -> None:
        """Stop the workers."""
        for q in self.ctrl:
            q.put(None)
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            # exitcode polls waitpid; join() here waited on the process sentinel for the whole 5 s
            # every time, though the worker had logged its exit within milliseconds of the None
            while p.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if p.exitcode is None:
                p.terminate()
        self.cache.close()


def _figures(n: int, seconds: float, paced: bool, mode: DecodeMode, fps: int, warmup_s: float,
             lat: list[tuple[float, int, float]], batches: list[int], done: dict[int, tuple[Any, ...]],
             dets: int) -> dict[str, Any]:
    frames = sum(d[3] for d in done.values())
    cpu = sum(d[4] for d in done.values())
    errors = sorted({d[6] for d in done.values() if d[6]})
    out: dict[str, Any] = {"streams": n, "seconds": seconds, "paced": paced, "decode": mode.value,
                           "frames": len(lat), "frames_decoded": frames,
                           "fps": round(len(lat) / seconds, 1) if seconds else 0.0,
                           "decode_cpu_ms_per_frame": round(1000.0 * cpu / max(frames, 1), 3),
                           "decoder_wait_s": round(sum(d[5] for d in done.values()), 2),
                           "mean_batch": round(float(np.mean(batches)), 2) if batches else 0.0,
                           "detections_per_frame": round(dets / max(len(lat), 1), 2), "errors": errors}
    if paced:
        out["frames_scheduled"] = int(n * seconds * fps)
    body = [x for x in lat if x[0] >= warmup_s] or lat
    if not body:
        return {**out, "ok": False}
    ms = np.array([x[2] for x in body])
    out.update({f"latency_{k}_ms": round(float(np.percentile(ms, q)), 1)
                for k, q in (("p50", 50), ("p90", 90), ("p99", 99))})
    out["latency_max_ms"] = round(float(ms.max()), 1)
    per_stream: dict[int, list[float]] = {}
    for _t, sid, v in body:
        per_stream.setdefault(sid, []).append(v)
    out["worst_stream_p99_ms"] = round(max(float(np.percentile(v, 99)) for v in per_stream.values()), 1)
    body.sort()
    third = max(1, len(body) // 3)
    first, last = [x[2] for x in body[:third]], [x[2] for x in body[-third:]]
    out["latency_growth_ms"] = round(float(np.median(last) - np.median(first)), 1)
    if paced:
        out["ok"] = bool(out["latency_p99_ms"] <= 100.0 and out["latency_growth_ms"] <= 25.0
                         and len(lat) >= 0.95 * out["frames_scheduled"] and not errors)
    return out
