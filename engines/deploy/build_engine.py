"""Build a TensorRT engine file from an ONNX model (FP32, FP16 or INT8 Q/DQ).

CLI::

    python -m training.build_engine MODEL.onnx --precision fp32|fp16|int8 --batch MIN,OPT,MAX
        --out MODEL.engine [--timing-cache FILE] [--workspace-gib 4] [--opt-level 3] [--device cuda:0]

Precision comes from the ONNX graph itself (TensorRT 10 deprecated, and TensorRT 11 removed, the
builder's FP16/INT8 flags and implicit INT8 calibration): ``--precision fp16`` takes the FP16 ONNX
and ``--precision int8`` the Q/DQ ONNX written by ``python -m training.calibrate``, and every
precision is parsed into a strongly typed network
(``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED``), so TensorRT runs each layer in the type
the graph gives it. ``--precision`` is checked against the graph before TensorRT is touched.

Steps: ``trt.OnnxParser`` (a parse failure names the failing node: ``ParserError.node()``,
``node_name()``, ``node_operator()``, ``desc()``), one optimization profile for the dynamic batch
``MIN,OPT,MAX``, the timing cache loaded from and saved back to ``--timing-cache`` (it makes
rebuilds on the same GPU fast), ``build_serialized_network``. The output is a streamdet engine
file (:mod:`engines.engine_file`: a JSON header with the TensorRT version, GPU, compute
capability, precision, ONNX SHA-256 and input size, then the plan), written to a temporary name
and renamed.

Without TensorRT (or without a CUDA GPU) it prints one error line (``--backend tensorrt needs
TensorRT ...``) and exits 1; bad input likewise prints ``error: <path>: <problem>``.

Reference: NVIDIA TensorRT developer guide (Python API: "Importing a Model Using the ONNX
Parser", "Building an Engine", "Optimization Profiles", "Timing Cache", "Strongly Typed Networks").
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.base import EngineError
from engines.engine_file import BatchProfile, EngineHeader, Precision, RuntimeInfo, file_sha256, write_engine_file
from streamdet.cli import OneLineErrorParser, bounded_int, enum_type, finite_float, name_os_errors, run_tool

if TYPE_CHECKING:
    import tensorrt

DEFAULT_WORKSPACE_GIB = 4.0
"""Builder workspace (scratch memory for tactics), GiB."""
MAX_WORKSPACE_GIB = 1024.0
"""The largest ``--workspace-gib``."""


class BuildError(ValueError):
    """Bad build input or a failed build; the message is ``<path>: <problem>``."""


def onnx_io(onnx_path: Path) -> tuple[str, tuple[int | str, int, int, int], tuple[str, ...], Precision]:
    """Input name and shape, output names and precision of an ONNX model (no TensorRT needed).

    Returns:
        ``(input_name, (batch, C, H, W), output_names, precision)``; ``batch`` is an ``int`` for a
        static batch or the symbolic name.

    Raises:
        BuildError: if the file is not a loadable ONNX model or its input is not ``(B, C, H, W)``
            with static ``C, H, W``.
    """
    import onnx

    from engines.deploy.graph import onnx_precision

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except FileNotFoundError as e:
        raise BuildError(f"{onnx_path}: ONNX model not found") from e
    except Exception as e:  # protobuf decode errors have several types
        raise BuildError(f"{onnx_path}: not a loadable ONNX model ({type(e).__name__})") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise BuildError(f"{onnx_path}: expected 1 input, got {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    if len(shape) != 4 or not all(isinstance(v, int) and v > 0 for v in shape[1:]):
        raise BuildError(f"{onnx_path}: expected input (B, C, H, W) with static C, H, W, got {shape}")
    outputs = tuple(o.name for o in model.graph.output)
    b = shape[0]
    batch: int | str = b if isinstance(b, int) and b > 0 else str(b)
    return inputs[0].name, (batch, int(shape[1]), int(shape[2]), int(shape[3])), outputs, Precision(
        onnx_precision(model))


def check_int8_symmetric(onnx_path: Path) -> None:
    """TensorRT's explicit quantization needs zero points of 0 (symmetric int8).

    Raises:
        BuildError: if a ``QuantizeLinear``/``DequantizeLinear`` has a non-zero or uint8 zero point
            (e.g. a ``engines.deploy.calibrate --target cpu`` model).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or not n.input[2]:
            continue
        zp = consts.get(n.input[2])
        if zp is None:
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype.kind == "u" or bool((arr != 0).any()):
            raise BuildError(f"{onnx_path}: node {n.name!r} has a {arr.dtype} zero point "
                             f"{arr.ravel()[:4].tolist()}: TensorRT needs symmetric int8 (re-run "
                             "python -m training.calibrate with --target tensorrt)")


