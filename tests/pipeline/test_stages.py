import errno
import json
import os
import sys
import threading
import uuid

import av
import numpy as np
import pytest
import zmq

from engines.base import Backend, EngineError
from pipeline.annotate import annotate_result, class_color, draw_children, draw_detections
from pipeline.sources.probe import SourceError, probe_source
from pipeline.stages.decode import DecodeStage
from pipeline.stages.engine import make_engine
from pipeline.stages.model_check import check_card_against_model, inspect_onnx, resolve_card
from pipeline.stages.normalize import KeptPadding, Normalizer
from pipeline.stages.sinks import (
    DETECTIONS_SCHEMA,
    EOS_SCHEMA,
    FrameResult,
    JsonlSink,
    VideoSink,
    detections_payload,
    eos_payload,
)
from pipeline.transport import StageFlags, ipc_endpoints, make_socket, recv_parts
from streamdet.card import ModelCardError, Normalization
from streamdet.cascade import Children
from streamdet.letterbox import ResizeMode, letterbox, letterbox_into, letterbox_params, resize_params
from streamdet.messages import CreditMsg, EndOfStream, EosReason, FrameMsg, FrameRecord, StatusKind, decode_message
from streamdet.postprocess import Detections, PostprocessConfig
from streamdet.preprocess_ops import preprocess_batch
from tests.helpers.standin import CLASS_NAMES, bikes_path, build_standin, standin_card


