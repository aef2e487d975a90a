"""The sinks survive what a self-healing pipeline meets: SIGKILL and restart, a full disk, rotation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import pytest

from pipeline.stages import jsonl_sink
from pipeline.stages.jsonl_sink import JsonlRotate, parse_rotate
from pipeline.stages.sinks import FrameResult, JsonlSink, VideoSink, eos_payload
from streamdet.messages import EndOfStream, EosReason
from tests.helpers.durable_sinks import (
    FPS,
    T0,
    Clock,
    Disk,
    decoded,
    killed_writer,
    mounted_tmpfs,
    no_dets,
    record,
    times,
    top_boxes,
    video_result,
)


def _payload(i: int) -> dict:
    return {"schema": "streamdet.detections/2", "source_id": "cam", "frame_index": i, "pts_s": i / 3,
            "label": "caf\u00e9", "detections": [{"box_xyxy": [1.5, 2.25, 10.0, 20.0], "score": 0.5}]}


def _line(p: dict) -> bytes:
    return (json.dumps(p, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _write(sink: JsonlSink, i: int) -> None:
    sink.write(FrameResult(record(i=i), no_dets(), _payload(i)))


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a torn last line"
    return [json.loads(x) for x in data.splitlines()]


# ---------------------------------------------------------------- parse_rotate
@pytest.mark.parametrize("text,want", [
    ("1h", JsonlRotate(seconds=3600.0)),
    ("30m", JsonlRotate(seconds=1800.0)),
    ("45s", JsonlRotate(seconds=45.0)),
    ("2d", JsonlRotate(seconds=172800.0)),
    (" 07s ", JsonlRotate(seconds=7.0)),
    ("1KB", JsonlRotate(max_bytes=1024)),
    ("10MB", JsonlRotate(max_bytes=10 * 1024**2)),
    ("10mb", JsonlRotate(max_bytes=10 * 1024**2)),
    ("1GB", JsonlRotate(max_bytes=1024**3)),
    ("3Gb", JsonlRotate(max_bytes=3 * 1024**3)),
])
def test_parse_rotate_accepts(text, want):
    assert parse_rotate(text) == want


@pytest.mark.parametrize("text", ["", " ", "h", "1", "0h", "0MB", "-1h", "1.5h", "10M", "1H", "10 MB", "1w",
                                  "1B", "1TB", "abc", "1hh", "1h30m", "+1h"])
def test_parse_rotate_rejects(text):
    with pytest.raises(ValueError, match=r"expected a duration <N>s\|m\|h\|d .* or a size <N>KB\|MB\|GB") as e:
        parse_rotate(text)
    assert repr(text) in str(e.value)


def test_rotate_and_flush_are_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match="'10M'"):
        JsonlSink(path=tmp_path / "o.jsonl", rotate="10M")
    with pytest.raises(ValueError, match="flush_ms"):
        JsonlSink(path=tmp_path / "o.jsonl", flush_ms=-1)
    with pytest.raises(ValueError, match="exactly one"):
        JsonlRotate()


# ---------------------------------------------------------------- clean runs, flushing
@pytest.mark.parametrize("flush_ms", [0.0, 50.0])
def test_clean_run_is_byte_identical_to_plain_json_lines(tmp_path, flush_ms):
    out = tmp_path / "o.jsonl"
    sink = JsonlSink(path=out, flush_ms=flush_ms)
    sink.open()
    for i in range(5):
        _write(sink, i)
    eos = EndOfStream("cam", 5, EosReason.FINISHED)
    sink.end_of_stream(eos)
    assert not out.exists()
    sink.close()
    sink.close()  # idempotent
    want = b"".join(_line(_payload(i)) for i in range(5))
    want += _line(eos_payload(eos))
    assert out.read_bytes() == want
    assert list(tmp_path.iterdir()) == [out]
    assert sink.lines == 6 and sink.describe() == f"jsonl {out}: 6 lines"


def test_every_line_reaches_the_file_at_once(tmp_path):
    out = tmp_path / "o.jsonl"
    sink = JsonlSink(path=out)
    sink.open()
    for i in range(3):
        _write(sink, i)
        with open(_partial(out), "rb") as other:  # another handle: what a killed process leaves
            assert other.read() == b"".join(_line(_payload(k)) for k in range(i + 1))
    sink.close()


def test_flush_window(tmp_path):
    out, clock = tmp_path / "o.jsonl", Clock()
    sink = JsonlSink(path=out, flush_ms=100, clock=clock)
    sink.open()
    _write(sink, 0)
    clock.t += 0.06
    _write(sink, 1)
    assert _partial(out).read_bytes() == b"" and sink.lines == 0  # within the window: still buffered
    clock.t += 0.06
    _write(sink, 2)  # over 100 ms since the last flush: all three go out
    assert _partial(out).read_bytes() == b"".join(_line(_payload(i)) for i in range(3)) and sink.lines == 3
    clock.t += 0.01
    _write(sink, 3)
    assert sink.lines == 3
    sink.close()  # close flushes the rest
    assert out.read_bytes() == b"".join(_line(_payload(i)) for i in range(4)) and sink.lines == 4


# ---------------------------------------------------------------- resume after a crash
def test_resume_appends_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "o.jsonl"
    _partial(out).write_bytes(_line(_payload(0)) + _line(_payload(1)) + b'{"schema":"streamdet.det')
    sink = JsonlSink(path=out, resume=True)
    sink.open()
    last = sink.resumed_last_line
    _write(sink, 2)
    sink.close()
    assert out.read_bytes() == b"".join(_line(_payload(i)) for i in range(3))
    assert sink.lines == 3 and sink.describe() == f"jsonl {out}: 3 lines"  # the file's lines, not this sink's
    assert last == _line(_payload(1))[:-1]  # the last whole line the dead sink wrote (for the ledger's catch-up)
    # without resume, a leftover partial file is started over
    _partial(out).write_bytes(_line(_payload(0)))
    sink = JsonlSink(path=out)
    sink.open()
    _write(sink, 5)
    sink.close()
    assert out.read_bytes() == _line(_payload(5))


def test_resume_without_a_partial_file_starts_a_new_one(tmp_path):
    out = tmp_path / "o.jsonl"
    sink = JsonlSink(path=out, resume=True)
    sink.open()
    _write(sink, 0)
    sink.close()
    assert out.read_bytes() == _line(_payload(0))

@pytest.mark.parametrize("left", ["committed", "partial"])
def test_resume_after_finish_keeps_what_the_dead_sink_finished(tmp_path, left):
    """Killed while closing (every EOS published): a file already renamed into place is kept, a partial one finished."""
    out = tmp_path / "o.jsonl"
    whole = b"".join(_line(_payload(i)) for i in range(3))
    (out if left == "committed" else _partial(out)).write_bytes(whole)
    sink = JsonlSink(path=out, resume=True, after_finish=True)
    sink.open()
    sink.close()
    assert out.read_bytes() == whole and not _partial(out).exists()
    assert sink.describe() == f"jsonl {out}: 3 lines"  # the file's lines, committed by the dead sink or here


# ---------------------------------------------------------------- rotation
def _segment_key(p: Path) -> tuple[str, int]:
    stem = p.stem.split("-", 1)[1]
    stamp, _, k = stem.partition("-")
    return stamp, int(k or 1)


def test_rotation_by_size(tmp_path):
    out, clock = tmp_path / "o.jsonl", Clock()
    sink = JsonlSink(path=out, rotate="1KB", clock=clock)
    sink.open()
    for i in range(40):
        _write(sink, i)
        clock.t += 0.01
    sink.close()
    files = sorted(tmp_path.iterdir(), key=_segment_key)
    assert len(files) > 3 and not any(f.name.startswith(".") for f in files)
    assert [f.name for f in files[:3]] == ["o-20231114T221320Z.jsonl", "o-20231114T221320Z-2.jsonl",
                                           "o-20231114T221320Z-3.jsonl"]  # same second: numbered
    line_len = len(_line(_payload(10)))
    for f in files[:-1]:
        assert 1024 <= f.stat().st_size < 1024 + line_len
    assert [x["frame_index"] for f in files for x in _read_lines(f)] == list(range(40))
    assert sink.lines == 40
    described = sink.describe()
    assert all(f"{f} (" in described for f in files)


def test_rotation_by_time(tmp_path):
    out, clock = tmp_path / "o.jsonl", Clock()
    sink = JsonlSink(path=out, rotate="1h", clock=clock)
    sink.open()
    for dt, i in ((0, 0), (1800, 1), (3600, 2), (3700, 3), (7300, 4), (7301, 5)):
        clock.t = T0 + dt
        _write(sink, i)
    sink.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["o-20231114T221320Z.jsonl", "o-20231114T231320Z.jsonl", "o-20231115T001500Z.jsonl"]
    assert [[x["frame_index"] for x in _read_lines(tmp_path / n)] for n in names] == [[0, 1], [2, 3], [4, 5]]
    assert sink.describe() == "jsonl " + ", ".join(f"{tmp_path / n} (2 lines)" for n in names)


def test_an_idle_first_segment_is_named_after_its_first_line(tmp_path):
    out, clock = tmp_path / "o.jsonl", Clock()
    sink = JsonlSink(path=out, rotate="1h", clock=clock)
    sink.open()
    clock.t += 5 * 3600
    _write(sink, 0)
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["o-20231115T031320Z.jsonl"]


def test_rotation_resumes_the_newest_unfinished_segment(tmp_path):
    out, clock = tmp_path / "o.jsonl", Clock()
    first = JsonlSink(path=out, rotate="1h", clock=clock)
    first.open()
    _write(first, 0)
    clock.t += 3600
    _write(first, 1)  # second segment
    # killed here: no close; a torn line at the end, and an older unfinished segment beside it
    seg2 = tmp_path / ".o-20231114T231320Z.partial.jsonl"
    with open(seg2, "ab") as f:
        f.write(b'{"torn":')
    (tmp_path / ".o-20231114T201320Z.partial.jsonl").write_bytes(_line(_payload(99)) + b"{")
    clock.t += 1800
    again = JsonlSink(path=out, rotate="1h", resume=True, clock=clock)
    again.open()
    _write(again, 2)  # same hour as the resumed segment: appended to it
    clock.t += 1800
    _write(again, 3)  # an hour after that segment started: a new one
    again.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["o-20231114T201320Z.jsonl", "o-20231114T221320Z.jsonl", "o-20231114T231320Z.jsonl",
                     "o-20231115T001320Z.jsonl"]
    got = [[x["frame_index"] for x in _read_lines(tmp_path / n)] for n in names]
    assert got == [[99], [0], [1, 2], [3]]
    assert again.describe() == f"jsonl {tmp_path / names[2]} (2 lines), {tmp_path / names[3]} (1 lines)"


# ---------------------------------------------------------------- write errors (injected)
@pytest.fixture
def disk(monkeypatch) -> Disk:
    d = Disk()
    monkeypatch.setattr(jsonl_sink, "_open_raw", d.open)
    return d


def test_a_full_disk_is_counted_warned_once_and_retried(tmp_path, disk):
    out, other_out, clock = tmp_path / "o.jsonl", tmp_path / "side.jsonl", Clock()
    warnings: list[str] = []
    sink = JsonlSink(path=out, warn=warnings.append, clock=clock)
    other = JsonlSink(path=other_out)  # another sink of the same stage: unaffected
    sink.open()
    other.open()

    def write_both(i: int) -> None:
        for s in (sink, other):
            _write(s, i)

    for i in range(3):
        write_both(i)
    disk.full, disk.room = True, 10
    write_both(3)  # 10 bytes reach the file, then ENOSPC: the torn bytes are cut
    assert warnings == [f"{out}: cannot write (No space left on device); lines are counted as not written "
                        "until it can write again"]
    assert _partial(out).read_bytes() == b"".join(_line(_payload(i)) for i in range(3))
    opens = disk.opens
    clock.t += 0.5
    write_both(4)  # within a second of the failure: not even tried
    assert disk.opens == opens and sink.lines_not_written == 2
    clock.t += 0.6
    write_both(5)  # retried (reopened), still full
    assert disk.opens == opens + 1 and sink.lines_not_written == 3 and len(warnings) == 1
    disk.full = False
    clock.t += 0.5
    write_both(6)  # too soon after the last try
    clock.t += 0.6
    write_both(7)
    assert warnings[1:] == [f"{out}: writing again after 4 lines not written"]
    for i in range(8, 10):
        write_both(i)
    sink.end_of_stream(EndOfStream("cam", 10, EosReason.FINISHED))
    sink.close()
    other.close()
    assert [x["frame_index"] for x in _read_lines(out)[:-1]] == [0, 1, 2, 7, 8, 9]
    assert sink.lines == 7 and sink.lines_not_written == 4
    assert sink.describe() == f"jsonl {out}: 7 lines, 4 lines not written"
    assert [x["frame_index"] for x in _read_lines(other_out)] == list(range(10))


def test_a_full_disk_with_rotation_opens_a_new_segment(tmp_path, disk):
    out, clock = tmp_path / "o.jsonl", Clock()
    warnings: list[str] = []
    sink = JsonlSink(path=out, rotate="1h", warn=warnings.append, clock=clock)
    sink.open()
    _write(sink, 0)
    disk.full, disk.room = True, 5
    _write(sink, 1)
    for k in range(3):  # a retry a second, each failing: no empty files are left behind
        clock.t += 1.0
        _write(sink, 2 + k)
    disk.full = False
    clock.t += 1.0
    _write(sink, 5)
    sink.close()
    assert len(warnings) == 2 and warnings[1].endswith("writing again after 4 lines not written")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["o-20231114T221320Z.jsonl", "o-20231114T221324Z.jsonl"]
    assert [[x["frame_index"] for x in _read_lines(tmp_path / n)] for n in names] == [[0], [5]]


def test_a_full_disk_at_close_loses_the_buffered_lines_only(tmp_path, disk):
    out, clock = tmp_path / "o.jsonl", Clock()
    warnings: list[str] = []
    sink = JsonlSink(path=out, flush_ms=1000, warn=warnings.append, clock=clock)
    sink.open()
    clock.t += 2
    _write(sink, 0)  # flushed (window passed)
    _write(sink, 1)
    _write(sink, 2)
    disk.full, disk.room = True, len(_line(_payload(1))) + 3
    sink.close()  # no exception: line 1 fits, line 2 is cut and counted
    assert len(warnings) == 1 and sink.lines == 2 and sink.lines_not_written == 1
    assert [x["frame_index"] for x in _read_lines(out)] == [0, 1]


# ---------------------------------------------------------------- write errors (a real full tmpfs)
@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (needs root with CAP_SYS_ADMIN: skipped otherwise)."""
    with mounted_tmpfs(tmp_path / "tiny", "64k") as mnt:
        yield mnt


