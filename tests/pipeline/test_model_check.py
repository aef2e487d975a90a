"""Start-up checks of a card against its model: the input dtype, outputs the graph leaves symbolic, and cards
refused before anything is decoded."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.onnxruntime_backend import OnnxRuntimeEngine
from pipeline.stages.model_check import (
    check_card_against_model,
    checked_card,
    inspect_onnx,
    output_shapes_at_card_size,
    resolve_card,
)
from streamdet.card import HeadLayout, ModelCard, ModelCardError, load_card
from tests.helpers.cli import ROOT, run
from tests.helpers.standin import bikes_path, build_end2end, build_standin, build_standin_dynamic, standin_card
from tests.helpers.standin_detr import build_detr, build_rtdetr
from tests.helpers.standin_seg import build_segment_standin, build_semantic_standin

META = {"names": "{0: 'red', 1: 'green', 2: 'blue'}", "imgsz": "[384, 640]", "stride": "32", "task": "detect"}


def with_input_type(path: Path, elem_type: int, *, write_card: bool = True,
                    metadata: dict[str, str] | None = None) -> Path:
    """The stand-in with its input declared as ``elem_type``, cast to float32 inside: a valid model taking that type."""
    build_standin(path, write_card=write_card, metadata=metadata)
    model = onnx.load(str(path))
    graph = model.graph
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = [f"{name}_f32" if x == name else x for x in node.input]
    graph.node.insert(0, helper.make_node("Cast", [name], [f"{name}_f32"], to=TensorProto.FLOAT))
    graph.input[0].type.tensor_type.elem_type = elem_type
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("elem_type, dtype", [
    (TensorProto.FLOAT, "float32"), (TensorProto.FLOAT16, "float16"), (TensorProto.DOUBLE, "float64"),
    (TensorProto.UINT8, "uint8"),
])
def test_inspect_reads_the_input_dtype(tmp_path: Path, elem_type: int, dtype: str) -> None:
    assert inspect_onnx(with_input_type(tmp_path / "m.onnx", elem_type)).input_dtype == dtype


@pytest.mark.parametrize("card_dtype, model_dtype, problem", [
    ("float16", "float32", "input dtype float16 in the card, float32 in the model"),
    ("float32", "float16", "input dtype float32 in the card, float16 in the model"),
    ("float32", "uint8", "input dtype float32 in the card, uint8 in the model (the pipeline feeds float32 or "
                         "float16 only)"),
    ("float16", "float64", "input dtype float16 in the card, float64 in the model (the pipeline feeds float32 or "
                           "float16 only)"),
    ("float32", "float32", None),
    ("float16", "float16", None),
    ("float16", None, None),  # the graph does not say: not checked
])
def test_card_dtype_must_be_the_models(tmp_path: Path, card_dtype: str, model_dtype: str | None,
                                       problem: str | None) -> None:
    info = dataclasses.replace(inspect_onnx(build_standin(tmp_path / "m.onnx")), input_dtype=model_dtype)
    card = standin_card()
    card = card.model_copy(update={"input": card.input.model_copy(update={"dtype": card_dtype})})
    if problem is None:
        check_card_against_model(card, info, "card.json")
        return
    with pytest.raises(ModelCardError) as exc:
        check_card_against_model(card, info, "card.json")
    assert str(exc.value) == f"card.json contradicts {info.path}: {problem}"


@pytest.mark.parametrize("elem_type, dtype, problem", [
    (TensorProto.FLOAT, "float32", None),
    (TensorProto.FLOAT16, "float16", None),  # an ultralytics half=True export
    (TensorProto.UINT8, "float32", "input dtype float32 in the card, uint8 in the model (the pipeline feeds "
                                   "float32 or float16 only)"),
])
def test_a_metadata_card_takes_the_models_dtype(tmp_path: Path, elem_type: int, dtype: str,
                                                problem: str | None) -> None:
    info = inspect_onnx(with_input_type(tmp_path / "u.onnx", elem_type, write_card=False, metadata=META))
    assert resolve_card(info).input.dtype == dtype
    if problem is None:
        assert checked_card(info).input.dtype == dtype
        return
    with pytest.raises(ModelCardError) as exc:
        checked_card(info)
    assert str(exc.value) == f"ONNX metadata contradicts {info.path}: {problem}"


def test_a_float16_model_takes_the_batches_its_card_declares(tmp_path: Path) -> None:
    path = with_input_type(tmp_path / "h.onnx", TensorProto.FLOAT16)
    engine = OnnxRuntimeEngine(model_path=path)
    engine.start()
    try:
        outs = engine.infer(np.zeros((1, 3, 384, 640), np.float16))
        assert outs[0].shape[:2] == (1, 7)
        with pytest.raises(Exception, match="Unexpected input data type"):  # what a float32 card used to reach
            engine.infer(np.zeros((1, 3, 384, 640), np.float32))
    finally:
        engine.stop()


@pytest.mark.parametrize("field, raw, line", [
    ("input.dtype", '"float16"', "{card} contradicts {model}: input dtype float16 in the card, float32 in the model"),
    ("normalization.std", "[0, 0, 0]",
     "{card}: invalid model card: normalization.std: Value error, expected finite positive values, got [0, 0, 0]"),
    ("normalization.std", "[NaN, NaN, NaN]",  # not JSON, but Python's json reads it
     "{card}: invalid model card: normalization.std: Value error, expected finite positive values, got "
     "[nan, nan, nan]"),
    ("normalization.mean", "[0, Infinity, 0]",
     "{card}: invalid model card: normalization.mean: Value error, expected finite values, got [0, inf, 0]"),
])
def test_a_bad_card_is_one_line_at_start_up(standin_model: Path, tmp_path: Path, field: str, raw: str,
                                            line: str) -> None:
    """Was: a failed engine or preprocess stage after start-up (dtype, zero std), or 0 detections and exit 0 (NaN)."""
    model = tmp_path / "m.onnx"
    shutil.copy(standin_model, model)
    data = json.loads(standin_model.with_suffix(".json").read_text())
    section, key = field.split(".")
    data[section][key] = "@"
    card = tmp_path / "card.json"
    card.write_text(json.dumps(data).replace('"@"', raw))
    code, out, err = run(["--model", str(model), "--card", str(card), "--source", str(bikes_path()),
                          "--max-frames", "3", "--publish", "none", "--quiet"])
    assert (code, err.splitlines()) == (1, ["error: " + line.format(card=card, model=model)])
    assert out == ""


# ---------------------------------------------------------------- outputs the graph leaves symbolic

MODELS = ROOT / "engines" / "models"


def symbolic(path: Path) -> Path:
    """The model with every output dimension after the batch declared symbolic (as in a ``dynamic=True`` export)."""
    model = onnx.load(str(path))
    for out in model.graph.output:
        for i, dim in enumerate(out.type.tensor_type.shape.dim):
            if i > 0:
                dim.dim_param = f"{out.name}_dim_{i}"
    onnx.save(model, str(path))
    return path


def bundled(name: str, tmp_path: Path) -> Path:
    """A copy of a bundled model and its card (``engines/models``: outputs ``('batch', 14, 'Concatoutput0_dim_2')``)."""
    for ext in (".onnx", ".json"):
        shutil.copy(MODELS / f"{name}{ext}", tmp_path / f"{name}{ext}")
    return tmp_path / f"{name}.onnx"


BUILDERS = {  # a model (its card beside it) whose declared output shapes leave the checked sizes symbolic
    "detector": lambda d: bundled("detector", d),  # as exported: the anchor count is symbolic
    "segmenter": lambda d: bundled("segmenter", d),
    "standin": lambda d: symbolic(build_standin(d / "m.onnx")),  # ONNX shape inference sizes it
    "segment": lambda d: symbolic(build_segment_standin(d / "m.onnx")),
    "semantic": lambda d: symbolic(build_semantic_standin(d / "m.onnx")),
    "detr": lambda d: symbolic(build_detr(d / "m.onnx")),
    "end2end": lambda d: symbolic(build_end2end(d / "m.onnx")),
    "dynamic": lambda d: build_standin_dynamic(d / "m.onnx"),  # a dynamic input size: one ONNX Runtime run sizes it
}


def edited(card: ModelCard, **head: object) -> ModelCard:
    update: dict[str, object] = {"head": card.head.model_copy(update=head)}
    if "num_classes" in head:
        update["class_names"] = tuple(f"c{i}" for i in range(int(head["num_classes"])))  # type: ignore[call-overload]
    return card.model_copy(update=update)


E2E_ROWS = "expected output0 rows of 6 values (x1, y1, x2, y2, score, class), got 8190"


@pytest.mark.parametrize("model, head, problem", [
    ("detector", {"layout": HeadLayout.END2END}, f"{E2E_ROWS} (its outputs for a 832x480 input: output0 "
                                                 "['batch', 14, 8190])"),
    ("detector", {"layout": HeadLayout.RTDETR}, "expected output0 with 4+10=14 values per query, got 8190 (its "
                                                "outputs for a 832x480 input: output0 ['batch', 14, 8190])"),
    ("detector", {"strides": (8, 16)}, "expected output0 with 7800 anchor columns for input 832x480 and strides "
                                       "[8, 16], got 8190 (its outputs for a 832x480 input: output0 "
                                       "['batch', 14, 8190])"),
    ("detector", {"strides": (8, 16, 32, 64)}, "expected output0 with 8294 anchor columns for input 832x480 and "
                                               "strides [8, 16, 32, 64], got 8190 (its outputs for a 832x480 input: "
                                               "output0 ['batch', 14, 8190])"),
    ("segmenter", {"strides": (16, 32)}, "expected output0 with 1200 anchor columns for input 640x384 and strides "
                                         "[16, 32], got 5040 (its outputs for a 640x384 input: output0 "
                                         "['batch', 46, 5040], output1 ['batch', 32, 96, 160])"),
    ("standin", {"strides": (16, 32)}, "expected output0 with 1200 anchor columns for input 640x384 and strides "
                                       "[16, 32], got 5040 (its outputs for a 640x384 input: output0 "
                                       "['batch', 7, 5040])"),
    ("standin", {"num_classes": 80}, "expected output0 with 4+80=84 rows, got 7 (its outputs for a 640x384 input: "
                                     "output0 ['batch', 7, 5040])"),
    ("standin", {"layout": HeadLayout.END2END}, "expected output0 rows of 6 values (x1, y1, x2, y2, score, class), "
                                                "got 5040 (its outputs for a 640x384 input: output0 ['batch', 7, "
                                                "5040])"),
    ("segment", {"mask_hw": (48, 80)}, "expected output1 prototype size 48x80 (HxW), got 96x160 (its outputs for a "
                                       "640x384 input: output0 ['batch', 11, 5040], output1 ['batch', 4, 96, 160])"),
    ("segment", {"num_mask_coeffs": 2}, "expected output0 with 4+3+2=9 rows, got 11 (its outputs for a 640x384 "
                                        "input: output0 ['batch', 11, 5040], output1 ['batch', 4, 96, 160])"),
    ("semantic", {"num_classes": 3}, "expected output0 with 3 class channels, got 4 (its outputs for a 640x384 "
                                     "input: output0 ['batch', 4, 384, 640])"),
    ("detr", {"num_queries": 100}, "expected pred_logits with 100 queries (head.num_queries), got 64 (its outputs "
                                   "for a 640x384 input: pred_logits ['batch', 64, 4], pred_boxes ['batch', 64, 4])"),
    ("detr", {"layout": HeadLayout.RTDETR, "outputs": ("pred_boxes",)},
     "expected pred_boxes with 4+3=7 values per query, got 4 (its outputs for a 640x384 input: pred_boxes "
     "['batch', 64, 4])"),
    ("end2end", {"layout": HeadLayout.ULTRALYTICS_DETECT}, "expected output0 with 4+3=7 rows, got 3 (its outputs for "
                                                          "a 640x384 input: output0 ['batch', 3, 6])"),
    ("dynamic", {"strides": (8, 16)}, "expected output0 with 8000 anchor columns for input 640x640 and strides "
                                      "[8, 16], got 8400 (its outputs for a 640x640 input: output0 "
                                      "['batch', 7, 8400])"),
])
def test_a_card_contradicting_symbolic_outputs_is_refused(tmp_path: Path, model: str, head: dict,
                                                          problem: str) -> None:
    """Was: accepted (only fixed sizes were checked), then the postprocess raised at the first batch, 6 times."""
    path = BUILDERS[model](tmp_path)
    info = inspect_onnx(path)
    card = edited(load_card(path.with_suffix(".json")), **head)
    with pytest.raises(ModelCardError) as exc:
        check_card_against_model(card, info, "card.json")
    assert str(exc.value) == f"card.json contradicts {path}: {problem}"


@pytest.mark.parametrize("model", [*BUILDERS, *(p.stem for p in sorted(MODELS.glob("*.onnx")))])
def test_cards_that_fit_symbolic_outputs_pass(tmp_path: Path, model: str) -> None:
    path = BUILDERS[model](tmp_path) if model in BUILDERS else bundled(model, tmp_path)
    assert checked_card(inspect_onnx(path)) == load_card(path.with_suffix(".json"))


@pytest.mark.parametrize("model, shapes", [
    ("detector", (("batch", 14, 8190),)),  # by ONNX shape inference
    ("segmenter", (("batch", 46, 5040), ("batch", 32, 96, 160))),
    ("dynamic", (("batch", 7, 8400),)),  # by one ONNX Runtime run
])
def test_output_shapes_at_card_size(tmp_path: Path, model: str, shapes: tuple) -> None:
    path = BUILDERS[model](tmp_path)
    info = inspect_onnx(path)
    assert output_shapes_at_card_size(info, load_card(path.with_suffix(".json"))) == shapes


def test_metadata_cards_of_symbolic_outputs_pass(tmp_path: Path) -> None:
    rtdetr = inspect_onnx(symbolic(build_rtdetr(tmp_path / "r.onnx")))
    assert checked_card(rtdetr).head.layout is HeadLayout.RTDETR
    detector = tmp_path / "d" / "detector.onnx"
    detector.parent.mkdir()
    shutil.copy(MODELS / "detector.onnx", detector)  # no card: its ultralytics metadata
    assert checked_card(inspect_onnx(detector)).head.strides == (8, 16, 32)


def test_the_tiny_detector_passes(tiny_detector_onnx: Path) -> None:
    assert checked_card(inspect_onnx(tiny_detector_onnx)) == load_card(tiny_detector_onnx.with_suffix(".json"))


def test_outputs_nothing_can_size_are_not_checked(tmp_path: Path) -> None:
    """A model neither ONNX shape inference nor ONNX Runtime's CPU provider can size (an op they lack): not refused."""
    node = helper.make_node("NoSuchOp", ["images"], ["output0"], domain="streamdet.test")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                             ["b", 3, 384, 640])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["b", 7, "anchors"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("streamdet.test", 1)])
    onnx.save(model, str(tmp_path / "c.onnx"))
    info = inspect_onnx(tmp_path / "c.onnx")
    assert output_shapes_at_card_size(info, standin_card()) == (("b", 7, "anchors"),)
    check_card_against_model(standin_card(), info)