# ---------------------------------------------------------------- preprocess: normalisation
@pytest.mark.parametrize(
    "order,mean,std,dtype",
    [
        ("RGB", (0, 0, 0), (255, 255, 255), "float32"),
        ("BGR", (0, 0, 0), (255, 255, 255), "float32"),
        ("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "float32"),
        ("BGR", (10, 20, 30), (1, 2, 4), "float32"),
        ("RGB", (0, 0, 0), (255, 255, 255), "float16"),
    ],
)
def test_normalizer_matches_preprocess_batch(order, mean, std, dtype):
    card = standin_card()
    card = card.model_copy(update={
        "input": card.input.model_copy(update={"channel_order": order, "dtype": dtype}),
        "normalization": Normalization(mean=mean, std=std),
    })
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (272, 640, 3), dtype=np.uint8)
    ref, _ = preprocess_batch([frame], card)
    lb = np.empty((384, 640, 3), np.uint8)
    from streamdet.letterbox import letterbox

    letterbox(frame, (640, 384), card.pad_value, out=lb)
    out = np.empty((3, 384, 640), dtype)
    Normalizer(card)(lb, out)
    np.testing.assert_allclose(out.astype(np.float32), ref[0].astype(np.float32), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("order,mean,std,dtype", [
    ("RGB", (0, 0, 0), (255, 255, 255), "float32"),
    ("BGR", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "float32"),
    ("RGB", (10, 20, 30), (1, 2, 4), "float16"),
])
@pytest.mark.parametrize("window", [None, (40, 440, 0, 640), (0, 384, 116, 516)])  # rows; pillarbox columns
def test_normalizer_computes_each_pixel_exactly_in_float32(order, mean, std, dtype, window):
    """Each pixel is ``(pixel - mean) * (1 / std)`` in float32, then the card's dtype; the rest stays."""
    card = standin_card()
    card = card.model_copy(update={
        "input": card.input.model_copy(update={"channel_order": order, "dtype": dtype}),
        "normalization": Normalization(mean=mean, std=std),
    })
    img = np.random.default_rng(1).integers(0, 256, (440, 640, 3), dtype=np.uint8)
    img[0, :256, 0] = np.arange(256)  # every value at least once
    out = np.full((3, 440, 640), -7.0, dtype)
    Normalizer(card)(img, out, window)
    y0, y1, x0, x1 = window or (0, 440, 0, 640)
    src = [2, 1, 0] if order == "BGR" else [0, 1, 2]
    for c in range(3):
        pix = img[y0:y1, x0:x1, src[c]].astype(np.float32)
        inv = np.float32(1.0) / np.float32(std[c])
        want = ((pix - np.float32(mean[c])) * inv if any(mean) else pix * inv).astype(dtype)
        np.testing.assert_array_equal(out[c, y0:y1, x0:x1], want)
        outside = np.ones((440, 640), bool)
        outside[y0:y1, x0:x1] = False
        assert np.all(out[c][outside] == -7.0)  # the rest of the plane is left as it was


def test_normalizer_rejects_bad_shapes():
    n = Normalizer(standin_card())
    with pytest.raises(ValueError, match="expected image"):
        n(np.zeros((10, 10, 3), np.uint8), np.zeros((3, 10, 12), np.float32))
    with pytest.raises(ValueError, match="expected image"):
        n(np.zeros((10, 10, 4), np.uint8), np.zeros((4, 10, 10), np.float32))


def test_normalizer_takes_smaller_rectangles():
    """Minimum-rectangle inputs (dynamic models) are normalised like the full size."""
    card = standin_card()
    img = np.random.default_rng(0).integers(0, 256, (288, 640, 3), dtype=np.uint8)
    out = np.empty((3, 288, 640), np.float32)
    Normalizer(card)(img, out)
    np.testing.assert_allclose(out, img.transpose(2, 0, 1).astype(np.float32) / 255.0, rtol=1e-6)


@pytest.mark.parametrize("frames_hw,layouts,kept_rows", [
    ([(272, 640)] * 4, [(832, 480)] * 4, 3),  # one source: every frame after the first keeps the padding
    ([(272, 640), (480, 640), (272, 640), (720, 1280), (272, 640)], [(832, 480)] * 5, 0),  # geometry changes
    ([(272, 640), (272, 640), (272, 640)], [(832, 480), (832, 288), (832, 480)], 0),  # the slot's layout changes
    ([(480, 360), (480, 360)], [(832, 480)] * 2, 1),  # portrait: padded columns
])
def test_kept_padding_writes_only_the_window_and_equals_a_whole_row(frames_hw, layouts, kept_rows):
    """Letterbox + normalise with the padding kept from an earlier frame == the whole row written afresh."""
    card = standin_card((832, 480))
    norm, kept = Normalizer(card), KeptPadding()
    slot = np.full(3 * 480 * 832, np.nan, np.float32)  # one tensor slot, viewed as (1, 3, ih, iw) per layout
    rng = np.random.default_rng(1)
    windows = []
    for (h, w), (iw, ih) in zip(frames_hw, layouts, strict=True):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        params = resize_params((h, w), (iw, ih), ResizeMode.LETTERBOX)
        window = kept.window(0, (iw, ih), 0, params)
        windows.append(window)
        lb = np.full((ih, iw, 3), 7, np.uint8)  # stale border: only the window may be read then
        letterbox_into(image, lb, params, pad_value=card.pad_value, fill_pad=window is None)
        row = slot[: 3 * ih * iw].reshape(3, ih, iw)
        norm(lb, row, window)
        kept.wrote(0, (iw, ih), 0, params)
        want = np.empty_like(row)
        norm(letterbox(image, (iw, ih), pad_value=card.pad_value)[0], want)
        np.testing.assert_array_equal(row, want)
    assert sum(w is not None for w in windows) == kept_rows


def test_kept_padding_ignores_inline_tensors():
    params = resize_params((272, 640), (832, 480), ResizeMode.LETTERBOX)
    kept = KeptPadding()
    kept.wrote(-1, (832, 480), 0, params)
    assert kept.window(-1, (832, 480), 0, params) is None
    kept.wrote(2, (832, 480), 0, params)
    assert kept.window(2, (832, 480), 0, params) == (63, 417, 0, 832)
    assert kept.window(2, (832, 480), 1, params) is None  # another row
    assert kept.window(2, (832, 384), 0, params) is None  # another layout


def test_preprocess_stage_that_fails_mid_batch_still_stops(tmp_path):
    """A batch being filled when the stage fails holds a tensor slot the engine never got: stop() does not wait."""
    import time

    from pipeline.stages.base import StatusReporter
    from pipeline.stages.preprocess import PreprocessSpec
    from streamdet.messages import StageName

    ep = ipc_endpoints(tmp_path, [])
    ctx = zmq.Context()
    status_in = make_socket(ctx, zmq.PULL, ep.control, bind=True)
    go, stop, abort = threading.Event(), threading.Event(), threading.Event()
    flags = StageFlags(go=go, stop_input=stop, abort=abort, parent_pid=os.getppid())
    status = StatusReporter(socket=make_socket(ctx, zmq.PUSH, ep.control, bind=False), stage=StageName.PREPROCESS)
    spec = PreprocessSpec(control=ep.control, card=standin_card(), endpoints=ep,
                          tensor_pool=f"sd-test-{uuid.uuid4().hex[:8]}", tensor_slots=2, max_batch=2,
                          pad_batches=False, max_wait_ms=5.0, keep_pixels=False, num_sources=1)
    stage = spec.build(ctx=ctx, flags=flags, status=status)
    stage._begin_batch((640, 384))  # as _add does for a batch's first frame, before the failure
    t0 = time.monotonic()
    stage.stop()
    assert time.monotonic() - t0 < 2.0
    status.close()
    status_in.close(0)
    ctx.term()


# ---------------------------------------------------------------- model, card
def test_inspect_and_card_beside(tmp_path):
    path = build_standin(tmp_path / "m.onnx")
    info = inspect_onnx(path)
    assert info.input_name == "images" and info.input_shape[1:] == (3, 384, 640)
    assert info.output_names == ("output0",) and info.output_shapes[0][1:] == (7, 5040)
    assert info.static_batch is None
    card = resolve_card(info)
    assert card.class_names == CLASS_NAMES
    check_card_against_model(card, info)


def test_ultralytics_metadata_without_card(tmp_path):
    meta = {"names": "{0: 'red', 1: 'green', 2: 'blue'}", "imgsz": "[384, 640]", "stride": "32", "task": "detect"}
    path = build_standin(tmp_path / "u.onnx", write_card=False, metadata=meta)
    info = inspect_onnx(path)
    card = resolve_card(info)
    assert card.class_names == ("red", "green", "blue") and card.input_wh == (640, 384)
    check_card_against_model(card, info)


def test_no_card_no_metadata(tmp_path):
    path = build_standin(tmp_path / "n.onnx", write_card=False)
    with pytest.raises(ModelCardError, match="no model card n.json"):
        resolve_card(inspect_onnx(path))


def test_card_contradicting_model(tmp_path):
    path = build_standin(tmp_path / "m.onnx")
    info = inspect_onnx(path)
    wrong_size = standin_card((320, 320))
    with pytest.raises(ModelCardError, match="input height 320 in the card, 384 in the model"):
        check_card_against_model(wrong_size, info, "card.json")
    card = standin_card()
    wrong_out = card.model_copy(update={"head": card.head.model_copy(update={"outputs": ("boxes",)})})
    with pytest.raises(ModelCardError, match=r"outputs \['boxes'\] not in the model"):
        check_card_against_model(wrong_out, info)
    wrong_nc = card.model_copy(update={"head": card.head.model_copy(update={"num_classes": 80}),
                                       "class_names": tuple(str(i) for i in range(80))})
    with pytest.raises(ModelCardError, match="rows"):
        check_card_against_model(wrong_nc, info)


@pytest.mark.parametrize("content,match", [(b"", "not a readable ONNX model"), (b"\x08\x01garbage" * 10, "ONNX"),
                                           (None, "model file not found")])
def test_bad_model_files(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EngineError, match=match):
        inspect_onnx(path)


def test_static_batch_is_seen(tmp_path):
    info = inspect_onnx(build_standin(tmp_path / "s.onnx", static_batch=2))
    assert info.static_batch == 2


def test_unavailable_backend_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="tensorrt"):
        make_engine(backend=Backend.TENSORRT, model_path=tmp_path / "m.onnx", device="cpu")
    assert type(make_engine(backend=Backend.ONNXRUNTIME, model_path="x.onnx")).__name__ == "OnnxRuntimeEngine"


