"""The CUDA backend's ``.pt2`` program built from an ONNX model, with the torch of the machine that runs it.

``engines.cuda_backend`` runs ``MODEL.pt2`` (a ``torch.export`` program); the bundled detector
ships as ONNX only and its training checkpoint is not in the repository, and a ``.pt2`` saved by
one torch version need not load in another. So the GPU check rebuilds it where it runs: the ONNX
graph is interpreted by a small ``torch.nn.Module`` (:class:`OnnxModule`: initializers as
parameters, each node as the torch op of the same meaning), exported with
:func:`engines.cuda_backend.save_exported_program` (dynamic batch), and checked against ONNX
Runtime on the CPU before it is used.

Shape arithmetic (``Shape -> Gather -> Add/Div -> Concat -> Reshape`` chains, int64 constants)
runs on Python ints, so ``torch.export`` sees static sizes except the symbolic batch. Only the
ops the bundled detectors use are implemented; another op is a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class OnnxOpError(ValueError):
    """The ONNX graph uses an op or attribute this interpreter does not implement."""


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxModule:
    """Factory for the torch module that evaluates an ONNX graph (built lazily: torch is imported here)."""

    @staticmethod
    def build(onnx_path: Path) -> Any:
        """Return a ``torch.nn.Module`` whose forward(images) equals the ONNX model's (first output)."""
        import onnx
        import torch
        import torch.nn.functional as F  # noqa: N812
        from onnx import numpy_helper

        model = onnx.load(str(onnx_path))
        graph = model.graph
        known = {"Constant", "Conv", "Sigmoid", "Mul", "Add", "Sub", "Div", "Concat", "Slice", "Shape", "Gather",
                 "Unsqueeze", "Reshape", "Expand", "MaxPool", "Resize", "Transpose", "Softmax", "MatMul", "Relu",
                 "Split", "Squeeze", "Flatten", "Identity", "AveragePool", "ReduceMean"}
        unknown = sorted({n.op_type for n in graph.node} - known)
        if unknown:
            raise OnnxOpError(f"{onnx_path}: ops not supported by the .pt2 builder: {', '.join(unknown)}")

        class _Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.tensors = torch.nn.ParameterDict()
                self.ints: dict[str, list[int]] = {}
                for i, init in enumerate(graph.initializer):
                    arr = numpy_helper.to_array(init)
                    if arr.dtype.kind in "iu":
                        self.ints[init.name] = [int(v) for v in arr.reshape(-1)]
                    else:
                        self.tensors[f"t{i}"] = torch.nn.Parameter(torch.from_numpy(arr.copy()), requires_grad=False)
                self.names = {init.name: f"t{i}" for i, init in enumerate(graph.initializer)}
                self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
                self.small: dict[str, list[float]] = {}  # small float constants, as Python floats (Resize scales)

                def n_out(j: int) -> str:
                    return str(self.nodes[j][2][0])

                for j, (op, _, _, at) in enumerate(self.nodes):
                    if op == "Constant":
                        arr = numpy_helper.to_array(at["value"])
                        if arr.dtype.kind not in "iu":
                            self.small[n_out(j)] = [float(v) for v in arr.reshape(-1)] if arr.size <= 8 else []
                            self.tensors[f"c{j}"] = torch.nn.Parameter(torch.from_numpy(arr.copy()),
                                                                       requires_grad=False)
                self.input_name = graph.input[0].name
                self.output_name = graph.output[0].name

            def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: C901 (one branch per op)
                env: dict[str, Any] = {self.input_name: images}
                for name, key in self.names.items():
                    env[name] = self.ints[name] if name in self.ints else self.tensors[key]
                for j, (op, ins, outs, at) in enumerate(self.nodes):
                    x: list[Any] = [env[i] if i else None for i in ins]
                    if op == "Constant":
                        arr = numpy_helper.to_array(at["value"])
                        r: Any = ([int(v) for v in arr.reshape(-1)] if arr.ndim else int(arr)) \
                            if arr.dtype.kind in "iu" else self.tensors[f"c{j}"]
                    elif op == "Conv":
                        k = x[1].ndim - 2
                        p = at.get("pads", [0] * (2 * k))
                        if p[:k] != p[k : 2 * k]:
                            raise OnnxOpError(f"asymmetric Conv pads {p}")
                        conv = F.conv2d if k == 2 else F.conv1d
                        r = conv(x[0], x[1], x[2] if len(x) > 2 else None, stride=at.get("strides", [1] * k),
                                 padding=p[:k], dilation=at.get("dilations", [1] * k), groups=at.get("group", 1))
                    elif op == "Sigmoid":
                        r = torch.sigmoid(x[0])
                    elif op == "Relu":
                        r = torch.relu(x[0])
                    elif op in ("Mul", "Add", "Sub", "Div"):
                        r = _arith(op, x[0], x[1])
                    elif op == "Concat":
                        ax = at["axis"]
                        if all(isinstance(v, list | int | torch.SymInt) for v in x):
                            r = [i for v in x for i in (v if isinstance(v, list) else [v])]
                        else:
                            r = torch.cat([v for v in x if not (isinstance(v, list) and not v)], dim=ax)
                    elif op == "Shape":
                        r = list(x[0].shape)
                    elif op == "Gather":
                        idx = x[1]
                        if not isinstance(x[0], list) or at.get("axis", 0) != 0:
                            raise OnnxOpError("Gather only on shapes")
                        r = [x[0][i] for i in idx] if isinstance(idx, list) else x[0][idx]
                    elif op == "Unsqueeze":
                        if isinstance(x[0], int | torch.SymInt):
                            r = [x[0]]
                        else:
                            r = x[0]
                            for a in sorted(x[1]):
                                r = r.unsqueeze(a)
                    elif op == "Squeeze":
                        r = x[0].squeeze(tuple(x[1])) if len(x) > 1 and x[1] is not None else x[0].squeeze()
                    elif op == "Slice":
                        r = _slice(x)
                    elif op == "Reshape":
                        shape = [(x[0].shape[i] if s == 0 else s) for i, s in enumerate(x[1])]
                        r = x[0].reshape(shape)
                    elif op == "Flatten":
                        r = x[0].flatten(at.get("axis", 1))
                    elif op == "Expand":
                        r = x[0].expand(*torch.broadcast_shapes(tuple(x[0].shape), tuple(x[1])))
                    elif op == "MaxPool":
                        p = at.get("pads", [0, 0, 0, 0])
                        r = F.max_pool2d(x[0], at["kernel_shape"], at.get("strides", [1, 1]), p[:2],
                                         ceil_mode=bool(at.get("ceil_mode", 0)))
                    elif op == "AveragePool":
                        if any(at.get("pads", [0])) or at.get("ceil_mode", 0):
                            raise OnnxOpError("AveragePool: no padding, floor mode only")
                        r = F.avg_pool2d(x[0], at["kernel_shape"], at.get("strides", at["kernel_shape"]))
                    elif op == "ReduceMean":
                        axes: Any = x[1] if len(x) > 1 and x[1] is not None else at.get("axes")
                        r = x[0].mean(dim=tuple(axes), keepdim=bool(at.get("keepdims", 1)))
                    elif op == "Resize":
                        sc = self.small.get(ins[2], []) if len(ins) > 2 else []
                        if at.get("mode", b"nearest") != b"nearest" or len(sc) != 4:
                            raise OnnxOpError("Resize: nearest with constant scales only")
                        r = F.interpolate(x[0], scale_factor=sc[2:], mode="nearest")
                    elif op == "Transpose":
                        r = x[0].permute(*at["perm"])
                    elif op == "Softmax":
                        r = torch.softmax(x[0], dim=at.get("axis", -1))
                    elif op == "MatMul":
                        r = torch.matmul(x[0], x[1])
                    elif op == "Split":
                        sizes: Any = x[1] if len(x) > 1 and x[1] is not None else at.get("split")
                        r = torch.split(x[0], sizes, dim=at.get("axis", 0))
                    else:  # Identity
                        r = x[0]
                    if isinstance(r, tuple):
                        for o, v in zip(outs, r, strict=True):
                            env[o] = v
                    else:
                        env[outs[0]] = r
                out: torch.Tensor = env[self.output_name]
                return out

        def _arith(op: str, a: Any, b: Any) -> Any:
            if isinstance(a, list | int | torch.SymInt) and isinstance(b, list | int | torch.SymInt):
                la, lb = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
                n = max(len(la), len(lb))
                la, lb = (la * n if len(la) == 1 else la), (lb * n if len(lb) == 1 else lb)
                f = {"Mul": lambda p, q: p * q, "Add": lambda p, q: p + q, "Sub": lambda p, q: p - q,
                     "Div": lambda p, q: p // q}[op]
                res = [f(p, q) for p, q in zip(la, lb, strict=True)]
                return res if isinstance(a, list) or isinstance(b, list) else res[0]
            if op == "Mul":
                return a * b
            if op == "Add":
                return a + b
            if op == "Sub":
                return a - b
            return a / b

        def _slice(x: list[Any]) -> Any:
            data, starts, ends = x[0], x[1], x[2]
            axes = x[3] if len(x) > 3 and x[3] is not None else list(range(len(starts)))
            steps = x[4] if len(x) > 4 and x[4] is not None else [1] * len(starts)
            idx: list[Any] = [slice(None)] * data.ndim
            for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
                idx[a] = slice(s, min(e, 1 << 62), st)
            return data[tuple(idx)]

        return _Net().eval()


def build_pt2(onnx_path: Path, out_dir: Path, *, check_batch: int = 2, atol: float = 1e-3) -> Path:
    """Write ``out_dir/NAME.pt2`` (and copy ``NAME.onnx`` and ``NAME.json`` beside it), checked against ONNX Runtime.

    Args:
        onnx_path: the ONNX model; its card ``NAME.json`` beside it.
        out_dir: where to write.
        check_batch: frames of random input the program and ONNX Runtime must agree on (CPU, float32).
        atol: largest absolute difference allowed, relative to the output's largest magnitude.

    Returns:
        The ``.onnx`` path in ``out_dir`` (``CudaEngine`` finds the ``.pt2`` beside it).

    Raises:
        OnnxOpError: an op the interpreter does not implement.
        RuntimeError: the program disagrees with ONNX Runtime.
    """
    import shutil

    import onnxruntime as ort
    import torch

    from engines.cuda_backend import save_exported_program
    from streamdet.card import load_card

    out_dir.mkdir(parents=True, exist_ok=True)
    card = load_card(onnx_path.with_suffix(".json"))
    dst = out_dir / onnx_path.name
    shutil.copyfile(onnx_path, dst)
    shutil.copyfile(onnx_path.with_suffix(".json"), dst.with_suffix(".json"))
    net = OnnxModule.build(onnx_path)
    save_exported_program(net, dst.with_suffix(".pt2"), input_wh=card.input_wh)
    w, h = card.input_wh
    x = np.random.default_rng(0).random((check_batch, 3, h, w), dtype=np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    program = torch.export.load(str(dst.with_suffix(".pt2"))).module()
    with torch.inference_mode():
        got = program(torch.from_numpy(x)).numpy()
    err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
    if got.shape != ref.shape or not err <= atol:
        raise RuntimeError(f"{dst.with_suffix('.pt2')}: differs from ONNX Runtime (shape {got.shape} vs "
                           f"{ref.shape}, relative error {err:.2e})")
    return dst
