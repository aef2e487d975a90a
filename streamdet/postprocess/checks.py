"""Model outputs against the model card: shapes checked before any frame is read."""

from __future__ import annotations

import math
from collections.abc import Sequence

from streamdet.card import HeadLayout, ModelCard, ModelCardError

Shape = Sequence[int | str | None]


def expected_num_anchors(input_wh: tuple[int, int], strides: Sequence[int]) -> int:
    """Anchor points of an anchor-free head: ``sum over strides of ceil(H/s) * ceil(W/s)``."""
    w, h = input_wh
    return sum(math.ceil(h / s) * math.ceil(w / s) for s in strides)


def _dim_mismatch(got: int | str | None, want: int) -> bool:
    return isinstance(got, int) and got != want


def check_outputs_against_card(
    card: ModelCard, output_shapes: Sequence[Shape], output_names: Sequence[str] | None = None
) -> None:
    """Check a model's output shapes against its card, before any frame is read.

    Symbolic dimensions (strings or ``None``, e.g. a dynamic batch) are not checked: a caller that can
    size them for the card's input (the pipeline's start-up check, ``pipeline.stages.model_check``, by
    ONNX shape inference or one run) passes those sizes, so that an ultralytics ``dynamic=True`` export's
    ``('batch', 84, 'anchors')`` is checked too.

    Args:
        card: the model card.
        output_shapes: the model's output shapes, in the card's ``head.outputs`` order.
        output_names: names for messages (default: the card's ``head.outputs``).

    Raises:
        ModelCardError: naming the first mismatch, e.g. ``expected output0 with 4+10=14 rows, got 84``.
    """
    head = card.head
    names = list(output_names) if output_names is not None else list(head.outputs)
    names += [f"output{i}" for i in range(len(names), len(output_shapes))]
    iw, ih = card.input_wh
    nc = head.num_classes
    shapes = [list(s) for s in output_shapes]

    def fail(msg: str) -> None:
        raise ModelCardError(msg)

    def need_count(n: int, what: str) -> None:
        if len(shapes) != n:
            fail(f"expected {n} model output{'s' if n > 1 else ''} ({what}) for head layout {head.layout.value}, "
                 f"got {len(shapes)}")

    def need_rank(i: int, rank: int, form: str) -> None:
        if len(shapes[i]) != rank:
            fail(f"expected {names[i]} of rank {rank} {form}, got shape {shapes[i]}")

    if head.layout in (HeadLayout.ULTRALYTICS_DETECT, HeadLayout.ULTRALYTICS_SEGMENT):
        seg = head.layout is HeadLayout.ULTRALYTICS_SEGMENT
        nm = head.num_mask_coeffs
        if seg:
            if nm <= 0:
                fail(f"expected num_mask_coeffs > 0 for head layout {head.layout.value}, got {nm}")
            need_count(2, "detections, prototypes")
        else:
            need_count(1, "detections")
        need_rank(0, 3, "(B, rows, anchors)")
        rows = 4 + nc + (nm if seg else 0)
        formula = f"4+{nc}+{nm}" if seg else f"4+{nc}"
        if _dim_mismatch(shapes[0][1], rows):
            fail(f"expected {names[0]} with {formula}={rows} rows, got {shapes[0][1]}")
        if head.strides:
            n = expected_num_anchors((iw, ih), head.strides)
            if _dim_mismatch(shapes[0][2], n):
                fail(f"expected {names[0]} with {n} anchor columns for input {iw}x{ih} and strides "
                     f"{list(head.strides)}, got {shapes[0][2]}")
        if seg:
            need_rank(1, 4, "(B, nm, mh, mw)")
            mh, mw = head.mask_hw if head.mask_hw is not None else (math.ceil(ih / 4), math.ceil(iw / 4))
            if _dim_mismatch(shapes[1][1], nm):
                fail(f"expected {names[1]} with {nm} prototypes, got {shapes[1][1]}")
            if _dim_mismatch(shapes[1][2], mh) or _dim_mismatch(shapes[1][3], mw):
                fail(f"expected {names[1]} prototype size {mh}x{mw} (HxW), got {shapes[1][2]}x{shapes[1][3]}")
    elif head.layout is HeadLayout.END2END:
        if len(shapes) == 1:
            need_rank(0, 3, "(B, K, 6)")
            if _dim_mismatch(shapes[0][2], 6):
                fail(f"expected {names[0]} rows of 6 values (x1, y1, x2, y2, score, class), got {shapes[0][2]}")
        elif len(shapes) == 3:
            need_rank(0, 3, "(B, K, 4)")
            if _dim_mismatch(shapes[0][2], 4):
                fail(f"expected {names[0]} boxes of 4 values, got {shapes[0][2]}")
            need_rank(1, 2, "(B, K)")
            need_rank(2, 2, "(B, K)")
        else:
            fail(f"expected 1 or 3 model outputs for head layout end2end, got {len(shapes)}")
    elif head.layout in (HeadLayout.DETR, HeadLayout.RTDETR):
        detr = head.layout is HeadLayout.DETR
        need_count(2 if detr else 1, "class logits, boxes" if detr else "boxes and scores")
        need_rank(0, 3, f"(B, queries, {nc}+1)" if detr else f"(B, queries, 4+{nc})")
        cols = nc + 1 if detr else 4 + nc
        if _dim_mismatch(shapes[0][2], cols):
            what = f"{nc}+1={cols} class logits (the last is no-object)" if detr else f"4+{nc}={cols} values"
            fail(f"expected {names[0]} with {what} per query, got {shapes[0][2]}")
        queries = [(names[0], shapes[0][1])]
        if detr:
            need_rank(1, 3, "(B, queries, 4)")
            if _dim_mismatch(shapes[1][2], 4):
                fail(f"expected {names[1]} boxes of 4 values (cx, cy, w, h), got {shapes[1][2]}")
            queries.append((names[1], shapes[1][1]))
            q0, q1 = shapes[0][1], shapes[1][1]
            if isinstance(q0, int) and isinstance(q1, int) and q0 != q1:
                fail(f"expected the same query count in {names[0]} and {names[1]}, got {q0} and {q1}")
        if head.num_queries is not None:
            for name, q in queries:
                if _dim_mismatch(q, head.num_queries):
                    fail(f"expected {name} with {head.num_queries} queries (head.num_queries), got {q}")
    elif head.layout is HeadLayout.SEMANTIC_LOGITS:
        need_count(1, "logits")
        need_rank(0, 4, "(B, C, H, W)")
        if _dim_mismatch(shapes[0][1], nc):
            fail(f"expected {names[0]} with {nc} class channels, got {shapes[0][1]}")
        if _dim_mismatch(shapes[0][2], ih) or _dim_mismatch(shapes[0][3], iw):
            fail(f"expected {names[0]} logits at input resolution {ih}x{iw} (HxW), got "
                 f"{shapes[0][2]}x{shapes[0][3]}")
        if nc > 256:
            fail(f"expected at most 256 semantic classes (uint8 class map), got {nc}")