# ---------------------------------------------------------------- sources
def test_probe_bikes():
    info = probe_source(str(bikes_path()), "bikes")
    assert (info.frame_hw, info.frames, info.is_file) == ((272, 640), 250, True)
    assert info.fps == pytest.approx(25.0)


@pytest.mark.parametrize("kind,match", [("missing", "no such file"), ("dir", "not a file"),
                                        ("text", "not a readable video"), ("empty", "not a readable video")])
def test_probe_bad_sources(tmp_path, kind, match):
    p = tmp_path / "x.mp4"
    if kind == "dir":
        p.mkdir()
    elif kind == "text":
        p.write_text("hello, not a video\n" * 100)
    elif kind == "empty":
        p.write_bytes(b"")
    with pytest.raises(SourceError, match=match) as e:
        probe_source(str(p), "x")
    assert str(p) in str(e.value)


def test_probe_redacts_credentials():
    # a live URL is not opened at start-up (an unreachable camera reconnects); a malformed one fails
    with pytest.raises(SourceError, match="malformed URL") as e:
        probe_source("rtsp://user:secret@127.0.0.1:99999/stream", "cam")
    assert "secret" not in str(e.value) and "***@" in str(e.value)
    info = probe_source("rtsp://user:secret@127.0.0.1:1/stream", "cam")
    assert info.is_live and "secret" not in info.display


