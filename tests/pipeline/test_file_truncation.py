"""Files cut short that FFmpeg reads to a quiet end (Matroska, WebM) are reported, the frames before the cut kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.sources.file_reader import file_frames
from pipeline.sources.options import DecodeThreads
from pipeline.sources.probe import SourceError, probe_source
from pipeline.sources.truncation import matroska_declared_size
from tests.helpers.clips import write_h264

FRAMES = 30


def _write(path: Path, fmt: str, codec: str) -> Path:
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.gop_size = 10
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


@pytest.fixture(scope="module", params=[("a.mkv", "matroska", "libx264"), ("a.webm", "webm", "libvpx-vp9")])
def whole(request, tmp_path_factory):
    name, fmt, codec = request.param
    return _write(tmp_path_factory.mktemp("mkv") / name, fmt, codec)


def _decode(path: Path) -> tuple[int, list[str]]:
    info = probe_source(str(path), "a")
    errors: list[str] = []
    n = sum(1 for _ in file_frames(info, threads=DecodeThreads.AUTO, on_error=errors.append))
    return n, errors


def test_a_whole_file_declares_its_own_size_and_decodes_without_error(whole):
    assert matroska_declared_size(whole) == whole.stat().st_size
    assert _decode(whole) == (FRAMES, [])


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8, 0.99])
def test_a_cut_file_is_reported_with_what_it_lacks(whole, tmp_path, fraction):
    data = whole.read_bytes()
    cut = tmp_path / whole.name
    cut.write_bytes(data[:int(len(data) * fraction)])
    assert matroska_declared_size(cut) == len(data)
    try:
        n, errors = _decode(cut)
    except SourceError as e:  # the cut reaches into what the probe reads: refused before decoding
        assert fraction < 0.5 and "not a readable video" in str(e)
        return
    assert n < FRAMES if fraction < 0.9 else n <= FRAMES  # (the last 1 %: the index at the end, not frames)
    assert errors == [f"truncated (the file has {cut.stat().st_size} of the {len(data)} bytes its header declares)"]


@pytest.mark.parametrize("head,expected", [
    (b"", None),
    (b"\x00" * 64, None),  # not EBML
    (b"\x1a\x45\xdf\xa3\x80\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff", None),  # size unknown (live)
    (b"\x1a\x45\xdf\xa3\x80\x18\x53\x80\x67\x88", 10 + 8),  # an empty EBML header, a Segment of 8 bytes
    (b"\x1a\x45\xdf\xa3\x82\x42\x86\xec\x81\x00\x18\x53\x80\x67\x40\x10", 16 + 16),  # a Void before it, 2-byte size
    (b"\x1a\x45\xdf\xa3\x80\x1f\x43\xb6\x75\x81\x00", None),  # a Cluster first: not a file's head
    (b"\x1a\x45\xdf\xa3\x88\x42", None),  # cut inside the EBML header
])
def test_declared_size_edge_cases(tmp_path, head, expected):
    p = tmp_path / "x.mkv"
    p.write_bytes(head)
    assert matroska_declared_size(p) == expected


def test_an_mp4_declares_nothing_here(tmp_path):
    src = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "demo.mp4"
    assert matroska_declared_size(src) is None
    copy = tmp_path / "demo.mkv"  # a lying suffix: the content decides
    shutil.copy(src, copy)
    assert matroska_declared_size(copy) is None


@pytest.fixture(scope="module")
def faststart_mp4(tmp_path_factory):
    """60 frames of bikes.mp4 re-encoded as an MP4 with its index first (so that a cut file still opens)."""
    from tests.helpers.standin import bikes_path

    with av.open(str(bikes_path())) as c:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(60), c.decode(c.streams.video[0]))]
    return write_h264(tmp_path_factory.mktemp("mp4") / "whole.mp4", frames, container_options={"movflags": "faststart"})


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("skip", [0, 20])
def test_frame_threads_keep_every_frame_of_a_cut_mp4_that_one_thread_decodes(faststart_mp4, tmp_path, fraction, skip):
    """The frame-threaded decoder dropped the 2 frames it held when the last, partial packet failed."""
    cut = tmp_path / "cut.mp4"
    data = faststart_mp4.read_bytes()
    cut.write_bytes(data[: int(len(data) * fraction)])
    info = probe_source(str(cut), "a")
    got = {}
    for threads in (DecodeThreads.NONE, DecodeThreads.AUTO, DecodeThreads.FRAME):
        errors: list[str] = []
        got[threads] = list(file_frames(info, threads=threads, on_error=errors.append, skip=skip))
        assert errors and errors[0].startswith("truncated or corrupt (1 corrupt packets")
    reference = got[DecodeThreads.NONE]
    assert 20 < len(reference) < 60
    for threads in (DecodeThreads.AUTO, DecodeThreads.FRAME):
        assert [pts for _, pts, _ in got[threads]] == [pts for _, pts, _ in reference]
        for (a, _, _), (b, _, _) in zip(got[threads], reference, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
