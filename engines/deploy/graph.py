"""ONNX graph analysis and surgery for the reduced-precision variants.

Which nodes form the detector head's FP32 tail (:func:`head_fp32_nodes`), what precision a
graph computes in (:func:`onnx_precision`), node naming, the single input's name, and putting
float32 graph outputs back after an FP16 conversion (:func:`restore_float32_outputs`).
"""

from __future__ import annotations

from typing import Any

from engines.deploy.options import CalibrationError

__all__ = ["graph_input_name", "head_fp32_nodes", "name_unnamed_nodes", "onnx_precision", "restore_float32_outputs"]

_HEAD_PASS_THROUGH = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output if out}


def _is_dfl_conv(node: Any, producers: dict[str, Any]) -> bool:
    """A Conv fed (through reshapes/transposes only) by a Softmax: the DFL expectation conv."""
    if node.op_type != "Conv":
        return False
    src = producers.get(node.input[0])
    while src is not None and src.op_type in _HEAD_PASS_THROUGH:
        src = producers.get(src.input[0]) if src.input else None
    return src is not None and src.op_type == "Softmax"


def head_fp32_nodes(model: Any) -> list[str]:
    """Names of the nodes between the last head convolutions and the graph outputs.

    Walks back from every graph output through all producers and stops at convolutions: the
    nodes found are the head's tail (class sigmoid, DFL softmax, box decode ``Sub``/``Add``/``Mul``
    /``Div``, ``Concat``, reshapes, anchor arithmetic). The DFL's fixed 1x1 convolution (a ``Conv``
    fed by a ``Softmax``) belongs to the tail and the walk continues through it. For an
    instance-segmentation model the prototype output's final activation is included too.

    Args:
        model: an ``onnx.ModelProto`` whose nodes all have names (see :func:`name_unnamed_nodes`).

    Returns:
        Node names, in graph order.

    Raises:
        CalibrationError: if the walk finds no convolution at all (not a convolutional detector head).
    """
    producers = _producers(model)
    seen: set[int] = set()
    stack = [producers[o.name] for o in model.graph.output if o.name in producers]
    stopped_at_conv = False
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        if node.op_type in ("Conv", "ConvTranspose") and not _is_dfl_conv(node, producers):
            stopped_at_conv = True
            continue
        seen.add(id(node))
        for name in node.input:
            src = producers.get(name)
            if src is not None and id(src) not in seen:
                stack.append(src)
    if not stopped_at_conv:
        raise CalibrationError("model: no convolution found walking back from the outputs "
                               "(not a convolutional detector head)")
    return [n.name for n in model.graph.node if id(n) in seen]


def name_unnamed_nodes(model: Any) -> int:
    """Give every unnamed node a unique name ``<op_type>_<index>`` (in place); returns how many."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
            count += 1
    return count


def onnx_precision(model: Any) -> str:
    """Tell a model's compute precision from its graph: ``int8``, ``fp16`` or ``fp32``.

    ``int8``: it has ``QuantizeLinear``/``DequantizeLinear`` nodes; ``fp16``: float16 initializers or
    ``Cast`` to float16; else ``fp32``.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        One of ``"int8"``, ``"fp16"``, ``"fp32"``.
    """
    import onnx

    ops = {n.op_type for n in model.graph.node}
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    for n in model.graph.node:
        if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute):
            return "fp16"
    return "fp32"


def graph_input_name(model: Any) -> str:
    """The name of a model's one graph input that is not an initializer.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        The input tensor name.

    Raises:
        CalibrationError: if the model does not have exactly one input.
    """
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CalibrationError(f"model: expected 1 input, got {len(inputs)}")
    return inputs[0]


def restore_float32_outputs(converted: Any, original: Any) -> int:
    """Make graph outputs that were float32 in ``original`` float32 again in ``converted`` (in place).

    ``convert_float_to_float16(keep_io_types=True)`` leaves a graph output float16 (behind a
    ``Cast`` to float16) when the node producing it is in ``node_block_list`` (seen with
    onnxconverter-common 1.16). Such a trailing ``Cast`` is removed (its input, already float32,
    becomes the output); any other float16 output gets a ``Cast`` to float32 appended.

    Args:
        converted: the converted ``onnx.ModelProto``.
        original: the model before conversion.

    Returns:
        The number of outputs fixed.
    """
    import onnx

    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    fixed = 0
    for out in converted.graph.output:
        tt = out.type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT16 or want.get(out.name) != onnx.TensorProto.FLOAT:
            continue
        producers = _producers(converted)
        node = producers.get(out.name)
        to_half = node is not None and node.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute)
        inner = node.input[0] if node is not None and to_half else ""
        src = producers.get(inner)
        shared = any(inner in n.input for n in converted.graph.node if n is not node) or inner in {
            o.name for o in converted.graph.output}
        if node is not None and src is not None and not shared:
            # a Cast to float16 reads a float32 tensor: let that tensor be the output
            src.output[list(src.output).index(inner)] = out.name
            converted.graph.node.remove(node)
        else:
            half = f"{out.name}_fp16"
            for n in converted.graph.node:
                for i, name in enumerate(n.output):
                    if name == out.name:
                        n.output[i] = half
                for i, name in enumerate(n.input):
                    if name == out.name:
                        n.input[i] = half
            converted.graph.node.append(onnx.helper.make_node("Cast", [half], [out.name], to=onnx.TensorProto.FLOAT,
                                                              name=f"{out.name}_to_float32"))
        tt.elem_type = onnx.TensorProto.FLOAT
        fixed += 1
    return fixed