def parser_errors(parser: tensorrt.OnnxParser, onnx_path: Path) -> str:
    """One line naming the first failing ONNX node and TensorRT's description, plus a count."""
    n = int(parser.num_errors)
    if n == 0:
        return f"{onnx_path}: TensorRT's ONNX parser failed without an error message"
    err = parser.get_error(0)
    node = err.node()
    name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    where = f"node {node}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "")
    more = f" (+{n - 1} more)" if n > 1 else ""
    return f"{onnx_path}: TensorRT cannot parse {where}: {err.desc()}{more}"


def build_engine(
    *,
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    precision: Precision,
    batch: BatchProfile,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    optimization_level: int = 3,
    device: str = "cuda",
    trt_module: Any = None,
    runtime_info: RuntimeInfo | None = None,
) -> EngineHeader:
    """Build and write a streamdet engine file (see the module docstring).

    Args:
        onnx_path: the ONNX model (FP32, FP16 or Q/DQ INT8, matching ``precision``).
        out_path: the engine file to write.
        precision: :class:`~engines.engine_file.Precision`; must match the graph.
        batch: the dynamic-batch :class:`~engines.engine_file.BatchProfile`.
        timing_cache: timing cache file to load (if it exists) and save.
        workspace_gib: builder workspace limit, GiB.
        optimization_level: builder optimization level (0..5; TensorRT's default is 3).
        device: CUDA device whose name and compute capability go into the header.
        trt_module: the ``tensorrt`` module (tests pass a stand-in; default: import it).
        runtime_info: runtime description for the header (tests; default: from TensorRT and torch.cuda).

    Returns:
        The written :class:`~engines.engine_file.EngineHeader`.

    Raises:
        BuildError: bad input (precision mismatch, static batch outside the profile, asymmetric INT8)
            or a failed parse/build.
        EngineError: TensorRT or a CUDA GPU is missing.
        OSError: if the output or the timing cache cannot be written.
    """
    src = Path(onnx_path)
    out = Path(out_path)
    input_name, (b, c, h, w), output_names, found = onnx_io(src)
    if found is not precision:
        hint = {Precision.INT8: "run python -m training.calibrate MODEL.onnx --source VIDEO to make MODEL.int8.onnx",
                Precision.FP16: "run python -m training.calibrate MODEL.onnx --out-fp16 MODEL.fp16.onnx",
                Precision.FP32: "pass the FP32 ONNX"}[precision]
        raise BuildError(f"{src}: --precision {precision.value} needs a {precision.value} ONNX, this graph is "
                         f"{found.value} ({hint})")
    if precision is Precision.INT8:
        check_int8_symmetric(src)
    if isinstance(b, int) and not batch.min == batch.opt == batch.max == b:
        raise BuildError(f"{src}: the model has a static batch {b}; use --batch {b},{b},{b}")
    if not 0 <= optimization_level <= 5:
        raise BuildError(f"--opt-level: expected 0..5, got {optimization_level}")
    if not workspace_gib > 0:
        raise BuildError(f"--workspace-gib: expected > 0, got {workspace_gib}")
    if not out.parent.is_dir():
        raise BuildError(f"{out}: output directory {out.parent} does not exist")

    from engines.trt_runtime import cuda_runtime_info, import_tensorrt

    trt = trt_module if trt_module is not None else import_tensorrt()
    if runtime_info is None:
        import torch

        runtime_info = cuda_runtime_info(trt, torch.device(device))
    t0 = time.perf_counter()
    logger: tensorrt.Logger = trt.Logger(trt.Logger.WARNING)
    builder: tensorrt.Builder = trt.Builder(logger)
    network: tensorrt.INetworkDefinition = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        raise BuildError(parser_errors(parser, src))
    config: tensorrt.IBuilderConfig = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache: tensorrt.ITimingCache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        raise BuildError(f"{cache_path}: TensorRT rejected the timing cache (another TensorRT version? delete it)")
    profile: tensorrt.IOptimizationProfile = builder.create_optimization_profile()
    profile.set_shape(input_name, (batch.min, c, h, w), (batch.opt, c, h, w), (batch.max, c, h, w))
    config.add_optimization_profile(profile)
    plan: tensorrt.IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{src}: TensorRT failed to build the engine (see the TensorRT log above)")
    seconds = time.perf_counter() - t0
    header = EngineHeader(
        tensorrt_version=runtime_info.tensorrt_version, gpu_name=runtime_info.gpu_name,
        compute_capability=runtime_info.compute_capability, precision=precision, onnx_sha256=file_sha256(src),
        onnx_name=src.name, input_name=input_name, input_chw=(c, h, w), batch=batch, output_names=output_names,
        extra={"strongly_typed": True, "workspace_gib": workspace_gib, "optimization_level": optimization_level,
               "timing_cache": str(cache_path) if cache_path else None, "build_seconds": round(seconds, 2),
               "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )
    write_engine_file(out, header, memoryview(plan))
    if cache_path is not None:
        data = memoryview(config.get_timing_cache().serialize())
        tmp = cache_path.with_name(f".{cache_path.name}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, cache_path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return header


PROG = "python -m training.build_engine"
"""How users run this CLI."""


def batch_profile(text: str) -> BatchProfile:
    """An argparse ``type=`` for ``--batch MIN,OPT,MAX`` (or ``N``): a bad profile is one usage error line.

    Raises:
        argparse.ArgumentTypeError: if the text is not a valid :class:`~engines.engine_file.BatchProfile`.
    """
    try:
        return BatchProfile.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser: a bad option is one ``error:`` line naming it, exit status 2."""
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="ONNX model (FP32, or the FP16 / INT8 Q/DQ output of engines.deploy.calibrate)")
    precisions = [pr.value for pr in Precision]
    p.add_argument("--precision", type=enum_type(Precision), required=True, metavar="{" + ",".join(precisions) + "}",
                   help=f"the ONNX graph's precision (one of: {', '.join(precisions)})")
    p.add_argument("--batch", type=batch_profile, default=BatchProfile(1, 8, 32),
                   help="dynamic batch profile MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, or N (default 1,8,32)")
    p.add_argument("--out", required=True, help="engine file to write (MODEL.engine)")
    p.add_argument("--timing-cache", default=None, help="timing cache file (loaded if present, then saved)")
    p.add_argument("--workspace-gib", type=finite_float(gt=0, le=MAX_WORKSPACE_GIB), default=DEFAULT_WORKSPACE_GIB,
                   help=f"builder workspace limit, GiB (> 0, at most {MAX_WORKSPACE_GIB:g}; default "
                        f"{DEFAULT_WORKSPACE_GIB:g})")
    p.add_argument("--opt-level", type=bounded_int(ge=0, le=5), default=3, help="builder optimization level 0..5")
    p.add_argument("--device", default="cuda", help="CUDA device (cuda or cuda:N)")
    return p


def run(args: argparse.Namespace) -> None:
    """Do the work of :func:`main`: parse ``--batch``, build the engine, print one summary line.

    Args:
        args: the parsed arguments (:func:`build_parser`).

    Raises:
        BuildError: on bad input or a failed build.
        EngineError: TensorRT or a CUDA GPU is missing.
        OSError: if the output or the timing cache cannot be written.
    """
    batch: BatchProfile = args.batch  # (parsed and checked by the parser)
    with name_os_errors(args.out):
        header = build_engine(onnx_path=args.model, out_path=args.out, precision=args.precision, batch=batch,
                              timing_cache=args.timing_cache, workspace_gib=args.workspace_gib,
                              optimization_level=args.opt_level, device=args.device)
    cc = ".".join(map(str, header.compute_capability))
    print(f"wrote {args.out}: {header.precision.value} batch {batch.min},{batch.opt},{batch.max} "
          f"TensorRT {header.tensorrt_version} on {header.gpu_name} (sm {cc}) in {header.extra['build_seconds']} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI (see the module docstring).

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        0 on success, 1 on bad input or a missing TensorRT/GPU (one ``error:`` line on stderr), 2 on a
        bad argument (one ``error:`` line naming it).
    """
    return run_tool(build_parser(), run, argv, errors=(BuildError, EngineError))


if __name__ == "__main__":
    raise SystemExit(main())
