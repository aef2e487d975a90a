import math
from dataclasses import dataclass

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
    PoolHandleMsg,
    PreviewFrameMsg,
    ResultMsg,
    SourceAddedMsg,
    SourceState,
    SourceStatusMsg,
    StageName,
    StageRestartMsg,
    StatsSnapshotMsg,
    StatusKind,
    StatusMsg,
    TensorSpec,
    check_source_id,
    decode_message,
    wire,
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


# Bytes of wire version 3 for `wire_samples()` (version 1, the layout of the hand-written encoders
# the generic codec replaced, gained CreditMsg.tag, BatchMsg.generation/tag and StageRestartMsg for
# the self-healing stages in version 2, FrameRecord.crop for secondary models in version 3): the
# codec must keep writing exactly these until the version changes.
WIRE_HEX = {
    "batch": (
        "990402929498a563616d5f3100cb000000000000000092cd0110cd028000a773642d782d6630cb4025000000000000cb"
        "3ff400000000000098cd0110cd0280cd0280cd0180cd0280cd01100038cb3fe8000000000000909498a563616d5f3101"
        "cb3fbeb851eb851eb892cd02d0cd050001a773642d782d6630cb4025000000000000cb3ff400000000000098cd02d0cd"
        "0500cd0280cd0180cd0280cd0168000ccb3fe80000000000009001a673642d782d74940403cd0180cd0280a7666c6f61"
        "74313600ff"
    ),
    "batch_crop": (
        "990402919498a563616d5f3101cb3fbeb851eb851eb892cd02d0cd050001a773642d782d6630cb4025000000000000cb"
        "3ff4000000000000983cccc8cd018060cd0140602000cb3fd00000000000009303cd01907800a673642d782d63940803"
        "60cd0180a7666c6f617433320005"
    ),
    "batch_generation": (
        "990402929498a563616d5f3100cb000000000000000092cd0110cd028000a773642d782d6630cb4025000000000000cb"
        "3ff400000000000098cd0110cd0280cd0280cd0180cd0280cd01100038cb3fe8000000000000909498a563616d5f3101"
        "cb3fbeb851eb851eb892cd02d0cd050001a773642d782d6630cb4025000000000000cb3ff400000000000098cd02d0cd"
        "0500cd0280cd0180cd0280cd0168000ccb3fe80000000000009001a873642d782d742e31940403cd0180cd0280a7666c"
        "6f617433320211"
    ),
    "credit": "950405a4706f6f6c03ff",
    "credit_tagged": "950405a4706f6f6c0329",
    "eos": "960404a363616dccfaa866696e6973686564a0",
    "eos_error": "960404a363616d72a56572726f72a97472756e6361746564",
    "eos_removed": "960404a563616d5f3228a772656d6f766564a0",
    "frame": (
        "9a0401a563616d5f3103cb3fbeb851eb851eb892cd0110cd028002a773642d782d6630cb4025000000000000cb3ff400"
        "0000000000"
    ),
    "frame_int_floats": "9a0401a16300cb0000000000000000920204ffa0cb401c000000000000cb3fe0000000000000",
    "pool_handle": "940408a673642d782d74c40493010203",
    "preview_frame": "96040ba563616d5f320792cd0168cd0280c408ffd8ffe06a706567",
    "result": (
        "980403929498a563616d5f3100cb000000000000000092cd0110cd028000a773642d782d6630cb4025000000000000cb"
        "3ff400000000000098cd0110cd0280cd0280cd0180cd0280cd01100038cb3fe8000000000000909498a563616d5f3101"
        "cb3fbeb851eb851eb892cd02d0cd050001a773642d782d6630cb4025000000000000cb3ff400000000000098cd02d0cd"
        "0500cd0280cd0180cd0280cd0168000ccb3fe800000000000090cb40280000000000009293a76f757470757430a7666c"
        "6f61743332930254cd13b093a570726f746fa7666c6f6174313694022060cca0ffa000"
    ),
    "result_pooled": (
        "980403929498a563616d5f3100cb000000000000000092cd0110cd028000a773642d782d6630cb4025000000000000cb"
        "3ff400000000000098cd0110cd0280cd0280cd0180cd0280cd01100038cb3fe8000000000000909498a563616d5f3101"
        "cb3fbeb851eb851eb892cd02d0cd050001a773642d782d6630cb4025000000000000cb3ff400000000000098cd02d0cd"
        "0500cd0280cd0180cd0280cd0168000ccb3fe800000000000090cb40290000000000009193a76f757470757430a7666c"
        "6f6174333293020ecd1ffe03a973642d782d6f302e3129"
    ),
    "source_added": (
        "99040aa563616d5f3203c300a773642d782d6131b76970633a2f2f2f746d702f782f637265646974732d6131cb403900"
        "0000000000"
    ),
    "source_status": "9c0407a363616dac7265636f6e6e656374696e6702cb4010000000000000a4676f6e65cb41d954fc40000000010203c2",
    "source_status_default": "9c0407a363616da9636f6e6e656374656400cb0000000000000000a0cb0000000000000000000000c3",
    "stage_restart": (
        "990409a6656e67696e65a002b16b696c6c6564206279205349474b494c4ccb41d954fc40000000cb3fe8000000000000"
        "03"
    ),
    "stats_snapshot": (
        "94040cc4157b2263616d5f32223a7b22667073223a352e307d7dc420232048454c502073747265616d6465745f667261"
        "6d65735f746f74616c20780a"
    ),
    "status": "970406ab706f737470726f63657373a870726f6772657373a0a082a66672616d657304aa646574656374696f6e7309",
    "status_error": "970406a66465636f6465ac736f757263655f6572726f72a363616dae782e6d70343a20636f727275707480",
}