# ---------------------------------------------------------------- decode stage (in-process)
@pytest.mark.parametrize("clip", ["bikes.mp4", "carphone_pristine.mp4"])
def test_one_thread_colour_conversion_gives_pyavs_default_pixels(clip):
    """The decoders convert with one swscale thread (``to_rgb24``): the pixels are PyAV's default ones."""
    from pipeline.sources.ffmpeg import to_rgb24

    with av.open(str(bikes_path().with_name(clip))) as container:
        for frame in container.decode(video=0):
            np.testing.assert_array_equal(to_rgb24(frame), frame.to_ndarray(format="rgb24"))


def test_decoder_backpressure_and_pixels(tmp_path):
    """With 2 slots and no credits returned, the decoder stops after 2 frames; credits let it go on."""
    from pipeline.slotpool import PoolCache, SlotPool

    src = probe_source(str(bikes_path()), "bikes")
    pool_name = f"sd-test-{uuid.uuid4().hex[:8]}"
    ep = ipc_endpoints(tmp_path, [pool_name])
    ctx = zmq.Context()
    frames_in = make_socket(ctx, zmq.PULL, ep.frames, bind=True)
    credits_out = make_socket(ctx, zmq.PUSH, ep.credit_endpoint(pool_name), bind=False)
    status_in = make_socket(ctx, zmq.PULL, ep.control, bind=True)
    go, stop, abort = threading.Event(), threading.Event(), threading.Event()
    flags = StageFlags(go=go, stop_input=stop, abort=abort, parent_pid=os.getppid())
    from pipeline.stages.base import StatusReporter
    from streamdet.messages import StageName

    status = StatusReporter(socket=make_socket(ctx, zmq.PUSH, ep.control, bind=False), stage=StageName.DECODE)
    stage = DecodeStage(source=src, pool=SlotPool.create(name=pool_name, num_slots=2, slot_bytes=272 * 640 * 3),
                        credits_in=make_socket(ctx, zmq.PULL, ep.credit_endpoint(pool_name), bind=True),
                        frames_out=make_socket(ctx, zmq.PUSH, ep.frames, bind=False), status=status, flags=flags,
                        max_frames=6)
    t = threading.Thread(target=stage.run)
    t.start()
    go.set()
    reference = [f.to_ndarray(format="rgb24") for _, f in zip(range(6), av.open(str(bikes_path())).decode(video=0))]
    got: list[FrameMsg] = []
    pools = PoolCache()
    for _ in range(2):
        got.append(decode_message(recv_parts(frames_in, 10_000)[0].buffer))  # type: ignore[index,arg-type]
    assert recv_parts(frames_in, 300) is None  # blocked: no free slot
    outstanding = list(got)
    while len(got) < 6:
        oldest = outstanding.pop(0)
        np.testing.assert_array_equal(pools.get(oldest.pool).view(oldest.slot, (272, 640, 3)),
                                      reference[oldest.frame_index])
        credits_out.send(CreditMsg(oldest.pool, oldest.slot).encode())
        parts = recv_parts(frames_in, 10_000)
        assert parts is not None
        got.append(decode_message(parts[0].buffer))  # type: ignore[arg-type]
        outstanding.append(got[-1])
    assert [f.frame_index for f in got] == list(range(6))
    assert [round(f.pts_s, 3) for f in got] == [0.0, 0.04, 0.08, 0.12, 0.16, 0.2]
    eos = decode_message(recv_parts(frames_in, 10_000)[0].buffer)  # type: ignore[index,arg-type]
    assert eos == EndOfStream("bikes", 6, EosReason.MAX_FRAMES)
    for f in outstanding:
        credits_out.send(CreditMsg(f.pool, f.slot).encode())
    t.join(10)
    assert not t.is_alive()
    pools.close()
    stage.stop()
    status.close()
    for s in (frames_in, credits_out, status_in):
        s.close(0)
    ctx.term()


