"""Segmentation through the pipeline: published masks and class maps against an in-process reference.

Stand-in models (``_standin_seg``) on a few frames of bikes.mp4, batch 1 in both the pipeline and
the reference so the engine outputs are the same bits.
"""

import json

import av
import numpy as np
import onnxruntime as ort
import pytest
from pycocotools import mask as mask_utils

from pipeline.annotate import draw_detections, draw_semantic
from pipeline.runner import Pipeline
from pipeline.settings import load_settings
from pipeline.transport import ipc_endpoints
from streamdet.card import ModelCard
from streamdet.masks import class_map_to_rles, rles_to_class_map
from streamdet.postprocess import Detections, PostprocessConfig, postprocess
from streamdet.preprocess_ops import preprocess_batch
from tests.helpers.cli import free_port_range
from tests.helpers.standin import bikes_path, build_standin
from tests.helpers.standin_seg import (
    SEMANTIC_NAMES,
    build_segment_standin,
    build_semantic_standin,
    segment_card,
    semantic_card,
)

N_FRAMES = 6
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("segmodels")
    return {"detect": build_standin(d / "standin.onnx"), "segment": build_segment_standin(d / "seg.onnx"),
            "semantic": build_semantic_standin(d / "sem.onnx")}


def run_pipeline(tmp_path, model, sources=None, **postprocess_over):
    out = tmp_path / "out.jsonl"
    tree = {"sources": sources or [str(bikes_path())], "model": str(model), "quiet": True, "max_frames": N_FRAMES,
            "preprocess": {"max_batch": 1}, "postprocess": postprocess_over,
            "sinks": {"publish": None, "jsonl": str(out)}}
    summary = Pipeline(settings=load_settings(overrides=tree), progress=False).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    msgs = [json.loads(line) for line in out.read_text().splitlines()]
    return summary, [m for m in msgs if m["schema"] == "streamdet.detections/2"]


def reference(model, card: ModelCard, cfg: PostprocessConfig | None = None) -> list[Detections]:
    cfg = cfg or PostprocessConfig()
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(N_FRAMES), av.open(str(bikes_path())).decode(video=0))]
    out = []
    for frame in frames:
        x, lbs = preprocess_batch([frame], card)
        out += postprocess(sess.run(None, {"images": x}), lbs, card, cfg)
    return out


def test_published_instance_masks_decode_to_the_postprocess_masks(models, tmp_path):
    summary, msgs = run_pipeline(tmp_path, models["segment"])
    ref = reference(models["segment"], segment_card())
    assert summary.model == "segstandin" and len(msgs) == N_FRAMES
    assert sum(len(d) for d in ref) > 0 and sum(int(d.masks.sum()) for d in ref if d.masks is not None) > 0
    for m, d in zip(msgs, ref, strict=True):
        assert m["model"] == "segstandin" and "semantic" not in m
        assert len(m["detections"]) == len(d)
        np.testing.assert_allclose(np.array([x["box_xyxy"] for x in m["detections"]]).reshape(-1, 4),
                                   d.boxes_xyxy, atol=0.011)
        for det, want in zip(m["detections"], d.masks, strict=True):
            rle = det["mask"]
            assert isinstance(rle["counts"], str) and rle["size"] == list(want.shape)
            got = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            np.testing.assert_array_equal(got.astype(bool), want)


def test_published_class_map_decodes_to_the_postprocess_map(models, tmp_path):
    summary, msgs = run_pipeline(tmp_path, models["semantic"])
    ref = reference(models["semantic"], semantic_card())
    classes_seen = set()
    for m, d in zip(msgs, ref, strict=True):
        assert m["detections"] == [] and m["model"] == "semstandin"
        sem = m["semantic"]
        assert sem["size"] == [272, 640]
        for c in sem["classes"]:
            assert c["label"] == SEMANTIC_NAMES[c["class_id"]] and isinstance(c["mask"]["counts"], str)
        got = rles_to_class_map([(c["class_id"], c["mask"]) for c in sem["classes"]])
        np.testing.assert_array_equal(got, d.semantic)
        # the per-class masks partition the frame
        area = sum(int(mask_utils.area({"size": c["mask"]["size"], "counts": c["mask"]["counts"].encode()}))
                   for c in sem["classes"])
        assert area == 272 * 640
        classes_seen |= {c["class_id"] for c in sem["classes"]}
    assert len(classes_seen) >= 2