def test_a_really_full_disk(tmp_path, tiny_fs):
    out, other_out, clock = tiny_fs / "o.jsonl", tmp_path / "side.jsonl", Clock()
    warnings: list[str] = []
    filler = tiny_fs / "filler"
    filler.write_bytes(b"\0" * 32 * 1024)
    sink = JsonlSink(path=out, warn=warnings.append, clock=clock)
    other = JsonlSink(path=other_out)
    sink.open()
    other.open()
    n = 0
    while not sink.lines_not_written:
        for s in (sink, other):
            _write(s, n)
        n += 1
        assert n < 1000
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    for _ in range(5):
        for s in (sink, other):
            _write(s, n)
        n += 1
        clock.t += 0.3
    filler.unlink()
    clock.t += 1.0
    for _ in range(5):
        for s in (sink, other):
            _write(s, n)
        n += 1
    sink.close()
    other.close()
    assert len(warnings) == 2 and "writing again after" in warnings[1]
    kept = [x["frame_index"] for x in _read_lines(out)]  # whole lines only
    assert len(kept) == sink.lines and sink.lines + sink.lines_not_written == n
    assert kept[-5:] == list(range(n - 5, n)) and kept == sorted(kept)
    assert [x["frame_index"] for x in _read_lines(other_out)] == list(range(n))


