"""A semantic model with a dynamic input size runs at the minimum rectangle of its network's stride.

A ``semantic_logits`` card's ``head.strides`` is the logits' output stride (``[1]`` as
``training/export_semantic.py`` writes it), not the network's downsampling: the rectangle's stride
comes from the model's ``stride`` metadata, else 32. The stand-in here is the semantic stand-in
(a 1x1 convolution) made dynamic, plus a zero term through a 32x downsample and upsample, so, like
a real encoder-decoder, it only runs on inputs whose sides are multiples of 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pipeline.chains import rect_stride
from pipeline.runner import Pipeline
from pipeline.stages.model_check import inspect_onnx
from streamdet.card import HeadLayout, HeadSpec, save_card
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path
from tests.helpers.standin_seg import build_semantic_standin, semantic_card

N = 3


def build_dynamic_semantic(path: Path, metadata_stride: int | None = None) -> Path:
    """The semantic stand-in with a symbolic input/output height and width and a card with strides ``[1]``."""
    card = semantic_card()
    card = card.model_copy(update={"head": HeadSpec(layout=HeadLayout.SEMANTIC_LOGITS,
                                                    num_classes=card.head.num_classes, strides=(1,))})
    build_semantic_standin(path, card=card)
    m = onnx.load(str(path))
    g = m.graph
    (conv,) = g.node
    conv.output[0] = "logits"
    g.initializer.append(numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "up"))
    g.node.extend([  # zeros of shape (B, 1, 32 * (H // 32), 32 * (W // 32)): the Add fails unless 32 | H, W
        helper.make_node("AveragePool", ["images"], ["down"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Resize", ["down", "", "up"], ["back"], mode="nearest"),
        helper.make_node("ReduceMean", ["back"], ["back1"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["back1", "back1"], ["zero"]),
        helper.make_node("Add", ["logits", "zero"], ["output0"]),
    ])
    for vi in (g.input[0], g.output[0]):
        vi.type.tensor_type.shape.dim[2].dim_param = "height"
        vi.type.tensor_type.shape.dim[3].dim_param = "width"
    if metadata_stride is not None:
        onnx.helper.set_model_props(m, {"stride": str(metadata_stride)})
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    save_card(card, path.with_suffix(".json"))
    return path


def test_rect_stride_of_a_semantic_card_is_not_its_output_stride(tmp_path):
    model = build_dynamic_semantic(tmp_path / "sem.onnx")
    info = inspect_onnx(model)
    card = semantic_card().model_copy(update={"head": HeadSpec(layout=HeadLayout.SEMANTIC_LOGITS, num_classes=4,
                                                               strides=(1,))})
    assert rect_stride(info, card) == 32
    assert rect_stride(inspect_onnx(build_dynamic_semantic(tmp_path / "s64.onnx", 64)), card) == 64
    detector = card.model_copy(update={"head": HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=3,
                                                        strides=(8, 16, 32, 64))})
    assert rect_stride(info, detector) == 64  # a detector's strides are its downsampling: unchanged


def semantic_maps(tmp_path: Path, model: Path, rect: bool) -> list[dict]:
    out = tmp_path / f"rect_{rect}.jsonl"
    s = settings_with({"sources": [str(bikes_path())], "model": str(model), "quiet": True, "max_frames": N,
                       "sinks": {"publish": None, "jsonl": str(out)}, "preprocess": {"rect": rect}})
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.exit_code == 0 and summary.frames == N
    msgs = [json.loads(x) for x in out.read_text().splitlines() if '"frame_index"' in x]
    assert len(msgs) == N
    return [m["semantic"] for m in msgs]


@pytest.mark.timeout(120)
def test_dynamic_semantic_model_with_output_stride_card_runs_rect(tmp_path):
    model = build_dynamic_semantic(tmp_path / "sem.onnx")
    rect = semantic_maps(tmp_path, model, True)  # bikes 640x272 -> 640x288 (stride 32), not 640x272
    assert all(len(m["classes"]) > 1 for m in rect)
    assert rect == semantic_maps(tmp_path, model, False)  # the same class maps as at the full 640x384