@pytest.mark.parametrize("kind", ["segment", "semantic"])
def test_masks_off_publishes_boxes_only(models, tmp_path, kind):
    _, msgs = run_pipeline(tmp_path, models[kind], masks=False)
    assert len(msgs) == N_FRAMES
    for m in msgs:
        assert "semantic" not in m and all("mask" not in d for d in m["detections"])
    if kind == "segment":
        ref = reference(models["segment"], segment_card(), PostprocessConfig(masks=False))
        assert all(d.masks is None for d in ref)
        for m, d in zip(msgs, ref, strict=True):
            np.testing.assert_allclose(np.array([x["box_xyxy"] for x in m["detections"]]).reshape(-1, 4),
                                       d.boxes_xyxy, atol=0.011)
    else:
        assert all(m["detections"] == [] for m in msgs)


def test_two_sources_served_by_two_models_in_one_run(models, tmp_path):
    video = tmp_path / "video.mp4"
    sources = [{"id": "plain", "url": str(bikes_path())},
               {"id": "seg", "url": str(bikes_path()), "model": str(models["segment"])},
               {"id": "sem", "url": str(bikes_path()), "model": str(models["semantic"])}]
    out = tmp_path / "out.jsonl"
    tree = {"sources": sources, "model": str(models["detect"]), "quiet": True, "max_frames": N_FRAMES,
            "preprocess": {"max_batch": 1}, "sinks": {"publish": None, "jsonl": str(out), "video_out": str(video)}}
    p = Pipeline(settings=load_settings(overrides=tree), progress=False)
    p.prepare()
    assert [c.source_ids for c in p.chains] == [("plain",), ("seg",), ("sem",)]
    summary = p.run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    assert summary.model == "standin+segstandin+semstandin"
    msgs = [json.loads(line) for line in out.read_text().splitlines()]
    dets = [m for m in msgs if m["schema"] == "streamdet.detections/2"]
    by_source = {sid: [m for m in dets if m["source_id"] == sid] for sid in ("plain", "seg", "sem")}
    assert {k: len(v) for k, v in by_source.items()} == {"plain": N_FRAMES, "seg": N_FRAMES, "sem": N_FRAMES}
    for sid, want in (("plain", "standin"), ("seg", "segstandin"), ("sem", "semstandin")):
        assert [m["frame_index"] for m in by_source[sid]] == list(range(N_FRAMES))
        assert {m["model"] for m in by_source[sid]} == {want}
    assert all("mask" not in d and "semantic" not in m for m in by_source["plain"] for d in m["detections"])
    seg_ref = reference(models["segment"], segment_card())
    for m, d in zip(by_source["seg"], seg_ref, strict=True):
        assert [x["class_id"] for x in m["detections"]] == d.class_ids.tolist()
        assert all("mask" in x for x in m["detections"])
    sem_ref = reference(models["semantic"], semantic_card())
    for m, d in zip(by_source["sem"], sem_ref, strict=True):
        np.testing.assert_array_equal(
            rles_to_class_map([(c["class_id"], c["mask"]) for c in m["semantic"]["classes"]]), d.semantic)
    videos = sorted(tmp_path.glob("video*.mp4"))  # the first source to arrive gets the plain name
    assert len(videos) == 3
    for path in videos:
        with av.open(str(path)) as c:
            assert sum(1 for _ in c.decode(video=0)) == N_FRAMES


