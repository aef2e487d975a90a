"""Sinks and stages when something fails: an exception mid-run, a full disk, odd frames and timestamps.

A stage whose ``run()`` fails leaves its files for the restarted stage (``abandon``), one that fails only
while finishing reports a final error and is not restarted; the annotated video keeps the source's
timing and survives a full disk without taking the run down.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np
import pytest
import zmq

from pipeline.stages.base import Stage, StageSpec, stage_main
from pipeline.stages.sink_config import SinkConfig, check_outputs_apart, finish_left_outputs
from pipeline.stages.sinks import FrameResult, JsonlSink
from pipeline.stages.video_sink import MAX_PTS_GAP_S
from pipeline.summary import RunSummary, StatusBook
from streamdet.messages import EndOfStream, EosReason, StageName, StatusKind, StatusMsg, decode_message
from tests.helpers.durable_sinks import (
    FPS,
    decoded,
    mounted_tmpfs,
    no_dets,
    open_video,
    record,
    times,
    top_boxes,
    video_result,
)

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "demo.mp4"


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _jsonl_result(i: int) -> FrameResult:
    return FrameResult(record(i=i), no_dets(), {"frame_index": i})


def _indices(path: Path) -> list[int]:
    import json

    return [json.loads(x)["frame_index"] for x in path.read_bytes().splitlines()]


# ---------------------------------------------------------------- abandon: the restarted sink continues
def test_an_abandoned_jsonl_is_resumed_not_overwritten(tmp_path):
    out = tmp_path / "r.jsonl"
    first = JsonlSink(path=out)
    first.open()
    for i in range(5):
        first.write(_jsonl_result(i))
    first.abandon()
    assert not out.exists() and _indices(_partial(out)) == [0, 1, 2, 3, 4]
    again = JsonlSink(path=out, resume=True)
    again.open()
    for i in range(5, 8):
        again.write(_jsonl_result(i))
    again.close()
    assert _indices(out) == list(range(8)) and not _partial(out).exists()
    assert again.describe() == f"jsonl {out}: 8 lines"


def test_an_abandoned_video_is_kept_whole_by_the_restarted_sink(tmp_path):
    out = tmp_path / "a.mp4"
    first = open_video(out)
    for i in range(13):  # a fragment (10 frames at FPS 5) and 3 frames of the next one
        first.write(video_result(i))
    first.abandon()  # the encoder is flushed: the last fragment is whole too
    assert not out.exists() and decoded(_partial(out)) == 13
    open_video(out, resume=True)  # (keeps the partial as a segment)
    assert decoded(tmp_path / "a-seg1.mp4") == 13


@pytest.mark.parametrize("left", [True, False])
def test_the_runner_finishes_what_a_dead_stage_left_and_nothing_else(tmp_path, left):
    jsonl, video = tmp_path / "r.jsonl", tmp_path / "v.mp4"
    if left:
        _partial(jsonl).write_bytes(b'{"frame_index":0}\n{"frame_index":1}\n{"frame_in')  # a torn last line
        sink = open_video(video)
        for i in range(4):
            sink.write(video_result(i))
        sink.abandon()
    else:
        jsonl.write_bytes(b'{"frame_index":7}\n')  # finished by the stage itself (or an earlier run)
    lines = finish_left_outputs(SinkConfig(publish=None, jsonl=str(jsonl), video_out=str(video),
                                           fps_by_source=(("cam", FPS),)))
    if left:
        assert _indices(jsonl) == [0, 1] and decoded(tmp_path / "v-seg1.mp4") == 4
        assert lines == [f"jsonl {jsonl}: 2 lines (finished after the postprocess stage failed)",
                         f"video {tmp_path / 'v-seg1.mp4'} (4 frames) (finished after the postprocess stage failed)"]
    else:
        assert lines == [] and _indices(jsonl) == [7] and sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


# ---------------------------------------------------------------- stage_main: abandon after a failed run
@dataclass
class _Stage(Stage):
    log: Path
    fail_in: str
    name: ClassVar[StageName] = StageName.POSTPROCESS

    def _call(self, what: str) -> None:
        with self.log.open("a") as f:
            f.write(what + "\n")
        if what == self.fail_in:
            raise OSError(f"{what} failed")

    def start(self) -> None:
        self._call("start")

    def run(self) -> None:
        self._call("run")

    def stop(self) -> None:
        self._call("stop")

    def abandon(self) -> None:
        self._call("abandon")


@dataclass(frozen=True, kw_only=True)
class _Spec(StageSpec):
    log: str
    fail_in: str

    @property
    def stage_name(self) -> StageName:
        return StageName.POSTPROCESS

    def build(self, *, ctx: Any, flags: Any, status: Any) -> Stage:
        return _Stage(Path(self.log), self.fail_in)


@pytest.mark.parametrize("fail_in,calls,exitcode,reports", [
    ("", ["start", "run", "stop"], 0, [(StatusKind.READY, {}), (StatusKind.DONE, {})]),
    ("run", ["start", "run", "abandon"], 1,
     [(StatusKind.READY, {}), (StatusKind.STAGE_ERROR, {}), (StatusKind.DONE, {"failed": 1})]),
    ("start", ["start", "abandon"], 1, [(StatusKind.STAGE_ERROR, {}), (StatusKind.DONE, {"failed": 1})]),
    # finishing failed after a clean run: a final error, and nothing for the runner to restart
    ("stop", ["start", "run", "stop"], 0,
     [(StatusKind.READY, {}), (StatusKind.STAGE_ERROR, {"final": 1}), (StatusKind.DONE, {})]),
])
def test_a_stage_that_fails_leaves_its_work_for_a_restart(tmp_path, fail_in, calls, exitcode, reports):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/control"
    pull.bind(endpoint)
    log = tmp_path / "calls"
    flags = [threading.Event() for _ in range(3)]
    proc = mp.get_context("fork").Process(target=stage_main, args=(
        _Spec(control=endpoint, log=str(log), fail_in=fail_in), *flags, os.getpid()))
    proc.start()
    proc.join(30)
    got = []
    while pull.poll(2000):
        msg = decode_message(pull.recv())
        assert isinstance(msg, StatusMsg)
        got.append((msg.kind, msg.counts))
        if msg.kind is StatusKind.DONE:
            break
    pull.close(0)
    ctx.term()
    assert proc.exitcode == exitcode and log.read_text().split() == calls
    assert got == reports


def test_a_final_error_fails_the_run_without_aborting_it():
    summary = RunSummary(model="m")
    abort = threading.Event()
    book = StatusBook(summary, abort)
    book.restartable = True
    error = StatusMsg(StageName.POSTPROCESS, StatusKind.STAGE_ERROR, "", "v.mp4: cannot write", {"final": 1})
    assert not book.apply(error)
    assert book.apply(StatusMsg(StageName.POSTPROCESS, StatusKind.DONE, "", "", {}))
    assert summary.errors == ["v.mp4: cannot write"] and summary.exit_code == 1 and not abort.is_set()
    assert "postprocess" not in book.last_error  # (not a restart's reason)


# ---------------------------------------------------------------- the annotated video's timing and size
@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".mov"])
def test_the_annotated_video_keeps_a_variable_frame_rate(tmp_path, suffix):
    pts = [3.0, 3.04, 3.08, 3.3, 3.31, 3.32, 4.0, 4.04, 4.041, 5.0, 5.04]  # from a file that starts at 3 s
    out = tmp_path / f"a{suffix}"
    sink = open_video(out, fps=30.0)
    for i, t in enumerate(pts):
        sink.write(video_result(i, pts_s=t))
    sink.close()
    assert times(out) == pytest.approx([t - pts[0] for t in pts], abs=1e-3)


def test_a_jump_back_or_a_long_gap_is_one_frame_at_the_nominal_rate(tmp_path):
    pts = [0.0, 0.2, 0.4, 0.0, 0.2, 0.4 + MAX_PTS_GAP_S + 1, 0.6 + MAX_PTS_GAP_S + 1]  # a reconnect, an outage
    out = tmp_path / "a.mp4"
    sink = open_video(out)
    for i, t in enumerate(pts):
        sink.write(video_result(i, pts_s=t))
    sink.close()
    assert times(out) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2], abs=1e-6)


@pytest.mark.parametrize("hw,coded_wh", [((1, 64), (64, 2)), ((64, 1), (2, 64)), ((1, 1), (2, 2)), ((5, 3), (2, 4))])
def test_frames_with_a_side_of_one_pixel_are_written(tmp_path, hw, coded_wh):
    out = tmp_path / "a.mp4"
    sink = open_video(out)
    for i in range(6):
        rgb = np.full((*hw, 3), 40 * i, np.uint8)
        sink.write(FrameResult(record("cam", i, hw, i / FPS), no_dets(), {}, rgb))
    sink.close()
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 6 and {(f.width, f.height) for f in frames} == {coded_wh}


# ---------------------------------------------------------------- a full disk under the annotated video
def _noise(i: int) -> FrameResult:  # frames that do not compress: a few KiB each
    rgb = np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    return FrameResult(record("cam", i, (96, 128), i / FPS), no_dets(), {}, rgb)


def test_a_full_disk_drops_the_annotated_frames_not_the_run(tmp_path, capfd):
    with mounted_tmpfs(tmp_path / "small", "128k") as small:
        out = small / "v.mp4"
        sink = open_video(out)
        for i in range(200):  # far more than fits: never raises
            sink.write(_noise(i))
        assert 0 < sink.frames_not_written < 200
        with pytest.raises(OSError, match=f"{out}: cannot write \\(No space left on device\\)"):
            sink.close()
        err = capfd.readouterr().err
        assert err.count("warning:") == 1 and "not written from here on" in err
        assert "frames not written" in sink.describe()
        if out.exists():  # what could be kept of it plays
            assert decoded(out) > 0
        assert not _partial(out).exists()


def test_no_room_for_the_regular_copy_keeps_the_fragmented_file(tmp_path):
    """The fragmented file fits, its remuxed copy does not: the fragmented one is the output, every frame in it."""
    probe = tmp_path / "probe.mp4"
    sink = open_video(probe)
    for i in range(20):
        sink.write(_noise(i))
    sink.abandon()
    size = _partial(probe).stat().st_size
    with mounted_tmpfs(tmp_path / "small", f"{(size * 3 // 2) // 4096 * 4096 + 4096}") as small:
        out = small / "v.mp4"
        sink = open_video(out)
        for i in range(20):
            sink.write(_noise(i))
        sink.end_of_stream(EndOfStream("cam", 20, EosReason.FINISHED))
        sink.close()
        assert decoded(out) == 20 and b"moof" in top_boxes(out)
        assert sorted(p.name for p in small.iterdir()) == ["v.mp4"]


def test_a_run_whose_video_disk_is_full_keeps_every_detection_and_fails(tmp_path):
    """The annotated video on a full disk: the JSONL holds every frame and its EOS, one error line, exit 1."""
    with mounted_tmpfs(tmp_path / "small", "300k") as small:
        jsonl = tmp_path / "r.jsonl"
        r = subprocess.run([sys.executable, "run_pipeline.py", "--publish", "none", "--quiet", "--source", str(DEMO),
                            "--max-frames", "60", "--jsonl", str(jsonl), "--video-out", str(small / "v.mp4")],
                           cwd=DEMO.parents[2], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = _indices_and_eos(jsonl)
    assert lines == list(range(60)) + ["eos"]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"{small / 'v.mp4'}: cannot write" in errors[0], r.stderr
    assert "restarted" not in r.stderr


def _indices_and_eos(path: Path) -> list[Any]:
    import json

    return [x.get("frame_index", "eos") for x in map(json.loads, path.read_bytes().splitlines())]


# ---------------------------------------------------------------- outputs that are inputs, or each other
@pytest.mark.parametrize("jsonl,video,rotate,sources,error", [
    ("o.jsonl", "o.mp4", None, [("a", "in.mp4")], None),
    ("in.mp4", None, None, [("a", "in.mp4")], "sinks.jsonl {d}/in.mp4: is the input of source a; the run would write "
                                               "over it"),
    (None, "in.mp4", None, [("a", "in.mp4")], "sinks.video_out {d}/in.mp4: is the input of source a"),
    (None, "./sub/../in.mp4", None, [("a", "in.mp4")], "sinks.video_out {d}/sub/../in.mp4: is the input of source a"),
    (None, "link.mp4", None, [("a", "in.mp4")], "sinks.video_out {d}/link.mp4: is the input of source a"),  # hard link
    (None, "v.mp4", None, [("a", "x.mp4"), ("in", "in.mp4")], None),  # v-in.mp4 is not in.mp4
    (None, "v.mp4", None, [("a", "x.mp4"), ("b", "v-b.mp4")], "sinks.video_out (source b) {d}/v-b.mp4: is the input"),
    ("o.mkv", "o.mkv", None, [("a", "in.mp4")], "sinks.jsonl and sinks.video_out name the same file ({d}/o.mkv)"),
    ("o.mkv", "o.mkv", "1h", [("a", "in.mp4")], None),  # rotated: the JSONL files are named by time
    ("v-b.mp4", "v.mp4", None, [("a", "in.mp4"), ("b", "rtsp://cam/b")], "sinks.jsonl and sinks.video_out (source b)"),
    ("rtsp.jsonl", None, None, [("a", "rtsp://host/in.mp4")], None),
])
def test_outputs_must_be_apart_from_each_other_and_the_inputs(tmp_path, jsonl, video, rotate, sources, error):
    (tmp_path / "in.mp4").write_bytes(b"video")
    (tmp_path / "sub").mkdir()
    os.link(tmp_path / "in.mp4", tmp_path / "link.mp4")
    (tmp_path / "v-b.mp4").write_bytes(b"video")
    d = str(tmp_path)

    def at(name: str | None) -> str | None:
        return None if name is None else f"{d}/{name}"

    kwargs = {"jsonl": at(jsonl), "video_out": at(video), "jsonl_rotate": rotate,
              "sources": [(sid, url if "://" in url else at(url)) for sid, url in sources]}
    if error is None:
        check_outputs_apart(**kwargs)
    else:
        with pytest.raises(ValueError, match="^" + re.escape(error.format(d=d))):
            check_outputs_apart(**kwargs)


def test_a_run_refuses_to_write_over_its_input(tmp_path):
    src = tmp_path / "in.mp4"
    shutil.copy(DEMO, src)
    before = src.read_bytes()
    r = subprocess.run([sys.executable, "run_pipeline.py", "--publish", "none", "--quiet", "--source", str(src),
                        "--video-out", str(src)], cwd=DEMO.parents[2], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: sinks.video_out {src}: is the input of source in; the run would write over it"]
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_a_jsonl_that_cannot_be_created_is_named_as_given():
    with pytest.raises(OSError) as e:
        JsonlSink(path="/proc/x.jsonl").open()  # (a directory where nothing can be created)
    assert e.value.filename == "/proc/x.jsonl"  # not its temporary name, /proc/.x.partial.jsonl
