"""Start-up checks of a card against its model: the input dtype, and cards refused before anything is decoded."""

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
from pipeline.stages.model_check import check_card_against_model, checked_card, inspect_onnx, resolve_card
from streamdet.card import ModelCardError
from tests.helpers.cli import run
from tests.helpers.standin import bikes_path, build_standin, standin_card

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