# ---------------------------------------------------------------- postprocess stage: progress reports
def test_postprocess_reports_progress_at_most_every_interval(monkeypatch):
    """One status message per batch woke the runner once a frame at batch 1: now at most every 0.1 s, totals exact."""
    import pipeline.stages.postprocess as post

    sent: list[dict[str, int]] = []

    class Status:
        def send(self, kind, **counts):
            assert kind is StatusKind.PROGRESS
            sent.append(counts)

    clock = [100.0]
    monkeypatch.setattr(post.time, "monotonic", lambda: clock[0])
    ctx = zmq.Context()
    results_in = ctx.socket(zmq.PULL)
    try:
        stage = post.PostprocessStage(card=standin_card(), model_name="standin", config=PostprocessConfig(),
                                      results_in=results_in, frame_credits_out={}, sinks=[], status=Status(),
                                      flags=None, num_sources=1)
        for step in range(30):  # a batch of one frame with 2 detections every 10 ms
            clock[0] += 0.01
            stage._progress[0] += 1
            stage._progress[1] += 2
            stage._release_held()
            if step == 14:
                stage._report_progress()  # a poll timeout in between: nothing due yet
        assert len(sent) == 3 and stage._progress[0] > 0  # about t=100.01, 100.11, 100.21; the rest pending
        stage._report_progress(now=True)  # a source's end, the end of run() or stop()
        assert sum(c["frames"] for c in sent) == stage.frames == 30
        assert sum(c["detections"] for c in sent) == stage.detections == 60
        stage._report_progress(now=True)  # nothing new: no empty report
        assert len(sent) == 4
    finally:
        results_in.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------- sinks
def _record(i: int = 0) -> FrameRecord:
    f = FrameMsg("cam", i, i * 0.04, (272, 640), -2, "", 1.0, 2.0)
    return FrameRecord(f, letterbox_params((272, 640), (640, 384)), 0.5)


def _dets() -> Detections:
    return Detections(np.array([[10.123, 20.456, 100.0, 200.0], [0, 0, 640, 272]], np.float32),
                      np.array([0.91234, 0.3], np.float32), np.array([2, 7], np.int64))


def test_detections_payload():
    p = detections_payload(_record(3), _dets(), model="standin", class_names=CLASS_NAMES, engine_ms=10.0,
                           postprocess_ms=1.0, now=1.5)
    assert p["schema"] == DETECTIONS_SCHEMA and p["source_id"] == "cam" and p["frame_index"] == 3
    assert p["frame_wh"] == [640, 272] and p["pts_s"] == pytest.approx(0.12)
    assert p["detections"][0] == {"box_xyxy": [10.12, 20.46, 100.0, 200.0], "score": 0.9123, "class_id": 2,
                                  "label": "blue"}
    assert p["detections"][1]["label"] == "7"  # id past the names: shown as a number
    assert p["timing_ms"] == {"decode": 2.0, "preprocess": 0.5, "engine": 10.0, "postprocess": 1.0,
                              "end_to_end": 500.0}
    json.dumps(p, allow_nan=False)
    e = eos_payload(EndOfStream("cam", 5, EosReason.ERROR, "bad"))
    assert e == {"schema": EOS_SCHEMA, "source_id": "cam", "frames": 5, "reason": "error", "error": "bad"}


