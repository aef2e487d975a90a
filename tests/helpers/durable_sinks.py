"""Helpers of the durable-sink tests: a settable clock, a disk that fills up, frames, a killed video writer."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from pipeline.stages.sinks import FrameResult, VideoSink
from streamdet.letterbox import letterbox_params
from streamdet.messages import FrameMsg, FrameRecord
from streamdet.postprocess import Detections

__all__ = ["FPS", "HW", "T0", "Clock", "Disk", "decoded", "killed_writer", "mounted_tmpfs", "no_dets", "open_video",
           "record", "times", "top_boxes", "video_result"]

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class Clock:
    """A settable wall clock for the sinks."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(sid: str = "cam", i: int = 0, hw: tuple[int, int] = (272, 640), pts_s: float | None = None) -> FrameRecord:
    f = FrameMsg(sid, i, i * 0.04 if pts_s is None else pts_s, hw, -2, "", 1.0, 2.0)
    return FrameRecord(f, letterbox_params(hw, (640, 384)), 0.5)


def no_dets() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


class Disk:
    """Files whose writes fail with ENOSPC while ``full`` (after ``room`` more bytes), like a full disk.

    Only the files whose name starts with one of ``prefixes`` (those of the sink under test) are on it.
    """

    def __init__(self, prefixes: tuple[str, ...] = (".o.", ".o-")) -> None:
        self.prefixes = prefixes
        self.full = False
        self.room = 0
        self.opens = 0

    def open(self, path: Path, *, append: bool) -> Any:
        raw = open(path, "ab" if append else "wb", buffering=0)
        if not path.name.startswith(self.prefixes):
            return raw
        self.opens += 1
        return FlakyFile(self, raw)


class FlakyFile:
    """A file of :class:`Disk`."""

    def __init__(self, disk: Disk, raw: Any) -> None:
        self.disk, self.raw = disk, raw

    def write(self, data: bytes | memoryview) -> int:
        if self.disk.full:
            if self.disk.room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = self.raw.write(bytes(data)[: self.disk.room])
            self.disk.room -= n
            return n
        return self.raw.write(data)

    def truncate(self, size: int) -> int:
        return self.raw.truncate(size)

    def close(self) -> None:
        self.raw.close()


FPS = 5.0  # a keyframe (and an MP4 fragment) every 2 s = 10 frames
HW = (48, 64)


def frame(i: int) -> np.ndarray:
    img = np.zeros((*HW, 3), np.uint8)
    img[..., 0] = (np.arange(HW[1]) * 4 + i * 3) % 256
    img[..., 1] = (i * 5) % 256
    return img


def video_result(i: int, sid: str = "cam", pts_s: float | None = None) -> FrameResult:
    """Frame ``i`` of a source at :data:`FPS` (``pts_s``: another presentation time)."""
    return FrameResult(record(sid, i, HW, i / FPS if pts_s is None else pts_s), no_dets(), {}, frame(i))


def top_boxes(path: Path) -> list[bytes]:
    data, pos, kinds = path.read_bytes(), 0, []
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if n == 1:
            n = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        kinds.append(kind)
        pos += n or len(data)
    return kinds


def decoded(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def times(path: Path) -> list[float]:
    with av.open(str(path)) as c:
        return [round(float(f.time), 6) for f in c.decode(video=0)]


KILLED_WRITER = textwrap.dedent("""
    import sys
    from pipeline.stages.sinks import VideoSink
    from tests.helpers.durable_sinks import FPS, video_result
    sink = VideoSink(path=sys.argv[1], fps_by_source={"cam": FPS}, class_names=["a"])
    sink.open()
    for i in range(int(sys.argv[2])):
        sink.write(video_result(i))
    print("written", flush=True)
    sys.stdin.read()  # killed while waiting
""")


def killed_writer(out: Path, frames: int) -> None:
    """Write ``frames`` frames with a VideoSink in a process that is then SIGKILLed (never closed)."""
    root = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(frames)], cwd=root,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "written"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        p.stdin.close()
        p.stdout.close()


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (``64k``) at ``mnt``, a disk that really fills up (skips the test without root)."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("a real full disk needs Linux and mount(8) to mount a tmpfs")
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def open_video(path: Path, *, fps: float = FPS, resume: bool = False) -> VideoSink:
    """An opened annotated-video sink of one source ``cam`` at ``fps``."""
    sink = VideoSink(path=path, fps_by_source={"cam": fps}, class_names=["a"], resume=resume)
    sink.open()
    return sink

