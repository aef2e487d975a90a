"""engines.onnxruntime_backend: outputs against references computed without ONNX Runtime, errors naming the file,
and the session options (threads, spinning)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from engines.base import EngineError
from engines.onnxruntime_backend import OnnxRuntimeEngine
from tests.helpers.standin import STRIDES, anchors_cxcywh

STANDIN_WH = (640, 384)  # the standin_model fixture's input size
STANDIN_GAIN = STANDIN_BIAS = 12.0  # build_standin's defaults


def standin_reference(x: np.ndarray) -> np.ndarray:
    """The stand-in's ``output0`` in numpy, fixed anchor boxes; class k = sigmoid(gain * cell mean of k - bias)."""
    b, c, h, w = x.shape
    means = [x.reshape(b, c, h // s, s, w // s, s).mean(axis=(3, 5)).reshape(b, c, -1) for s in STRIDES]
    scores = 1.0 / (1.0 + np.exp(-(STANDIN_GAIN * np.concatenate(means, axis=2) - STANDIN_BIAS)))
    boxes = np.broadcast_to(anchors_cxcywh((w, h))[None], (b, 4, scores.shape[2]))
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def two_output_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1x1 conv + sigmoid (``scores``) and a ReLU of the shifted input (``shifted``), dynamic batch, metadata."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(2, 3, 1, 1)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.array([0.5, -0.25], np.float32), "b")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["logits"], kernel_shape=[1, 1]),
         helper.make_node("Sigmoid", ["logits"], ["scores"]),
         helper.make_node("Sub", ["x", "half"], ["centred"]),
         helper.make_node("Relu", ["centred"], ["shifted"])],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 5])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, 4, 5]),
         helper.make_tensor_value_info("shifted", TensorProto.FLOAT, ["batch", 3, 4, 5])],
        initializer=[w, bias, half],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="names", value="{0: 'a'}")
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("ort") / "two_outputs.onnx"
    onnx.save(model, str(path))
    return path


def test_standin_matches_numpy(standin_model: Path) -> None:
    w, h = STANDIN_WH
    x = np.random.default_rng(1).random((2, 3, h, w), dtype=np.float32)
    with OnnxRuntimeEngine(model_path=standin_model, intra_op_threads=1) as e:
        (got,) = e.infer(x)
    want = standin_reference(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_outputs_in_output_name_order_match_the_reference_evaluator(two_output_onnx: Path) -> None:
    x = np.random.default_rng(2).random((3, 3, 4, 5), dtype=np.float32)
    want = ReferenceEvaluator(str(two_output_onnx)).run(None, {"x": x})
    e = OnnxRuntimeEngine(model_path=two_output_onnx, intra_op_threads=1)
    e.start()
    try:
        assert e.input_name == "x" and e.output_names == ("scores", "shifted")
        assert e.input_shape == ["batch", 3, 4, 5]
        assert e.output_shapes == [["batch", 2, 4, 5], ["batch", 3, 4, 5]]
        assert e.metadata == {"names": "{0: 'a'}"}
        got = e.infer(x)
    finally:
        e.stop()
    assert len(got) == 2
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-6)
    np.testing.assert_array_equal(got[1], np.maximum(x - 0.5, 0))  # numpy, for the second output too


def test_bad_model_file_names_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf \xff\xfe")
    with pytest.raises(EngineError, match=r"junk\.onnx: not a loadable ONNX model"):
        OnnxRuntimeEngine(model_path=junk).start()
    with pytest.raises(EngineError, match=r"missing\.onnx: model file not found"):
        OnnxRuntimeEngine(model_path=tmp_path / "missing.onnx").start()


def test_two_inputs_are_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    with pytest.raises(EngineError, match=r"two\.onnx: expected 1 input, got 2"):
        OnnxRuntimeEngine(model_path=path).start()


def test_infer_needs_start(two_output_onnx: Path) -> None:
    e = OnnxRuntimeEngine(model_path=two_output_onnx)
    with pytest.raises(EngineError, match=r"two_outputs\.onnx: engine not started"):
        e.infer(np.zeros((1, 3, 4, 5), np.float32))
    e.start()
    e.stop()
    with pytest.raises(EngineError, match="engine not started"):
        e.infer(np.zeros((1, 3, 4, 5), np.float32))


@pytest.mark.parametrize("threads, spinning", [(1, False), (2, True)])
def test_threads_and_spinning_options(two_output_onnx: Path, threads: int, spinning: bool) -> None:
    x = np.random.default_rng(3).random((2, 3, 4, 5), dtype=np.float32)
    with OnnxRuntimeEngine(model_path=two_output_onnx) as reference:  # default: ONNX Runtime picks the threads
        want = reference.infer(x)
    e = OnnxRuntimeEngine(model_path=two_output_onnx, intra_op_threads=threads, allow_spinning=spinning)
    e.start()
    opts = e._session.get_session_options()
    assert opts.intra_op_num_threads == threads and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    got = e.infer(x)
    e.stop()
    for g, r in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, r)