def test_a_wrong_head_layout_is_one_line_at_start_up(tmp_path: Path) -> None:
    """Was: start-up passed, the postprocess stage died 6 times on ``expected end2end output``, exit 1."""
    model = bundled("detector", tmp_path)
    card = model.with_suffix(".json")
    card.write_text(card.read_text().replace('"ultralytics_detect"', '"end2end"'))
    code, out, err = run(["--model", str(model), "--source", str(bikes_path()), "--max-frames", "3",
                          "--publish", "none", "--quiet"])
    assert (code, err.splitlines()) == (1, [f"error: {card} contradicts {model}: {E2E_ROWS} (its outputs for a "
                                            "832x480 input: output0 ['batch', 14, 8190])"])
    assert out == ""


@pytest.mark.parametrize("key, value, problem", [
    ("imgsz", "[384]", "ONNX metadata 'imgsz' is not an image size [height, width] of positive integers: '[384]'"),
    ("stride", "0", "ONNX metadata 'stride' is not a positive integer: '0'"),
    ("names", "{}", "ONNX metadata 'names' lists no classes: '{}'"),
])
def test_bad_metadata_without_a_card_is_one_line(tmp_path: Path, key: str, value: str, problem: str) -> None:
    """Was: a traceback (IndexError, ZeroDivisionError, pydantic's ValidationError)."""
    path = build_standin(tmp_path / "u.onnx", write_card=False, metadata={**META, key: value})
    with pytest.raises(ModelCardError) as exc:
        checked_card(inspect_onnx(path))
    assert str(exc.value) == f"{path}: no model card u.json beside it and {problem}"
