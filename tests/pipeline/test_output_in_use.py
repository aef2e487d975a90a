"""Two runs naming one output file: the second is refused at start-up, the first's file is untouched.

Each sink holds a lock beside its output (``.<name>.lock``) while it may write it. The kernel
releases it when the holder dies, so a restarted sink (a new process after a SIGKILL) takes it again
and resumes the partial file its predecessor left.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.stages.sink_base import OutputInUseError
from pipeline.stages.sink_config import SinkConfig, finish_left_outputs
from pipeline.stages.sinks import FrameResult, JsonlSink, VideoSink
from pipeline.stages.video_sink import _count_packets
from tests.helpers.cli import ROOT, assert_no_orphans, run, start
from tests.helpers.durable_sinks import FPS, decoded, no_dets, record, video_result
from tests.helpers.standin import bikes_path


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _wait_for_line(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Until ``path`` holds a whole line (the run's sinks are open and writing)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and b"\n" in path.read_bytes()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run wrote no line"
        time.sleep(0.1)


def test_a_second_run_on_the_same_outputs_is_refused_and_the_first_completes(standin_model, tmp_path):
    jsonl, video = tmp_path / "same.jsonl", tmp_path / "same.mp4"
    common = ["--source", str(bikes_path()), "--model", str(standin_model), "--publish", "none", "--quiet"]
    first, marker = start([*common, "--loop", "20", "--jsonl", str(jsonl), "--video-out", str(video)])
    try:
        _wait_for_line(_partial(jsonl), first)
        for args, path in ((["--jsonl", str(jsonl)], jsonl), (["--video-out", str(video)], video)):
            code, _, err = run([*common, "--max-frames", "5", *args], timeout=90)
            assert code == 1 and re.fullmatch(rf"error: {re.escape(str(path))}: in use by another run \(pid \d+\)",
                                              err.strip()), (code, err)
            assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGINT)  # (it would read the clip 20 times)
        out, err = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert_no_orphans(marker)
    assert first.returncode == 130 and "error" not in err, (first.returncode, err)
    lines = [json.loads(x) for x in jsonl.read_bytes().splitlines()]  # every line whole JSON
    frames = [m["frame_index"] for m in lines if "frame_index" in m]
    assert frames == list(range(len(frames))) and len(frames) > 0  # each frame once, in order
    assert lines[-1]["schema"].startswith("streamdet.eos") and lines[-1]["frames"] == len(frames)
    assert f"output jsonl {jsonl}: {len(lines)} lines" in out
    assert _count_packets(video) == len(frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.jsonl", "same.mp4"]  # no lock file left


HOLDER = textwrap.dedent("""
    import sys
    from pipeline.stages.sinks import FrameResult, JsonlSink, VideoSink
    from tests.helpers.durable_sinks import FPS, no_dets, record, video_result
    jsonl = JsonlSink(path=sys.argv[1])
    jsonl.open()
    video = VideoSink(path=sys.argv[2], fps_by_source={"cam": FPS}, class_names=["a"])
    video.open()
    for i in range(3):
        jsonl.write(FrameResult(record(i=i), no_dets(), {"frame_index": i}))
    for i in range(25):  # two whole fragments (a keyframe every 10 frames)
        video.write(video_result(i))
    print("written", flush=True)
    sys.stdin.read()  # killed while waiting
""")


def _indices(path: Path) -> list[int]:
    return [json.loads(x)["frame_index"] for x in path.read_bytes().splitlines()]


def test_a_live_holder_keeps_its_files_and_a_dead_ones_are_resumed(tmp_path):
    jsonl, video = tmp_path / "x.jsonl", tmp_path / "v.mp4"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(jsonl), str(video)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "written"
        video_left = _partial(video).read_bytes()
        for sink, path in ((JsonlSink(path=jsonl), jsonl),
                           (VideoSink(path=video, fps_by_source={"cam": FPS}, class_names=["a"]), video)):
            with pytest.raises(OutputInUseError) as e:
                sink.open()
            assert str(e.value) == f"{path}: in use by another run (pid {p.pid})"
        # a run whose postprocess stage failed (this refusal) finishes nothing of the other run's
        assert finish_left_outputs(SinkConfig(publish=None, jsonl=str(jsonl), video_out=str(video),
                                              fps_by_source=(("cam", FPS),))) == []
        assert _indices(_partial(jsonl)) == [0, 1, 2] and _partial(video).read_bytes() == video_left  # untouched
        assert not jsonl.exists() and not video.exists()
    finally:
        p.kill()
        p.wait(timeout=30)
        p.stdin.close()  # type: ignore[union-attr]
        p.stdout.close()  # type: ignore[union-attr]
    # the holder died (SIGKILL): its locks went with it; restarted sinks take them and resume its files
    again = JsonlSink(path=jsonl, resume=True)
    again.open()
    for i in range(3, 5):
        again.write(FrameResult(record(i=i), no_dets(), {"frame_index": i}))
    again.close()
    assert _indices(jsonl) == [0, 1, 2, 3, 4]
    kept = decoded(_partial(video))  # (what the dead process's whole fragments hold)
    sink = VideoSink(path=video, fps_by_source={"cam": FPS}, class_names=["a"], resume=True)
    sink.open()
    for i in range(25, 27):
        sink.write(video_result(i))
    sink.close()
    assert kept > 0 and decoded(tmp_path / "v-seg1.mp4") == kept and decoded(video) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-seg1.mp4", "v.mp4", "x.jsonl"]  # no lock file left