def test_jsonl_sink_is_atomic(tmp_path):
    out = tmp_path / "sub" / "o.jsonl"
    sink = JsonlSink(path=out)
    sink.open()
    p = detections_payload(_record(), _dets(), model="m", class_names=CLASS_NAMES, engine_ms=1, postprocess_ms=1)
    sink.write(FrameResult(_record(), _dets(), p))
    assert not out.exists()  # still under its temporary name
    sink.end_of_stream(EndOfStream("cam", 1, EosReason.FINISHED))
    sink.close()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["schema"] for x in lines] == [DETECTIONS_SCHEMA, EOS_SCHEMA]
    assert list(out.parent.iterdir()) == [out]


def test_video_sink_writes_h264(tmp_path):
    out = tmp_path / "a.mp4"
    sink = VideoSink(path=out, fps_by_source={"cam": 25.0}, class_names=CLASS_NAMES)
    sink.open()
    rng = np.random.default_rng(1)
    for i in range(5):
        pixels = rng.integers(0, 255, (271, 641, 3), dtype=np.uint8)  # odd sizes are made even
        f = FrameMsg("cam", i, i * 0.04, (271, 641), -2, "", 1.0, 2.0)
        rec = FrameRecord(f, letterbox_params((271, 641), (640, 384)), 0.5)
        sink.write(FrameResult(rec, _dets(), {}, pixels))
    sink.end_of_stream(EndOfStream("cam", 5, EosReason.FINISHED))
    sink.close()
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        assert (s.codec_context.width, s.codec_context.height) == (640, 270)
        assert sum(1 for _ in c.decode(s)) == 5
    assert "5 frames" in sink.describe()


def test_draw_detections():
    img = np.zeros((100, 200, 3), np.uint8)
    d = Detections(np.array([[20, 30, 120, 90]], np.float32), np.array([0.5], np.float32), np.array([1], np.int64))
    draw_detections(img, d.boxes_xyxy, d.scores, d.class_ids, CLASS_NAMES, thickness=1)
    import cv2

    ref = np.zeros_like(img)
    cv2.rectangle(ref, (20, 30), (120, 90), class_color(1), 1, cv2.LINE_AA)
    np.testing.assert_array_equal(img[32:], ref[32:])  # below the label: exactly the box
    assert img[:30].any()  # the label sits above the box
    with pytest.raises(ValueError, match="expected"):
        draw_detections(img[..., 0], d.boxes_xyxy, d.scores, d.class_ids, CLASS_NAMES)


def _children(text):
    boxes = np.array([[30, 40, 50, 70], [60, 40, 80, 70]], np.float32)
    return Children(Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([2, 3], np.int64)),
                    ("a", "b", "c", "d"), text, 0.8 if text else None)


@pytest.mark.parametrize(("parent", "text", "text_rows"), [  # rows that hold the band with OpenCV 4.x or 5.x metrics
    ((20, 30, 120, 80), "AB12", slice(82, 105)),  # text under the parent box
    ((20, 30, 120, 115), "AB12", slice(90, 115)),  # no room below: above the bottom edge of the box
    ((20, 30, 120, 80), None, None),  # boxes only
])
def test_draw_children(parent, text, text_rows):
    import cv2

    img = np.zeros((120, 200, 3), np.uint8)
    parents = np.array([parent], np.float32)
    draw_children(img, parents, {0: [_children(text)], 5: [_children("ZZ")]})  # index 5: no such parent
    ref = np.zeros_like(img)
    cv2.rectangle(ref, (30, 40), (50, 70), class_color(2), 1, cv2.LINE_AA)
    cv2.rectangle(ref, (60, 40), (80, 70), class_color(3), 1, cv2.LINE_AA)
    if text is None:
        np.testing.assert_array_equal(img, ref)  # exactly the child boxes
    else:
        np.testing.assert_array_equal(img[:text_rows.start], ref[:text_rows.start])
        assert (img[text_rows] == 255).all(axis=2).any()  # white text on its black band
        assert not img[text_rows.stop:].any()