# ---------------------------------------------------------------- video: crash tolerance
def test_a_killed_video_sink_leaves_a_playable_partial_and_resume_keeps_it(tmp_path):
    out = tmp_path / "a.mp4"
    killed_writer(out, 30)
    assert not out.exists()
    kept = decoded(_partial(out))  # fragmented: everything up to the last whole fragment decodes
    assert 10 <= kept < 30
    sink = VideoSink(path=out, fps_by_source={"cam": FPS}, class_names=["a"], resume=True)
    sink.open()
    seg = tmp_path / "a-seg1.mp4"
    assert seg.exists() and not _partial(out).exists()
    assert decoded(seg) == kept and b"moof" not in top_boxes(seg)  # a regular MP4
    assert times(seg) == [i / FPS for i in range(kept)]  # from the first frame on, as a direct file has them
    for i in range(7):
        sink.write(video_result(30 + i))
    sink.close()
    assert decoded(out) == 7 and b"moof" not in top_boxes(out)
    assert sink.describe() == f"video {seg} ({kept} frames), {out} (7 frames)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-seg1.mp4", "a.mp4"]


def test_resume_keeps_a_fragment_cut_short_up_to_the_last_whole_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    killed_writer(src / "a.mp4", 30)
    data = _partial(src / "a.mp4").read_bytes()
    for k, cut in enumerate((len(data), len(data) - 1, len(data) - 300, 900, 600, 100, 0)):
        d = tmp_path / f"cut{k}"
        d.mkdir()
        out = d / "a.mp4"
        (d / "a-seg1.mp4").write_bytes(b"taken")  # a segment of an earlier crash: this one becomes seg2
        _partial(out).write_bytes(data[:cut])
        sink = VideoSink(path=out, fps_by_source={"cam": FPS}, class_names=["a"], resume=True)
        sink.open()
        assert not _partial(out).exists()
        seg = d / "a-seg2.mp4"
        if seg.exists():
            assert decoded(seg) > 0 and f"{seg} (" in sink.describe()
        else:
            assert sink.describe() == f"video {out} (no frames)"
    whole = decoded(_partial(src / "a.mp4"))
    assert decoded(tmp_path / "cut0" / "a-seg2.mp4") == whole
    assert 0 < decoded(tmp_path / "cut1" / "a-seg2.mp4") < whole  # the cut fragment is left out


