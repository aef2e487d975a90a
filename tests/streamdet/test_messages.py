import math

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamdet.letterbox import letterbox_params
from streamdet.messages import (
    INLINE_SLOT,
    NO_SLOT,
    WIRE_VERSION,
    BatchMsg,
    CreditMsg,
    EndOfStream,
    EosReason,
    FrameMsg,
    FrameRecord,
    MsgKind,
    ResultMsg,
    StageName,
    StatusKind,
    StatusMsg,
    TensorSpec,
    check_source_id,
    decode_message,
)


def frame(**kw):
    base = dict(source_id="cam_1", frame_index=3, pts_s=0.12, frame_hw=(272, 640), slot=2, pool="sd-x-f0",
                capture_time=10.5, decode_ms=1.25)
    base.update(kw)
    return FrameMsg(**base)


def record(**kw):
    f = frame(**kw)
    return FrameRecord(f, letterbox_params(f.frame_hw, (640, 384)), 0.7)


def test_frame_roundtrip():
    f = frame()
    assert FrameMsg.decode(f.encode()) == f
    assert decode_message(f.encode()) == f
    assert f.nbytes == 272 * 640 * 3


@pytest.mark.parametrize(
    "kw",
    [
        {"source_id": ""},
        {"source_id": "a.b"},  # '.' separates topic parts
        {"source_id": "x" * 65},
        {"source_id": "rtsp://u:p@h"},
        {"frame_index": -1},
        {"pts_s": math.nan},
        {"pts_s": math.inf},
        {"frame_hw": (0, 640)},
        {"frame_hw": (272,)},
        {"slot": -3},
        {"slot": 0, "pool": ""},
        {"capture_time": -1.0},
        {"decode_ms": -0.1},
        {"decode_ms": math.inf},
    ],
)
def test_frame_rejects(kw):
    with pytest.raises(ValueError, match="expected"):
        frame(**kw)


@pytest.mark.parametrize("slot,pool", [(INLINE_SLOT, ""), (NO_SLOT, ""), (0, "p")])
def test_frame_slot_kinds(slot, pool):
    assert FrameMsg.decode(frame(slot=slot, pool=pool).encode()).slot == slot


def test_record_checks_letterbox_matches_frame():
    f = frame()
    with pytest.raises(ValueError, match="letterbox frame_hw"):
        FrameRecord(f, letterbox_params((720, 1280), (640, 384)), 0.0)


def test_batch_roundtrip_and_checks():
    recs = (record(frame_index=0), record(frame_index=1))
    b = BatchMsg(recs, 1, "sd-x-t", (4, 3, 384, 640), "float32")
    assert BatchMsg.decode(b.encode()) == b
    assert b.tensor_nbytes == 4 * 3 * 384 * 640 * 4
    with pytest.raises(ValueError, match="batch size"):
        BatchMsg(recs, 1, "p", (1, 3, 384, 640))
    with pytest.raises(ValueError, match="tensor_shape"):
        BatchMsg(recs, 1, "p", (2, 4, 384, 640))
    with pytest.raises(ValueError, match="at least one frame"):
        BatchMsg((), 1, "p", (2, 3, 384, 640))
    with pytest.raises(ValueError, match="tensor_dtype"):
        BatchMsg(recs, 1, "p", (2, 3, 384, 640), "int8")
    with pytest.raises(ValueError, match="NO_SLOT"):
        BatchMsg(recs, NO_SLOT, "", (2, 3, 384, 640))


def test_result_roundtrip_and_array_parts():
    recs = (record(frame_index=0), record(frame_index=1))
    out = np.arange(2 * 7 * 5, dtype=np.float32).reshape(2, 7, 5)
    r = ResultMsg(recs, 12.5, (TensorSpec.of("output0", out),))
    back = ResultMsg.decode(r.encode())
    assert back == r
    arr = back.outputs[0].array_from(out.tobytes())
    np.testing.assert_array_equal(arr, out)
    with pytest.raises(ValueError, match="bytes"):
        back.outputs[0].array_from(out.tobytes()[:-4])
    with pytest.raises(ValueError, match="leading dim"):
        ResultMsg(recs, 1.0, (TensorSpec("output0", "float32", (3, 7, 5)),))


def test_eos_and_credit_and_status_roundtrip():
    for m in (
        EndOfStream("cam", 250, EosReason.FINISHED),
        EndOfStream("cam", 114, EosReason.ERROR, "truncated"),
        CreditMsg("pool", 3),
        StatusMsg(StageName.POSTPROCESS, StatusKind.PROGRESS, "", "", {"frames": 4, "detections": 9}),
        StatusMsg(StageName.DECODE, StatusKind.SOURCE_ERROR, "cam", "x.mp4: corrupt"),
    ):
        assert decode_message(m.encode()) == m
    with pytest.raises(ValueError, match="error message"):
        EndOfStream("cam", 1, EosReason.ERROR)
    with pytest.raises(ValueError):
        EndOfStream("cam", 1, "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slot"):
        CreditMsg("pool", -1)
    with pytest.raises(ValueError, match="message"):
        StatusMsg(StageName.ENGINE, StatusKind.STAGE_ERROR)
    with pytest.raises(ValueError, match="counts"):
        StatusMsg(StageName.ENGINE, StatusKind.PROGRESS, counts={"frames": -1})


def test_decode_rejects_bad_wire():
    good = frame().encode()
    obj = msgpack.unpackb(good)
    with pytest.raises(ValueError, match="wire version"):
        decode_message(msgpack.packb([WIRE_VERSION + 1, *obj[1:]]))
    with pytest.raises(ValueError, match="message kind"):
        decode_message(msgpack.packb([WIRE_VERSION, 99, *obj[2:]]))
    with pytest.raises(ValueError, match="fields"):
        decode_message(msgpack.packb([WIRE_VERSION, int(MsgKind.FRAME), "cam"]))
    with pytest.raises(ValueError, match="msgpack"):
        decode_message(b"\xc1\xc1")
    with pytest.raises(ValueError):
        decode_message(msgpack.packb({"a": 1}))
    with pytest.raises(ValueError, match="expected a BatchMsg"):
        BatchMsg.decode(good)


def test_messages_are_frozen():
    f = frame()
    with pytest.raises(AttributeError):
        f.slot = 1  # type: ignore[misc]


def test_check_source_id():
    assert check_source_id("bikes-2_x") == "bikes-2_x"


@given(
    idx=st.integers(0, 2**40),
    pts=st.floats(allow_nan=False, allow_infinity=False, width=64),
    h=st.integers(1, 10_000),
    w=st.integers(1, 10_000),
    slot=st.integers(-2, 1000),
)
def test_frame_roundtrip_property(idx, pts, h, w, slot):
    f = FrameMsg("s", idx, pts, (h, w), slot, "pool" if slot >= 0 else "", 1.0, 0.0)
    assert FrameMsg.decode(f.encode()) == f
