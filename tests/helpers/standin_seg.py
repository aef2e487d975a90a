"""Tiny stand-in segmentation models for pipeline tests (built with onnx.helper, no training).

* :func:`build_segment_standin`: ultralytics segment layout. ``output0`` ``(B, 4 + 3 + NM, N)`` is the
  detect stand-in's (:mod:`tests.helpers.standin`: red / green / blue cells light up classes 0 / 1 /
  2) plus ``NM`` mask coefficients per anchor (a 1x1 convolution of the cell's mean colour);
  ``output1`` ``(B, NM, H/4, W/4)`` prototypes are a 1x1 convolution of the 4x4-pooled image, so
  each mask follows the colours in and around its box.
* :func:`build_semantic_standin`: ``(B, 4, H, W)`` logits at input resolution, channel 0
  background (a constant), channel ``k + 1`` ``gain * colour k``: bright colours win their pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, Task, save_card
from tests.helpers.standin import CLASS_NAMES, STRIDES, anchors_cxcywh, pooled_feature_nodes

NM = 4
SEMANTIC_NAMES = ("background", *CLASS_NAMES)
# prototype 3 is the brightness (12 * mean colour - 8) with a constant coefficient 1; prototypes 0..2
# (one per colour) add a small colour-dependent term, so masks are the bright pixels of each box.
_W_PROTO = np.array([[6.0, -3.0, -3.0], [-3.0, 6.0, -3.0], [-3.0, -3.0, 6.0], [4.0, 4.0, 4.0]], np.float32)
_B_PROTO = np.array([-1.0, -1.0, -1.0, -8.0], np.float32)
_W_COEF = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]], np.float32)
_B_COEF = np.array([0.0, 0.0, 0.0, 1.0], np.float32)


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def segment_card(input_wh: tuple[int, int] = (640, 384), *, num_mask_coeffs: int = NM,
                 mask_hw: tuple[int, int] | None = None, num_classes: int = len(CLASS_NAMES),
                 name: str = "segstandin") -> ModelCard:
    """The segment stand-in's card (overrides make contradicting cards)."""
    names = tuple(CLASS_NAMES[k] if k < len(CLASS_NAMES) else f"c{k}" for k in range(num_classes))
    return ModelCard(
        name=name, task=Task.SEGMENT,
        head=HeadSpec(layout=HeadLayout.ULTRALYTICS_SEGMENT, num_classes=num_classes, strides=STRIDES,
                      num_mask_coeffs=num_mask_coeffs, outputs=("output0", "output1"),
                      mask_hw=mask_hw or (input_wh[1] // 4, input_wh[0] // 4)),
        input=InputSpec(width=input_wh[0], height=input_wh[1]),
        class_names=names,
    )


def build_segment_standin(path: str | Path, *, input_wh: tuple[int, int] = (640, 384), gain: float = 12.0,
                          bias: float = 12.0, card: ModelCard | None = None) -> Path:
    """Write the segment stand-in ONNX and its card (``card`` overrides it) beside it."""
    path = Path(path)
    w, h = input_wh
    c = len(CLASS_NAMES)
    nodes, inits = pooled_feature_nodes()
    inits += [numpy_helper.from_array((np.eye(c, 3, dtype=np.float32) * gain).reshape(c, 3, 1), "wcls"),
              numpy_helper.from_array(np.full(c, -bias, np.float32), "bcls"),
              numpy_helper.from_array(_W_COEF.reshape(NM, 3, 1), "wcoef"),
              numpy_helper.from_array(_B_COEF, "bcoef"),
              numpy_helper.from_array(_W_PROTO.reshape(NM, 3, 1, 1), "wproto"),
              numpy_helper.from_array(_B_PROTO, "bproto"),
              numpy_helper.from_array(anchors_cxcywh(input_wh)[None], "anchors"),
              numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    nodes += [
        helper.make_node("Conv", ["feat", "wcls", "bcls"], ["logits"], kernel_shape=[1]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
        helper.make_node("Conv", ["feat", "wcoef", "bcoef"], ["coef"], kernel_shape=[1]),
        helper.make_node("ReduceMean", ["feat"], ["fmean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["fmean", "zero"], ["fzero"]),
        helper.make_node("Add", ["anchors", "fzero"], ["boxes"]),
        helper.make_node("Concat", ["boxes", "scores", "coef"], ["output0"], axis=1),
        helper.make_node("AveragePool", ["images"], ["p4"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["p4", "wproto", "bproto"], ["output1"], kernel_shape=[1, 1]),
    ]
    n = int(anchors_cxcywh(input_wh).shape[1])
    graph = helper.make_graph(
        nodes, "segstandin",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + c + NM, n]),
         helper.make_tensor_value_info("output1", TensorProto.FLOAT, ["batch", NM, h // 4, w // 4])],
        initializer=inits,
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    save_card(card or segment_card(input_wh), path.with_suffix(".json"))
    return path


def semantic_card(input_wh: tuple[int, int] = (640, 384), *, num_classes: int = len(SEMANTIC_NAMES)) -> ModelCard:
    """The semantic stand-in's card."""
    names = tuple(SEMANTIC_NAMES[k] if k < len(SEMANTIC_NAMES) else f"c{k}" for k in range(num_classes))
    return ModelCard(
        name="semstandin", task=Task.SEMANTIC,
        head=HeadSpec(layout=HeadLayout.SEMANTIC_LOGITS, num_classes=num_classes, outputs=("output0",)),
        input=InputSpec(width=input_wh[0], height=input_wh[1]),
        class_names=names,
    )


def build_semantic_standin(path: str | Path, *, input_wh: tuple[int, int] = (640, 384), gain: float = 8.0,
                           flat_output: bool = False, card: ModelCard | None = None) -> Path:
    """Write the semantic stand-in ONNX and its card; ``flat_output`` makes the output 3-D ``(B, C, H*W)``."""
    path = Path(path)
    w, h = input_wh
    k = len(SEMANTIC_NAMES)
    wts = np.zeros((k, 3, 1, 1), np.float32)
    for i in range(3):
        wts[i + 1, i] = gain
    bias = np.array([0.45 * gain, 0.0, 0.0, 0.0], np.float32)
    nodes = [helper.make_node("Conv", ["images", "w", "b"], ["logits" if flat_output else "output0"],
                              kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(wts, "w"), numpy_helper.from_array(bias, "b")]
    out_shape: list[int | str] = ["batch", k, h, w]
    if flat_output:
        inits.append(numpy_helper.from_array(np.array([0, k, -1], np.int64), "shape3"))
        nodes.append(helper.make_node("Reshape", ["logits", "shape3"], ["output0"]))
        out_shape = ["batch", k, h * w]
    graph = helper.make_graph(
        nodes, "semstandin",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    save_card(card or semantic_card(input_wh), path.with_suffix(".json"))
    return path