def test_annotate_result_draws_children_after_the_boxes():
    d = _dets()
    plain = annotate_result(np.zeros((120, 200, 3), np.uint8), d, CLASS_NAMES)
    same = annotate_result(np.zeros((120, 200, 3), np.uint8), d, CLASS_NAMES, children={})
    drawn = annotate_result(np.zeros((120, 200, 3), np.uint8), d, CLASS_NAMES, children={0: [_children("AB12")]})
    np.testing.assert_array_equal(plain, same)
    assert (drawn != plain).any()
    direct = draw_detections(np.zeros((120, 200, 3), np.uint8), d.boxes_xyxy, d.scores, d.class_ids, CLASS_NAMES)
    np.testing.assert_array_equal(drawn, draw_children(direct, d.boxes_xyxy, {0: [_children("AB12")]}))


def test_video_sink_draws_the_children(tmp_path, monkeypatch):
    import pipeline.annotate

    seen = []
    monkeypatch.setattr(pipeline.annotate, "annotate_result", lambda image, dets, names, children=None:
                        seen.append(children))
    sink = VideoSink(path=tmp_path / "a.mp4", fps_by_source={"cam": 25.0}, class_names=CLASS_NAMES)
    sink.open()
    f = FrameMsg("cam", 0, 0.0, (64, 96), -2, "", 1.0, 2.0)
    rec = FrameRecord(f, letterbox_params((64, 96), (640, 384)), 0.5)
    kids = {0: [_children("AB12")]}
    sink.write(FrameResult(rec, _dets(), {}, np.zeros((64, 96, 3), np.uint8), children=kids))
    sink.end_of_stream(EndOfStream("cam", 1, EosReason.FINISHED))
    sink.close()
    assert seen == [kids]


class _HostOnlyEngine:
    """An engine stand-in without ``infer_device`` (like ONNX Runtime's)."""

    output_names = ("output0",)

    def start(self):
        pass

    def stop(self):
        pass


class _DeviceCapableEngine(_HostOnlyEngine):
    def infer_device(self, batch):
        return [batch]


@pytest.mark.parametrize(("engine_cls", "accepted"), [(_HostOnlyEngine, False), (_DeviceCapableEngine, True)])
def test_engine_stage_takes_device_batches_only_from_a_device_engine(engine_cls, accepted):
    from engines.base import DeviceEngine
    from pipeline.stages.base import StageError
    from pipeline.stages.engine import EngineStage

    ctx = zmq.Context()
    socks = [ctx.socket(zmq.PUSH) for _ in range(3)]
    try:
        stage = EngineStage(engine=engine_cls(), card=standin_card(), batches_in=socks[0], results_out=socks[1],
                            tensor_credits_out=socks[2], status=None, flags=None, num_sources=1,
                            device_batches=True)
        assert isinstance(stage.engine, DeviceEngine) is accepted
        if accepted:
            stage.start()
            assert stage._device_engine is stage.engine
        else:
            with pytest.raises(StageError, match="cannot run device batches"):
                stage.start()
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def test_engine_classes_of_the_device_backends_are_device_engines():
    from engines.base import DeviceEngine
    from engines.select import engine_class

    assert {b for b in Backend if issubclass(engine_class(b), DeviceEngine)} == {Backend.CUDA, Backend.TENSORRT}


class _HungUpTerminal:
    """A standard error whose terminal was hung up: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def flush(self) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_a_stage_line_to_a_hung_up_terminal_is_dropped_not_raised(monkeypatch, capsys):
    """After SIGHUP the stages drain on; before, the live sources' stats line raised EIO in the postprocess stage."""
    from pipeline.stages.base import say

    say("warning: shown")
    assert capsys.readouterr().err == "warning: shown\n"
    monkeypatch.setattr(sys, "stderr", _HungUpTerminal())
    say("warning: nobody sees this")  # (no error)
