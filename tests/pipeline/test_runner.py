"""End-to-end runs of the pipeline through its Python API (stand-in model, bikes.mp4)."""

import json
import threading

import av
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pipeline.runner import EXIT_FAILURE, EXIT_SIGINT, Pipeline, PipelineError, source_ids_for
from pipeline.subscribe import Subscriber
from streamdet.postprocess import PostprocessConfig, postprocess
from streamdet.preprocess_ops import preprocess_batch
from tests.helpers.cli import free_port, free_port_range
from tests.helpers.settings import settings_with
from tests.helpers.standin import E2E_ROWS, bikes_path, build_end2end, build_standin, standin_card


def settings(model, **over):
    tree = {"sources": [str(bikes_path())], "model": str(model), "quiet": True, "sinks": {"publish": None}}
    return settings_with(tree, **over)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference_detections(model_path, n, batch=4):
    """The same frames through preprocess_batch + ONNX Runtime + postprocess, in one process."""
    card = standin_card()
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(n), av.open(str(bikes_path())).decode(video=0))]
    out = []
    for i in range(0, n, batch):
        x, lbs = preprocess_batch(frames[i:i + batch], card)
        out += postprocess(sess.run(None, {"images": x}), lbs, card, PostprocessConfig())
    return out


def assert_same_detections(messages, reference):
    assert len(messages) == len(reference)
    for m, d in zip(messages, reference, strict=True):
        got = np.array([x["box_xyxy"] for x in m["detections"]], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(got, d.boxes_xyxy, atol=0.011)
        assert [x["class_id"] for x in m["detections"]] == d.class_ids.tolist()
        np.testing.assert_allclose([x["score"] for x in m["detections"]], d.scores, atol=1e-4)


def test_bikes_subscriber_gets_every_frame_in_order_then_eos(standin_model, tmp_path):
    """The one full-length run: 250 frames of bikes.mp4, a subscriber that joined first gets them all."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    received = []
    sub = Subscriber(endpoint)
    t = threading.Thread(target=lambda: received.extend(sub.messages(until_eos=True, timeout_s=60)))
    t.start()
    s = settings(standin_model, sinks__publish=endpoint, sinks__publish_wait_subscribers=1,
                 sinks__jsonl=str(tmp_path / "o.jsonl"))
    summary = Pipeline(settings=s).run(handle_signals=False)
    t.join(60)
    sub.close()
    assert summary.exit_code == 0 and summary.frames == 250 and not summary.errors
    dets = [m for m in received if not m.is_eos]
    assert [m.topic for m in dets] == ["detections.bikes"] * 250
    assert [m.payload["frame_index"] for m in dets] == list(range(250))
    pts = [m.payload["pts_s"] for m in dets]
    assert pts == sorted(pts) and pts[1] == pytest.approx(0.04)
    assert received[-1].topic == "eos.bikes"
    assert received[-1].payload == {"schema": "streamdet.eos/1", "source_id": "bikes", "frames": 250,
                                    "reason": "finished", "error": None}
    boxes = np.array([d["box_xyxy"] for m in dets for d in m.payload["detections"]])
    assert len(boxes) == summary.detections > 0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 640).all() and (boxes[:, 3] <= 272).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    for m in dets:
        assert set(m.payload["timing_ms"]) == {"decode", "preprocess", "engine", "postprocess", "end_to_end"}
        assert m.payload["frame_wh"] == [640, 272] and m.payload["model"] == "standin"
    assert read_jsonl(tmp_path / "o.jsonl") == [m.payload for m in received]
    assert any(line.startswith("zmq PUB") for line in summary.outputs)


@pytest.mark.parametrize("mode", ["ipc", "tcp"])
def test_detections_match_single_process_reference(standin_model, tmp_path, mode):
    """Same frames, same model: the pipeline (shared memory or tcp inline, with the video sink) gives the
    detections of a plain preprocess -> ONNX Runtime -> postprocess loop."""
    s = settings(standin_model, max_frames=10, sinks__jsonl=str(tmp_path / "o.jsonl"),
                 sinks__video_out=str(tmp_path / "v.mp4"), transport__mode=mode,
                 transport__tcp_base_port=free_port_range(32), preprocess__max_batch=3)
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    lines = read_jsonl(tmp_path / "o.jsonl")
    assert lines[-1]["reason"] == "max_frames" and lines[-1]["frames"] == 10
    assert_same_detections(lines[:-1], reference_detections(standin_model, 10))
    with av.open(str(tmp_path / "v.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 10


def test_static_batch_model_pads_batches(standin_model, tmp_path):
    static = build_standin(tmp_path / "static.onnx", static_batch=2)
    s = settings(static, max_frames=5, sinks__jsonl=str(tmp_path / "o.jsonl"))
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    # 5 frames in batches of 2: the last batch is padded; same weights as the dynamic-batch model
    assert_same_detections(read_jsonl(tmp_path / "o.jsonl")[:-1], reference_detections(standin_model, 5))


def test_two_sources_and_soft_nms(standin_model, tmp_path):
    s = settings(standin_model, max_frames=6, sinks__jsonl=str(tmp_path / "o.jsonl"), postprocess__nms="soft_gaussian")
    s = s.model_copy(update={"sources": [str(bikes_path())] * 2})
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    lines = read_jsonl(tmp_path / "o.jsonl")
    for sid in ("bikes", "bikes-2"):
        mine = [x for x in lines if x["source_id"] == sid]
        assert [x.get("frame_index") for x in mine[:-1]] == list(range(6))
        assert mine[-1]["schema"] == "streamdet.eos/1"
    cfg = PostprocessConfig(nms_method=s.postprocess.nms)
    card = standin_card()
    frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(6), av.open(str(bikes_path())).decode(video=0))]
    x, lbs = preprocess_batch(frames, card)
    ref = postprocess(ort.InferenceSession(str(standin_model)).run(None, {"images": x}), lbs, card, cfg)
    assert_same_detections([x for x in lines if x["source_id"] == "bikes"][:-1], ref)


def test_end2end_model_passes_through_with_letterbox_undone(tmp_path):
    from streamdet.letterbox import boxes_input_to_frame, letterbox_params

    model = build_end2end(tmp_path / "e2e.onnx")
    s = settings(model, max_frames=3, sinks__jsonl=str(tmp_path / "o.jsonl"))
    assert Pipeline(settings=s).run(handle_signals=False).exit_code == 0
    lines = read_jsonl(tmp_path / "o.jsonl")[:-1]
    expect = boxes_input_to_frame(E2E_ROWS[:2, :4], letterbox_params((272, 640), (640, 384)), clip=True)
    for line in lines:
        assert [d["label"] for d in line["detections"]] == ["blue", "red"]
        np.testing.assert_allclose([d["box_xyxy"] for d in line["detections"]], expect, atol=0.01)
    assert lines[0]["detections"][1]["box_xyxy"] == [0.0, 0.0, 640.0, 272.0]


def test_ultralytics_export_without_card(tmp_path):
    meta = {"names": "{0: 'red', 1: 'green', 2: 'blue'}", "imgsz": "[384, 640]", "stride": "32", "task": "detect"}
    model = build_standin(tmp_path / "yolo.onnx", write_card=False, metadata=meta)
    s = settings(model, max_frames=4, sinks__jsonl=str(tmp_path / "o.jsonl"))
    assert Pipeline(settings=s).run(handle_signals=False).exit_code == 0
    lines = read_jsonl(tmp_path / "o.jsonl")
    assert lines[0]["model"] == "yolo" and len(lines) == 5
    assert_same_detections(lines[:-1], reference_detections(build_standin(tmp_path / "ref.onnx"), 4))


def test_stop_request_drains_and_flushes(standin_model, tmp_path):
    def monitor(p):
        if p.frames_done >= 20:
            p.request_stop()

    s = settings(standin_model, decode__loop=50, sinks__jsonl=str(tmp_path / "o.jsonl"))
    summary = Pipeline(settings=s, monitor=monitor).run(handle_signals=False)
    assert summary.exit_code == EXIT_SIGINT and 20 <= summary.frames < 12_500
    lines = read_jsonl(tmp_path / "o.jsonl")
    assert lines[-1]["reason"] == "interrupted" and lines[-1]["frames"] == len(lines) - 1 == summary.frames
    assert [x["frame_index"] for x in lines[:-1]] == list(range(len(lines) - 1))


def test_model_that_onnxruntime_cannot_load_fails_before_decoding(tmp_path):
    node = helper.make_node("NoSuchOp", ["images"], ["output0"], domain="streamdet.test")
    graph = helper.make_graph([node], "bad", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            ["b", 3, 384, 640])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["b", 7, 5040])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("streamdet.test", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    from streamdet.card import save_card

    save_card(standin_card(), tmp_path / "bad.json")
    summary = Pipeline(settings=settings(path, sinks__jsonl=str(tmp_path / "o.jsonl"))).run(handle_signals=False)
    assert summary.exit_code == EXIT_FAILURE
    assert len(summary.errors) == 1 and str(path) in summary.errors[0] and "loadable" in summary.errors[0]
    assert summary.frames == 0 and summary.seconds == 0.0


def test_validation_errors_name_the_input(standin_model, tmp_path):
    with pytest.raises(PipelineError, match="no such file"):
        Pipeline(settings=settings(standin_model).model_copy(update={"sources": [str(tmp_path / "x.mp4")]})).prepare()
    with pytest.raises(PipelineError, match="model file not found"):
        Pipeline(settings=settings(tmp_path / "none.onnx")).prepare()


def test_missing_relative_paths_name_the_directory_they_were_looked_for_in(standin_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    note = f"(a relative path is taken from the current directory, {tmp_path})"
    with pytest.raises(PipelineError, match="no such file") as e:
        Pipeline(settings=settings(standin_model).model_copy(update={"sources": ["clips/x.mp4"]})).prepare()
    assert note in str(e.value)
    with pytest.raises(PipelineError, match="model file not found") as e:
        Pipeline(settings=settings("models/none.onnx")).prepare()
    assert note in str(e.value)


def test_source_ids():
    assert source_ids_for(["/a/bikes.mp4", "/b/bikes.mp4", "rtsp://u:p@cam.local/live.sdp", "x.y.z.mp4", "/"]) == [
        "bikes", "bikes-2", "live", "x_y_z", "source"]


@pytest.mark.parametrize(("device", "user_env", "expected"), [
    ("cpu", {}, {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENCV_FOR_THREADS_NUM": "1"}),
    ("cuda", {}, {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),  # the cores are free for OpenCV
    ("cpu", {"OPENCV_FOR_THREADS_NUM": "4"}, {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),  # the user's
])
def test_light_stages_get_one_blas_thread_and_with_a_cpu_engine_one_opencv_thread(
        standin_model, monkeypatch, device, user_env, expected):
    for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
        monkeypatch.delenv(k, raising=False)
    for k, v in user_env.items():
        monkeypatch.setenv(k, v)
    pipeline = Pipeline(settings=settings_with({"model": str(standin_model)}, engine__device=device))
    assert pipeline._light_env() == expected


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run(standin_model, monkeypatch):
    """Loop bikes.mp4 8 times (2000 frames): resident memory of the stage processes must not grow.

    Sampled every 0.1 s instead of the runner's 0.5 s: on a fast machine the run takes under 4 s.
    """
    monkeypatch.setattr("pipeline.runner.RSS_SAMPLE_S", 0.1)
    samples = []

    def monitor(p):
        from pipeline.runner import process_rss_kib

        samples.append(sum(process_rss_kib(pid) for pid in p.child_pids()))

    summary = Pipeline(settings=settings(standin_model, decode__loop=8), monitor=monitor).run(handle_signals=False)
    assert summary.exit_code == 0 and summary.frames == 2000
    running = [x for x in samples if x > 0]
    assert len(running) >= 8
    q = len(running) // 4
    early, late = np.median(running[q:2 * q]), np.median(running[3 * q:])
    print(f"RSS of stage processes: early {early / 1024:.1f} MiB, late {late / 1024:.1f} MiB, "
          f"peak {summary.peak_rss_kib / 1024:.1f} MiB, {summary.fps:.0f} fps")
    assert late - early < 16 * 1024, (early, late)


def test_stop_before_start_still_ends_every_source(standin_model, tmp_path):
    p = Pipeline(settings=settings(standin_model, sinks__jsonl=str(tmp_path / "o.jsonl")))
    p.request_stop()
    summary = p.run(handle_signals=False)
    assert summary.exit_code == EXIT_SIGINT and summary.frames == 0
    assert read_jsonl(tmp_path / "o.jsonl") == [{"schema": "streamdet.eos/1", "source_id": "bikes", "frames": 0,
                                                 "reason": "interrupted", "error": None}]


@pytest.mark.parametrize(("backend", "device_path"),
                         [("cuda", True), ("tensorrt", True), ("onnxruntime", False)])
def test_device_path_is_chosen_by_the_engine_class(standin_model, monkeypatch, backend, device_path):
    """With the engine on a CUDA device, the device-tensor path runs only for engines that are DeviceEngines."""
    from pathlib import Path

    import engines.select as select
    from engines.base import Backend

    def choose(b, device, model_path, *, allow_fallback=False):
        return select.EngineChoice(Backend(backend), "cuda:0", Path(model_path))

    monkeypatch.setattr(select, "choose_backend", choose)
    p = Pipeline(settings=settings(standin_model))
    p.prepare()
    assert p.chains[0].tensor_device == ("cuda:0" if device_path else None)