def test_clean_close_gives_a_regular_mp4_with_every_frame(tmp_path):
    out = tmp_path / "a.mp4"
    sink = VideoSink(path=out, fps_by_source={"cam": FPS}, class_names=["a"])
    sink.open()
    for i in range(30):
        sink.write(video_result(i))
        if i == 25:  # fragments were written under the temporary name as the frames came
            assert b"moof" in top_boxes(_partial(out))
    sink.end_of_stream(EndOfStream("cam", 30, EosReason.FINISHED))
    sink.close()
    assert list(tmp_path.iterdir()) == [out] and b"moof" not in top_boxes(out)
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and (s.codec_context.width, s.codec_context.height) == (64, 48)
        assert s.average_rate == FPS
        assert sum(1 for _ in c.decode(s)) == 30
    assert times(out) == [i / FPS for i in range(30)]
    assert sink.describe() == f"video {out} (30 frames)"


def test_matroska_partial_is_renamed_into_a_segment(tmp_path):
    out = tmp_path / "a.mkv"
    sink = VideoSink(path=out, fps_by_source={"cam": FPS}, class_names=["a"])
    sink.open()
    for i in range(6):
        sink.write(video_result(i))
    sink.close()
    os.replace(out, _partial(out))  # as if the run had died before finishing it
    again = VideoSink(path=out, fps_by_source={"cam": FPS}, class_names=["a"], resume=True)
    again.open()
    assert decoded(tmp_path / "a-seg1.mkv") == 6
    assert again.describe() == f"video {tmp_path / 'a-seg1.mkv'} (6 frames)"


def test_the_first_configured_source_gets_the_plain_name(tmp_path):
    out = tmp_path / "v.mp4"
    sink = VideoSink(path=out, fps_by_source={"a": FPS, "b": FPS}, class_names=["x"])
    sink.open()
    sink.write(video_result(0, "b"))  # b arrives first, still a's is the plain name
    sink.write(video_result(0, "a"))
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-b.mp4", "v.mp4"]
