"""Tiny DETR-family stand-ins (built with onnx.helper): one box per query, scores from the image.

The input is cut into a grid of ``GRID_WH`` cells; query ``q`` is cell ``q`` (row-major). Its box
is the cell grown by half a cell on each side (cxcywh normalised to the input, the same for every
image); its class ``k`` score comes from the mean of channel ``k`` over the cell: DETR logits
``gain * mean - bias`` with a no-object logit of 0, RT-DETR ``sigmoid(gain * mean - bias)``. So
bright red / green / blue regions light up classes 0 / 1 / 2, and where a query falls on the frame
depends on how the frame was resized into the input (letterbox or stretch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, Normalization, Task, save_card
from streamdet.letterbox import ResizeMode

CLASS_NAMES = ("red", "green", "blue")
GRID_WH = (8, 8)
NUM_QUERIES = GRID_WH[0] * GRID_WH[1]

RTDETR_METADATA = {
    "description": "Ultralytics rtdetr-l model trained on stand-in.yaml",
    "author": "Ultralytics",
    "stride": "32",
    "task": "detect",
    "batch": "1",
    "imgsz": "[640, 640]",
    "names": "{0: 'red', 1: 'green', 2: 'blue'}",
}
"""The metadata ultralytics writes into an RT-DETR ONNX export (the keys streamdet reads)."""


def query_boxes_cxcywh() -> np.ndarray:
    """``(Q, 4)`` float32 query boxes, cxcywh normalised to the input."""
    gw, gh = GRID_WH
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    cx = (xs.ravel() + 0.5) / gw
    cy = (ys.ravel() + 0.5) / gh
    return np.stack([cx, cy, np.full(cx.shape, 2.0 / gw), np.full(cy.shape, 2.0 / gh)], axis=1).astype(np.float32)


def _cell_means(input_wh: tuple[int, int]) -> tuple[list[Any], list[Any]]:
    """Nodes turning ``images`` into ``cells`` ``(B, Q, 3)``: each cell's channel means."""
    w, h = input_wh
    gw, gh = GRID_WH
    assert w % gw == 0 and h % gh == 0
    kw, kh = w // gw, h // gh
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[kh, kw], strides=[kh, kw]),
        helper.make_node("Reshape", ["pooled", "shape3"], ["flat"]),  # (B, 3, Q)
        helper.make_node("Transpose", ["flat"], ["cells"], perm=[0, 2, 1]),  # (B, Q, 3)
    ]
    inits = [numpy_helper.from_array(np.array([0, 3, -1], np.int64), "shape3")]
    return nodes, inits


def _batch_boxes() -> tuple[list[Any], list[Any]]:
    """Nodes giving ``qboxes`` ``(B, Q, 4)``: the query boxes, broadcast over the batch."""
    nodes = [
        helper.make_node("ReduceMean", ["cells"], ["m"], axes=[1, 2], keepdims=1),  # (B, 1, 1)
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["qb", "z"], ["qboxes"]),
    ]
    inits = [numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
             numpy_helper.from_array(query_boxes_cxcywh()[None], "qb")]
    return nodes, inits


def _class_logits(gain: float, bias: float) -> tuple[list[Any], list[Any]]:
    c = len(CLASS_NAMES)
    nodes = [helper.make_node("MatMul", ["cells", "wcls"], ["cl"]),
             helper.make_node("Add", ["cl", "bcls"], ["logits"])]
    inits = [numpy_helper.from_array((np.eye(3, c, dtype=np.float32) * gain), "wcls"),
             numpy_helper.from_array(np.full(c, -bias, np.float32), "bcls")]
    return nodes, inits


def _save(nodes: list[Any], inits: list[Any], outputs: list[Any], path: Path, input_wh: tuple[int, int],
          metadata: dict[str, str] | None) -> None:
    w, h = input_wh
    graph = helper.make_graph(nodes, "detr_standin",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_detr(path: str | Path, *, input_wh: tuple[int, int] = (640, 384), gain: float = 12.0,
               bias: float = 6.0, resize: ResizeMode = ResizeMode.LETTERBOX, write_card: bool = True,
               card_queries: int | None = NUM_QUERIES, card_classes: int = len(CLASS_NAMES)) -> Path:
    """A DETR-layout stand-in: ``logits`` ``(B, Q, C + 1)`` (no-object last) and ``boxes`` ``(B, Q, 4)``."""
    path = Path(path)
    c = len(CLASS_NAMES)
    nodes, inits = _cell_means(input_wh)
    for more in (_batch_boxes(), _class_logits(gain, bias)):
        nodes += more[0]
        inits += more[1]
    nodes += [helper.make_node("ReduceMean", ["logits"], ["lm"], axes=[2], keepdims=1),
              helper.make_node("Mul", ["lm", "zero"], ["noobj"]),  # (B, Q, 1) zeros: the no-object logit
              helper.make_node("Concat", ["logits", "noobj"], ["pred_logits"], axis=2),
              helper.make_node("Identity", ["qboxes"], ["pred_boxes"])]
    outputs = [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, ["batch", NUM_QUERIES, c + 1]),
               helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, ["batch", NUM_QUERIES, 4])]
    _save(nodes, inits, outputs, path, input_wh, None)
    if write_card:
        save_card(detr_card(input_wh, resize=resize, num_queries=card_queries, num_classes=card_classes),
                  path.with_suffix(".json"))
    return path


def detr_card(input_wh: tuple[int, int] = (640, 384), *, resize: ResizeMode = ResizeMode.LETTERBOX,
              num_queries: int | None = NUM_QUERIES, num_classes: int = len(CLASS_NAMES)) -> ModelCard:
    """The DETR stand-in's card (pixels / 255, as the stand-in's scores assume)."""
    names = (CLASS_NAMES + tuple(f"extra{i}" for i in range(num_classes)))[:num_classes]
    return ModelCard(
        name="detr_standin", task=Task.DETECT,
        head=HeadSpec(layout=HeadLayout.DETR, num_classes=num_classes, strides=(),
                      outputs=("pred_logits", "pred_boxes"), num_queries=num_queries),
        input=InputSpec(width=input_wh[0], height=input_wh[1], resize=resize),
        normalization=Normalization(), class_names=names,
    )


def build_rtdetr(path: str | Path, *, input_wh: tuple[int, int] = (640, 640), gain: float = 12.0,
                 bias: float = 6.0, metadata: dict[str, str] | None = None) -> Path:
    """An RT-DETR-layout stand-in as ultralytics exports it: ``output0`` ``(B, Q, 4 + C)``, with its metadata."""
    path = Path(path)
    c = len(CLASS_NAMES)
    nodes, inits = _cell_means(input_wh)
    for more in (_batch_boxes(), _class_logits(gain, bias)):
        nodes += more[0]
        inits += more[1]
    nodes += [helper.make_node("Sigmoid", ["logits"], ["scores"]),
              helper.make_node("Concat", ["qboxes", "scores"], ["output0"], axis=2)]
    outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", NUM_QUERIES, 4 + c])]
    _save(nodes, inits, outputs, path, input_wh, RTDETR_METADATA if metadata is None else metadata)
    return path
