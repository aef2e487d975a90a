"""Model cards: validation messages, JSON round trip, load errors, cards from ultralytics ONNX metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from streamdet.card import (
    CARD_SCHEMA,
    HeadLayout,
    HeadSpec,
    InputSpec,
    ModelCard,
    ModelCardError,
    Normalization,
    Task,
    card_from_ultralytics_metadata,
    card_path_for,
    load_card,
    save_card,
)
from streamdet.constants import PAD_VALUE


def make_card(**kw: object) -> ModelCard:
    base: dict = dict(name="m", task=Task.DETECT, head=HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=2),
                      input=InputSpec(width=64, height=32), class_names=("a", "b"))
    base.update(kw)
    return ModelCard(**base)


def first_error(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(exc.value.errors()[0]["msg"])


# ---------------------------------------------------------------- InputSpec


@pytest.mark.parametrize("field, value, message", [
    ("layout", "NHWC", "expected layout NCHW, got NHWC"),
    ("channel_order", "GBR", "expected channel_order RGB or BGR, got GBR"),
    ("channel_order", "rgb", "expected channel_order RGB or BGR, got rgb"),  # case matters
    ("dtype", "int8", "expected dtype float32 or float16, got int8"),
    ("dtype", "float64", "expected dtype float32 or float16, got float64"),
])
def test_input_spec_rejects_unsupported_values(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        InputSpec(width=8, height=8, **{field: value})
    assert first_error(exc) == f"Value error, {message}"


@pytest.mark.parametrize("kw", [
    {}, {"channel_order": "BGR"}, {"dtype": "float16"}, {"layout": "NCHW", "channel_order": "RGB", "dtype": "float32"},
])
def test_input_spec_accepts_supported_values(kw: dict) -> None:
    spec = InputSpec(width=8, height=4, **kw)
    assert (spec.layout, spec.channel_order, spec.dtype) == (kw.get("layout", "NCHW"), kw.get("channel_order", "RGB"),
                                                             kw.get("dtype", "float32"))


@pytest.mark.parametrize("kw", [{"width": 0, "height": 8}, {"width": 8, "height": -1}])
def test_input_spec_rejects_non_positive_size(kw: dict) -> None:
    with pytest.raises(ValidationError):
        InputSpec(**kw)


# ---------------------------------------------------------------- ModelCard


def test_card_defaults_and_input_wh() -> None:
    card = make_card()
    assert card.input_wh == (64, 32)
    assert card.pad_value == PAD_VALUE and card.schema_version == CARD_SCHEMA
    assert card.normalization == Normalization(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))
    with pytest.raises(ValidationError):
        card.name = "other"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("task, layout, ok", [
    (Task.DETECT, HeadLayout.ULTRALYTICS_DETECT, True),
    (Task.DETECT, HeadLayout.END2END, True),
    (Task.DETECT, HeadLayout.ULTRALYTICS_SEGMENT, False),
    (Task.SEGMENT, HeadLayout.ULTRALYTICS_SEGMENT, True),
    (Task.SEGMENT, HeadLayout.ULTRALYTICS_DETECT, False),
    (Task.SEMANTIC, HeadLayout.SEMANTIC_LOGITS, True),
    (Task.SEMANTIC, HeadLayout.END2END, False),
])
def test_card_task_must_fit_head_layout(task: Task, layout: HeadLayout, ok: bool) -> None:
    head = HeadSpec(layout=layout, num_classes=2)
    if ok:
        assert make_card(task=task, head=head).task is task
        return
    with pytest.raises(ValidationError) as exc:
        make_card(task=task, head=head)
    assert f"for task {task.value}, got {layout.value}" in first_error(exc)


@pytest.mark.parametrize("kw, message", [
    ({"class_names": ("a",)}, "expected 2 class names (head.num_classes), got 1"),
    ({"schema": "streamdet.modelcard/0"}, f"expected schema {CARD_SCHEMA}, got streamdet.modelcard/0"),
])
def test_card_consistency_messages(kw: dict, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make_card(**kw)
    assert first_error(exc) == f"Value error, {message}"


@pytest.mark.parametrize("kw", [{"pad_value": 256}, {"pad_value": -1}, {"unknown_field": 1}])
def test_card_rejects_bad_fields(kw: dict) -> None:
    with pytest.raises(ValidationError):
        make_card(**kw)


@pytest.mark.parametrize("strides, ok", [
    ((8, 16, 32), True), ((), True), ((1,), True), ((8, 0, 32), False), ((0,), False), ((-8, 16, 32), False),
    ((8, -16), False),
])
def test_head_strides_must_be_positive(strides: tuple[int, ...], ok: bool) -> None:
    """Was: a zero stride accepted, then a ZeroDivisionError traceback counting anchors; a negative one accepted."""
    if ok:
        assert HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=2, strides=strides).strides == strides
        return
    with pytest.raises(ValidationError) as exc:
        HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=2, strides=strides)
    assert exc.value.errors()[0]["loc"] == ("strides",)
    assert first_error(exc) == f"Value error, expected positive integers, got {list(strides)}"


@pytest.mark.parametrize("text", ["[8, 0, 32]", "[0]", "[-8, 16, 32]"])
def test_load_card_refuses_non_positive_strides_naming_file_and_field(tmp_path: Path, text: str) -> None:
    path = tmp_path / "card.json"
    data = json.loads(make_card().to_json())
    data["head"]["strides"] = "@"
    path.write_text(json.dumps(data).replace('"@"', text))
    with pytest.raises(ModelCardError) as exc:
        load_card(path)
    assert str(exc.value) == f"{path}: invalid model card: head.strides: Value error, expected positive integers, " \
                             f"got {text}"


# ---------------------------------------------------------------- Normalization

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, message", [
    ("std", (0, 0, 0), "expected finite positive values, got [0, 0, 0]"),
    ("std", (255, 0, 255), "expected finite positive values, got [255, 0, 255]"),
    ("std", (-1, 1, 1), "expected finite positive values, got [-1, 1, 1]"),
    ("std", (NAN, NAN, NAN), "expected finite positive values, got [nan, nan, nan]"),
    ("std", (INF, 1, 1), "expected finite positive values, got [inf, 1, 1]"),
    ("std", (1e-50, 1, 1), "expected float32 values (1.17549e-38 to 3.40282e+38), got [1e-50, 1, 1]"),
    ("std", (1, 1, 1e39), "expected float32 values (1.17549e-38 to 3.40282e+38), got [1, 1, 1e+39]"),
    ("mean", (NAN, 0, 0), "expected finite values, got [nan, 0, 0]"),
    ("mean", (0, -INF, 0), "expected finite values, got [0, -inf, 0]"),
    ("mean", (0, 0, 1e39), "expected float32 values (magnitude at most 3.40282e+38), got [0, 0, 1e+39]"),
])
def test_normalization_rejects_values_that_make_the_input_nan(field: str, value: tuple, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Normalization(**{field: value})
    assert first_error(exc) == f"Value error, {message}"


@pytest.mark.parametrize("kw", [
    {}, {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375)}, {"mean": (-1, 0, 1e38), "std": (1, 2, 4)},
    {"std": (1.2e-38, 1, 3.4e38)},
])
def test_normalization_accepts_finite_values_and_positive_std(kw: dict) -> None:
    norm = Normalization(**kw)
    assert (norm.mean, norm.std) == (kw.get("mean", (0.0, 0.0, 0.0)), kw.get("std", (255.0, 255.0, 255.0)))


@pytest.mark.parametrize("field, text, message", [
    ("std", "[0, 0, 0]", "expected finite positive values, got [0, 0, 0]"),
    ("std", "[NaN, NaN, NaN]", "expected finite positive values, got [nan, nan, nan]"),  # Python's json reads NaN
    ("std", "[255, Infinity, 255]", "expected finite positive values, got [255, inf, 255]"),
    ("mean", "[NaN, 0, 0]", "expected finite values, got [nan, 0, 0]"),
    ("mean", "[0, 0, -Infinity]", "expected finite values, got [0, 0, -inf]"),
])
def test_load_card_refuses_bad_normalization_naming_file_and_field(tmp_path: Path, field: str, text: str,
                                                                   message: str) -> None:
    path = tmp_path / "card.json"
    data = json.loads(make_card().to_json())
    data["normalization"][field] = "@"
    path.write_text(json.dumps(data).replace('"@"', text))
    with pytest.raises(ModelCardError) as exc:
        load_card(path)
    assert str(exc.value) == f"{path}: invalid model card: normalization.{field}: Value error, {message}"


# ---------------------------------------------------------------- files


def test_card_path_for() -> None:
    assert card_path_for("models/yolo.onnx") == Path("models/yolo.json")
    assert card_path_for(Path("/a/b.c.onnx")) == Path("/a/b.c.json")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    card = make_card(metrics={"bbox": {"mAP50-95": 0.5}}, params=12, gflops=1.5,
                     head=HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=2, strides=(8, 16)))
    path = tmp_path / "m.json"
    save_card(card, path)
    assert not (tmp_path / "m.json.tmp").exists()
    data = json.loads(path.read_text())
    assert data["schema"] == CARD_SCHEMA and "schema_version" not in data  # the alias is what is written
    assert load_card(path) == card


def test_load_card_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(ModelCardError, match=f"^{re.escape(str(missing))}: model card not found$"):
        load_card(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelCardError, match=f"^{re.escape(str(bad))}: not a readable JSON model card"):
        load_card(bad)
    invalid = tmp_path / "invalid.json"
    data = json.loads(make_card().to_json())
    data["input"]["dtype"] = "int8"
    invalid.write_text(json.dumps(data))
    with pytest.raises(ModelCardError) as exc:
        load_card(invalid)
    assert str(exc.value) == f"{invalid}: invalid model card: input.dtype: Value error, expected dtype float32 or " \
                             "float16, got int8"


# ---------------------------------------------------------------- ultralytics metadata

META = {"names": "{0: 'person', 1: 'car', 2: 'dog'}", "imgsz": "[384, 640]", "stride": "32", "task": "detect",
        "version": "8.3.0", "author": "x"}


def test_card_from_ultralytics_detect() -> None:
    card = card_from_ultralytics_metadata(META, "images", ["batch", 3, 384, 640], ["output0"],
                                          [["batch", 7, 5040]], name="y")
    assert card.task is Task.DETECT and card.head.layout is HeadLayout.ULTRALYTICS_DETECT
    assert card.class_names == ("person", "car", "dog") and card.head.num_classes == 3
    assert card.input_wh == (640, 384) and card.input.dynamic_batch and card.head.strides == (8, 16, 32)
    assert card.pad_value == PAD_VALUE and card.name == "y"
    assert card.provenance == {"source": "ultralytics ONNX metadata", "version": "8.3.0"}


def test_card_from_ultralytics_end2end_segment_and_sizes() -> None:
    e2e = card_from_ultralytics_metadata({**META, "imgsz": "320"}, "images", [1, 3, 320, 320], ["output0"],
                                         [[1, 300, 6]])
    assert e2e.head.layout is HeadLayout.END2END and e2e.input_wh == (320, 320) and not e2e.input.dynamic_batch
    seg = card_from_ultralytics_metadata({**META, "task": "segment"}, "images", [1, 3, 384, 640],
                                         ["output0", "output1"], [[1, 7 + 16, 5040], [1, 16, 96, 160]])
    assert seg.task is Task.SEGMENT and seg.head.num_mask_coeffs == 16 and seg.head.mask_hw == (96, 160)
    listed = card_from_ultralytics_metadata({"names": "['a', 'b']", "stride": "64"}, "x", [1, 3, 128, 256],
                                            ["o"], [[1, 6, 99]])
    assert listed.class_names == ("a", "b") and listed.input_wh == (256, 128) and listed.head.strides == (8, 16, 32, 64)


@pytest.mark.parametrize("dtype, error", [
    ("float32", None), ("float16", None),
    ("uint8", "input dtype uint8 is not supported (float32 or float16)"),
    ("float64", "input dtype float64 is not supported (float32 or float16)"),
])
def test_card_from_ultralytics_takes_the_input_dtype(dtype: str, error: str | None) -> None:
    args = (META, "images", ["batch", 3, 384, 640], ["output0"], [["batch", 7, 5040]])
    assert card_from_ultralytics_metadata(*args).input.dtype == "float32"
    if error is None:
        assert card_from_ultralytics_metadata(*args, input_dtype=dtype).input.dtype == dtype
        return
    with pytest.raises(ModelCardError) as exc:
        card_from_ultralytics_metadata(*args, input_dtype=dtype)
    assert str(exc.value) == error


@pytest.mark.parametrize("meta, input_shape, match", [
    ({"imgsz": "640"}, [1, 3, 640, 640], "ONNX metadata has no 'names'"),
    ({"names": "person, car"}, [1, 3, 640, 640], "ONNX metadata 'names' is not a dict literal"),
    ({"names": "['a']"}, ["b", 3, "h", "w"], "cannot tell the input size"),
    ({"names": "['a']", "imgsz": "64", "task": "pose"}, [1, 3, 64, 64], "ultralytics task 'pose' is not supported"),
])
def test_card_from_ultralytics_errors(meta: dict, input_shape: list, match: str) -> None:
    with pytest.raises(ModelCardError, match=match):
        card_from_ultralytics_metadata(meta, "images", input_shape, ["output0"], [[1, 5, 10]])


IMGSZ = "an image size [height, width] of positive integers"


@pytest.mark.parametrize("key, value, message", [
    ("imgsz", "abc", f"ONNX metadata 'imgsz' is not {IMGSZ}: 'abc'"),  # was: ValueError malformed node
    ("imgsz", "[480]", f"ONNX metadata 'imgsz' is not {IMGSZ}: '[480]'"),  # was: IndexError
    ("imgsz", "[-480, 832]", f"ONNX metadata 'imgsz' is not {IMGSZ}: '[-480, 832]'"),  # was: ValidationError
    ("imgsz", "[480, 0]", f"ONNX metadata 'imgsz' is not {IMGSZ}: '[480, 0]'"),
    ("imgsz", "[480, 832, 3]", f"ONNX metadata 'imgsz' is not {IMGSZ}: '[480, 832, 3]'"),
    ("imgsz", "[480.5, 832]", f"ONNX metadata 'imgsz' is not {IMGSZ}: '[480.5, 832]'"),
    ("imgsz", "'480x832'", f"ONNX metadata 'imgsz' is not {IMGSZ}: \"'480x832'\""),  # was: "no 'imgsz' metadata"
    ("imgsz", "0", f"ONNX metadata 'imgsz' is not {IMGSZ}: '0'"),
    ("imgsz", "[[" * 200, f"ONNX metadata 'imgsz' is not {IMGSZ}: {('[[' * 40)!r}"),
    ("stride", "x", "ONNX metadata 'stride' is not a positive integer: 'x'"),  # was: ValueError malformed node
    ("stride", "0", "ONNX metadata 'stride' is not a positive integer: '0'"),  # was: ZeroDivisionError
    ("stride", "-32", "ONNX metadata 'stride' is not a positive integer: '-32'"),
    ("stride", "[32]", "ONNX metadata 'stride' is not a positive integer: '[32]'"),
    ("stride", "True", "ONNX metadata 'stride' is not a positive integer: 'True'"),
    ("names", "{}", "ONNX metadata 'names' lists no classes: '{}'"),  # was: ValidationError (num_classes)
    ("names", "[]", "ONNX metadata 'names' lists no classes: '[]'"),
    ("names", "5", "ONNX metadata 'names' is not a dict literal: '5'"),
    ("names", "'person'", "ONNX metadata 'names' is not a dict literal: \"'person'\""),
    ("names", "{0: 'a', 2: 'b'}", "ONNX metadata 'names' is not a dict of class ids 0 to 1: \"{0: 'a', 2: 'b'}\""),
    ("names", "{'a': 0}", "ONNX metadata 'names' is not a dict of class ids 0 to 0: \"{'a': 0}\""),
])
def test_card_from_ultralytics_refuses_bad_metadata_in_one_line(key: str, value: str, message: str) -> None:
    with pytest.raises(ModelCardError) as exc:
        card_from_ultralytics_metadata({**META, key: value}, "images", ["batch", 3, 384, 640], ["output0"],
                                       [["batch", 7, 5040]])
    assert str(exc.value) == message


@pytest.mark.parametrize("key, value, want", [
    ("imgsz", "[384, 640]", {"input_wh": (640, 384)}),
    ("imgsz", "(384, 640)", {"input_wh": (640, 384)}),
    ("imgsz", "384", {"input_wh": (384, 384)}),
    ("stride", "64", {"strides": (8, 16, 32, 64)}),
    ("stride", "4", {"strides": (4,)}),
    ("names", "{1: 'b', 0: 'a'}", {"class_names": ("a", "b")}),
    ("names", "('a', 'b', 'c')", {"class_names": ("a", "b", "c")}),
])
def test_card_from_ultralytics_reads_good_metadata(key: str, value: str, want: dict) -> None:
    card = card_from_ultralytics_metadata({**META, key: value}, "images", ["batch", 3, "h", "w"], ["output0"],
                                          [["batch", 7, "anchors"]])
    got = {"input_wh": card.input_wh, "strides": card.head.strides, "class_names": card.class_names}
    assert {k: got[k] for k in want} == want


def test_card_from_ultralytics_without_imgsz_refuses_an_empty_input_size_in_one_line() -> None:
    meta = {k: v for k, v in META.items() if k != "imgsz"}
    with pytest.raises(ModelCardError) as exc:
        card_from_ultralytics_metadata(meta, "images", ["batch", 3, 0, 640], ["output0"], [["batch", 7, 5040]])
    assert str(exc.value) == "ONNX metadata gives an invalid model card: height: Input should be greater than 0"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batch_nbytes_is_the_size_of_an_input_batch(dtype):
    import numpy as np

    card = make_card(input=InputSpec(width=832, height=480, dtype=dtype))
    assert card.batch_nbytes(4) == np.zeros((4, 3, 480, 832), dtype).nbytes
    assert card.batch_nbytes(0) == 0