def test_two_models_over_tcp_transport(models, tmp_path):
    """The tcp layout (pixels and tensors inline) wires a second model chain on its own ports."""
    base = free_port_range(32)  # the tcp transport binds consecutive ports from the base
    out = tmp_path / "out.jsonl"
    tree = {"sources": [{"id": "plain", "url": str(bikes_path())},
                        {"id": "seg", "url": str(bikes_path()), "model": str(models["segment"])}],
            "model": str(models["detect"]), "quiet": True, "max_frames": N_FRAMES, "preprocess": {"max_batch": 1},
            "transport": {"mode": "tcp", "tcp_base_port": base}, "sinks": {"publish": None, "jsonl": str(out)}}
    summary = Pipeline(settings=load_settings(overrides=tree), progress=False).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    msgs = [json.loads(line) for line in out.read_text().splitlines()]
    seg = [m for m in msgs if m.get("source_id") == "seg" and m["schema"] == "streamdet.detections/2"]
    ref = reference(models["segment"], segment_card())
    assert len(seg) == N_FRAMES
    for m, d in zip(seg, ref, strict=True):
        got = rles_to_class_map([(1, x["mask"]) for x in m["detections"]]) if m["detections"] else None
        want = d.masks.any(axis=0).astype(np.uint8) if len(d) else None
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (0, 4)])
def test_class_map_rle_round_trip(shape):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 5, size=shape).astype(np.uint8)
    if m.size:
        m[0, 0] = 200
    rles = class_map_to_rles(m)
    assert [k for k, _ in rles] == sorted(np.unique(m).tolist())
    back = rles_to_class_map(rles)
    if m.size:
        np.testing.assert_array_equal(back, m)
    else:
        assert rles == [] and back.size == 0


def test_draw_semantic_tints_classes_but_not_background():
    img = np.full((4, 6, 3), 100, np.uint8)
    cmap = np.zeros((4, 6), np.uint8)
    cmap[:2, :3] = 2
    draw_semantic(img, cmap, alpha=0.5)
    assert (img[2:, :] == 100).all() and not (img[:2, :3] == 100).all()
    with pytest.raises(ValueError, match="class map"):
        draw_semantic(img, cmap[:2], alpha=0.5)


def test_draw_detections_outlines_masks():
    img = np.zeros((40, 40, 3), np.uint8)
    masks = np.zeros((1, 40, 40), bool)
    masks[0, 10:30, 10:30] = True
    draw_detections(img, np.array([[0, 0, 1, 1]], np.float32), np.array([0.9], np.float32),
                    np.array([0], np.int64), ["a"], masks=masks, mask_alpha=0.0, thickness=2)
    assert img[10, 20].any() and not img[20, 20].any()  # outline drawn, inside untouched with alpha 0


def test_chain_endpoints_are_distinct(tmp_path):
    ep = ipc_endpoints(tmp_path, ["p0", "p1", "p2"], chains=2)
    a, b = ep.for_chain(0, ["p0"]), ep.for_chain(1, ["p1", "p2"])
    assert len({a.frames, b.frames, a.batches, b.batches, a.tensor_credits, b.tensor_credits}) == 6
    assert a.results == b.results and [p for p, _ in b.frame_credits] == ["p1", "p2"]
    with pytest.raises(IndexError):
        ep.for_chain(2)


@pytest.mark.parametrize("case", ["random", "empty", "full", "edges", "one_pixel"])
def test_masks_to_rle_equals_pycocotools_encode(case):
    from streamdet.masks import masks_to_rle

    rng = np.random.default_rng(1)
    m = np.zeros((3, 9, 11), bool)
    if case == "random":
        m = rng.random((3, 9, 11)) > 0.6
    elif case == "full":
        m[:] = True
    elif case == "edges":
        m[0, :, 0] = True
        m[1, :, -1] = True
        m[2, 0, :] = True
    elif case == "one_pixel":
        m[1, 8, 10] = True
    want = mask_utils.encode(np.asfortranarray(m.astype(np.uint8).transpose(1, 2, 0)))
    got = masks_to_rle(m)
    assert [g["counts"] for g in got] == [w["counts"].decode() for w in want]
    assert all(g["size"] == [9, 11] for g in got)