def wire_samples():
    """One instance of every message type, some with int / numpy values in float and bool fields."""

    def rec(i, hw=(272, 640)):
        f = FrameMsg("cam_1", i, 0.12 * i, hw, i, "sd-x-f0", 10.5, 1.25)
        return FrameRecord(f, letterbox_params(hw, (640, 384)), 0.75)

    recs = (rec(0), rec(1, (720, 1280)))
    return {
        "frame": FrameMsg("cam_1", 3, 0.12, (272, 640), 2, "sd-x-f0", 10.5, 1.25),
        "frame_int_floats": FrameMsg("c", 0, 0, (2, 4), -1, "", 7, np.float32(0.5)),  # type: ignore[arg-type]
        "batch": BatchMsg(recs, 1, "sd-x-t", (4, 3, 384, 640), "float16"),
        "result": ResultMsg(recs, 12, (TensorSpec("output0", "float32", (2, 84, 5040)),
                                       TensorSpec("proto", "float16", (2, 32, 96, 160)))),
        "result_pooled": ResultMsg(recs, 12.5, (TensorSpec("output0", "float32", (2, 14, 8190)),), 3, "sd-x-o0.1",
                                   41),
        "eos": EndOfStream("cam", 250, EosReason.FINISHED),
        "eos_error": EndOfStream("cam", 114, "error", "truncated"),  # type: ignore[arg-type]
        "credit": CreditMsg("pool", 3),
        "status": StatusMsg(StageName.POSTPROCESS, StatusKind.PROGRESS, "", "", {"frames": 4, "detections": 9}),
        "status_error": StatusMsg("decode", "source_error", "cam", "x.mp4: corrupt"),  # type: ignore[arg-type]
        "source_status": SourceStatusMsg("cam", SourceState.RECONNECTING, 2, 4, "gone", 1.7e9, 1, 2, 3, 0),  # type: ignore[arg-type]
        "source_status_default": SourceStatusMsg("cam", "connected"),  # type: ignore[arg-type]
        "pool_handle": PoolHandleMsg("sd-x-t", b"\x93\x01\x02\x03"),
        "stage_restart": StageRestartMsg(StageName.ENGINE, "", 2, "killed by SIGKILL", 1.7e9, 0.75, 3),
        "credit_tagged": CreditMsg("pool", 3, 41),
        "batch_generation": BatchMsg(recs, 1, "sd-x-t.1", (4, 3, 384, 640), "float32", 2, 17),
        "source_added": SourceAddedMsg("cam_2", 3, True, 0, "sd-x-a1", "ipc:///tmp/x/credits-a1", 25),  # type: ignore[arg-type]
        "preview_frame": PreviewFrameMsg("cam_2", 7, (360, 640), b"\xff\xd8\xff\xe0jpeg"),
        "stats_snapshot": StatsSnapshotMsg(b'{"cam_2":{"fps":5.0}}', b"# HELP streamdet_frames_total x\n"),
        "eos_removed": EndOfStream("cam_2", 40, EosReason.REMOVED),
        "batch_crop": BatchMsg((FrameRecord(recs[1].frame, letterbox_params((60, 200), (384, 96)), 0.25,
                                            (3, 400, 120)),), 0, "sd-x-c", (8, 3, 96, 384), "float32", 0, 5),
    }


def test_samples_cover_every_kind():
    kinds = {type(m).KIND for m in wire_samples().values()}
    assert kinds == set(MsgKind)


@pytest.mark.parametrize("name", sorted(WIRE_HEX))
def test_wire_bytes_unchanged(name):
    msg = wire_samples()[name]
    assert msg.encode().hex() == WIRE_HEX[name]
    assert decode_message(bytes.fromhex(WIRE_HEX[name])) == msg
    assert type(msg).decode(msg.encode()) == msg


def test_decode_checks_nested_field_counts():
    fields = msgpack.unpackb(wire_samples()["batch"].encode())
    fields[2][0] = fields[2][0][:2]  # a FrameRecord without preprocess_ms and crop
    with pytest.raises(ValueError, match="expected 4 FrameRecord fields, got 2"):
        decode_message(msgpack.packb(fields))
    with pytest.raises(ValueError, match="expected 3 CreditMsg fields, got 4"):
        decode_message(msgpack.packb([WIRE_VERSION, int(MsgKind.CREDIT), "p", 1, 2, 3]))
    with pytest.raises(ValueError, match="expected valid BATCH fields"):
        decode_message(msgpack.packb([WIRE_VERSION, int(MsgKind.BATCH), 1, 1, "p", [1, 3, 2, 2], "float32", 0, 1]))


def test_wire_rejects_field_types_without_a_converter():
    @dataclass(frozen=True)
    class Odd:
        values: list[float]

    with pytest.raises(TypeError, match="no wire converter for Odd.values"):
        wire()(Odd)
