"""The plate cascade on one live camera: does it keep up with 25 fps on this machine, and what does a plate cost?

    python bench/cascade_bench.py [--duration 40] [--warmup 5] [--fps 25] [--clip-seconds 12] [--seed 4343]

Renders a plate video (``training.render_video --scene plates``, 1280x720, 2-4 vehicles with
plates at a time; cached under ``~/.cache/streamdet/cascade_bench``), serves it in a loop as a
``--fps`` RTSP camera (``tests/helpers/rtsp_server.py``, GStreamer, the live-source tests'
server), and runs ``run_pipeline.py --config configs/plates.yaml`` on it for ``--duration``
seconds after ``--warmup``, then the plate detector alone (no secondary model) the same way. A
live source drops frames rather than queueing them, so a pipeline that cannot keep up publishes
fewer than ``--fps`` frames per second. Per run: published fps, p50/p99 latency, plates per frame;
for the cascade, the summary line of the secondary model (crops, batches, crops per batch, engine
ms per batch, ms per crop to cut and letterbox, skipped crops), and the engines' time per frame
from the messages (``timing_ms``). The last line::

    cascade_fps=X primary_only_fps=Y target_fps=25 realtime=yes|no crops_per_batch=Z crop_ms=W secondary_ms_per_crop=V
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from live_bench import RtspServerError, require_rtsp_server, rtsp_camera  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "streamdet" / "cascade_bench"


def clip(seconds: float, seed: int) -> Path:
    """The rendered plate video (cached)."""
    out = CACHE / f"plates-s{seed}-{seconds:g}s.mp4"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "training.render_video", "--scene", "plates", "--out", str(out),
                        "--seconds", str(seconds), "--seed", str(seed)], cwd=ROOT, check=True)
    return out


def run(url: str, *, cascade: bool, seconds: float, warmup: float, out: Path) -> dict[str, object]:
    """One pipeline run on the camera; the figures of its steady part."""
    args = [sys.executable, str(ROOT / "run_pipeline.py"), "--quiet", "--publish", "none", "--source", url,
            "--jsonl", str(out), "--set", "sinks.stats_interval_s=0"]
    args += ["--config", str(ROOT / "configs" / "plates.yaml")] if cascade else \
        ["--model", str(ROOT / "engines" / "models" / "plates.onnx")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    t0 = time.monotonic()
    time.sleep(warmup + seconds)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode not in (0, 130):
        raise SystemExit(f"error: the pipeline exited {proc.returncode}: {stderr.strip()[-400:]}")
    msgs = [m for m in map(json.loads, out.read_text().splitlines()) if "detections" in m]
    # the steady window: by capture time, from warmup after the first frame, for `seconds`
    c0 = msgs[0]["capture_time"] + warmup if msgs else 0.0
    win = [m for m in msgs if c0 <= m["capture_time"] < c0 + seconds]
    lat = np.array([m["latency_ms"] for m in win], dtype=np.float64)
    plates = [len(m["detections"]) for m in win]
    engine = [m["timing_ms"]["engine"] for m in win]
    del t0
    return {"fps": len(win) / seconds, "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "plates": float(np.mean(plates)) if plates else 0.0,
            "engine_ms": float(np.median(engine)) if engine else 0.0,
            "summary": stdout}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=40.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds ignored at the start of each run")
    p.add_argument("--fps", type=int, default=25, help="the camera's frame rate")
    p.add_argument("--clip-seconds", type=float, default=12.0, help="length of the rendered clip (looped)")
    p.add_argument("--seed", type=int, default=4343, help="the clip's seed")
    args = p.parse_args(argv)
    for need in (ROOT / "engines" / "models" / "plates.onnx", ROOT / "engines" / "models" / "plate_chars.onnx"):
        if not need.exists():
            print(f"error: {need}: the plate models are not built (docs/training.md)", file=sys.stderr)
            return 1
    try:
        require_rtsp_server()  # before the clip is rendered
        with rtsp_camera(clip(args.clip_seconds, args.seed), args.fps) as url:
            CACHE.mkdir(parents=True, exist_ok=True)
            cas = run(url, cascade=True, seconds=args.duration, warmup=args.warmup, out=CACHE / "cascade.jsonl")
            pri = run(url, cascade=False, seconds=args.duration, warmup=args.warmup, out=CACHE / "primary.jsonl")
    except RtspServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    line = next((x for x in str(cas["summary"]).splitlines() if "secondary" in x), "")
    m = re.search(r"(\d+) crops in (\d+) batches \(([\d.]+) per batch, ([\d.]+) ms engine per batch\), "
                  r"([\d.]+) ms per crop", line)
    crops, batches, per_batch, engine_batch, crop_ms = (float(x) for x in m.groups()) if m else (0, 0, 0, 0, 0)
    per_crop = engine_batch / per_batch if per_batch else float("nan")
    for name, r in (("cascade", cas), ("primary only", pri)):
        print(f"{name}: {r['fps']:.1f} fps of {args.fps}, p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, "
              f"{r['plates']:.2f} plates per frame, primary engine {r['engine_ms']:.1f} ms per batch (median)")
    print(line.strip())
    realtime = float(cas["fps"]) >= 0.95 * args.fps  # type: ignore[arg-type]
    print(f"cascade_fps={cas['fps']:.1f} primary_only_fps={pri['fps']:.1f} target_fps={args.fps} "
          f"realtime={'yes' if realtime else 'no'} crops_per_batch={per_batch:.1f} crop_ms={crop_ms:.2f} "
          f"secondary_ms_per_crop={per_crop:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
