"""The pipeline's own CPU per frame: the same run with an engine that does no work.

    python bench/overhead_bench.py --video PATH [--model MODEL.onnx] [--frames N] [--rounds R]

``pipeline_bench.py`` compares the pipeline with the engine alone; on a 2-core machine their ratio
drifts by several hundredths between runs, more than most changes to the light stages move it.
This benchmark measures those stages directly. It builds a constant stand-in of the model (same
inputs and outputs; each output is the real model's output on one letterboxed frame of the
video, whatever the input, so that postprocess finds and publishes the detections it would find)
and runs the pipeline on it with the same settings, the video looped to ``--frames`` frames
(default 2000). The engine stage then costs only its own Python and messaging (and a few
microseconds of ONNX Runtime per frame), so the CPU the stage processes and the runner take per
frame (from ``/proc``, start-up left out, as ``pipeline_bench.py --profile``) is the pipeline's
overhead, to a few hundredths of a millisecond between runs.

It also runs the real model alone (``pipeline_bench.py``'s (c): pre-letterboxed frames, the
pipeline's batch, concurrent runs and threads) and takes its CPU time per frame, E. With the
overhead O, ``E / (E + O)`` bounds ``pipeline_vs_engine_only`` when the cores are fully used by
both and the light stages do not slow the engine down (in the pipeline they do, somewhat: they
share its caches and preempt its threads).

The medians over ``--rounds`` (default 3) are on the last line:
``overhead_ms_per_frame=X.XX engine_ms_per_frame=Y.YY bound_vs_engine_only=Z.ZZ``.

Models whose spatial input size is dynamic (rectangular inference) are refused: the stand-in's
outputs have one fixed size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pipeline_bench import ROOT, StageProfile, bench_engine_only, bench_pipeline, load_frames


def constant_model(model: Path, card: Any, frame_rgb: np.ndarray, out_dir: Path) -> Path:
    """Write ``out_dir/constant.onnx`` and its card: ``model``'s input, its outputs on ``frame_rgb`` as constants.

    Each output is ``Add(Mul(Reshape(Slice(input)), 0), constant)``, so it follows the input's
    batch size (dynamic batch) and costs a few microseconds; its other dimensions are those of
    the real output. The model's metadata is kept (ultralytics models without a card).

    Raises:
        ValueError: if the model's spatial input size is dynamic.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.stages.model_check import inspect_onnx
    from streamdet.card import save_card
    from streamdet.preprocess_ops import preprocess_batch

    info = inspect_onnx(model)  # (the pipeline's own check: one image input)
    if len(info.input_shape) != 4 or not all(isinstance(d, int) for d in info.input_shape[1:]):
        raise ValueError(f"{model}: expected a fixed (C, H, W) input size, got {info.input_shape}")
    in_name = info.input_name
    src = onnx.load(str(model))
    graph_input = next(i for i in src.graph.input if i.name == in_name)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    raw = session.run(None, {in_name: preprocess_batch([frame_rgb], card)[0]})
    outputs = dict(zip(info.output_names, raw, strict=True))

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    nodes = [const("start", np.zeros(4, np.int64)), const("end", np.array([2**62, 1, 1, 1], np.int64)),
             helper.make_node("Slice", [in_name, "start", "end"], ["corner"]),
             const("zero", np.array(0, np.float32))]
    initializers, graph_outputs = [], []
    for k, (name, value) in enumerate(outputs.items()):
        if value.dtype != np.float32:
            raise ValueError(f"{model}: expected float32 outputs, got {name} {value.dtype}")
        nodes += [const(f"shape{k}", np.array([-1] + [1] * (value.ndim - 1), np.int64)),
                  helper.make_node("Reshape", ["corner", f"shape{k}"], [f"corner{k}"]),
                  helper.make_node("Mul", [f"corner{k}", "zero"], [f"nothing{k}"]),
                  helper.make_node("Add", [f"nothing{k}", f"value{k}"], [name])]
        initializers.append(numpy_helper.from_array(value[:1], f"value{k}"))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *value.shape[1:]]))
    graph = helper.make_graph(nodes, "constant", [graph_input], graph_outputs, initializers)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out.ir_version = min(src.ir_version, 9)
    for key, value in info.metadata.items():
        out.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "constant.onnx"
    onnx.save(out, str(path))
    save_card(card, out_dir / "constant.json")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--video", required=True, help="video file")
    p.add_argument("--model", default=str(ROOT / "engines" / "models" / "detector.onnx"), help="ONNX model")
    p.add_argument("--frames", type=int, default=2000,
                   help="frames through the pipeline per round, the video looped (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the figures are medians (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a pipeline setting for both runs, as run_pipeline.py --set (repeatable)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.frames < 100:
        p.error(f"expected --rounds >= 1 and --frames >= 100, got {args.rounds} and {args.frames}")

    from pipeline.cli import sets_tree
    from pipeline.runner import Pipeline, PipelineError
    from pipeline.settings import load_settings, set_dotted

    try:
        over = sets_tree(args.set)
        for key, value in {"sources": [args.video], "model": args.model, "max_frames": args.frames, "quiet": True,
                           "sinks.publish": None, "decode.loop": 1_000_000}.items():
            set_dotted(over, key, value)
        settings = load_settings(overrides=over)
        probe = Pipeline(settings=settings)
        probe.prepare()
    except (PipelineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    card, chain = probe.card, probe.chains[0]
    batch, concurrent, threads = chain.max_batch, chain.concurrent_batches, chain.intra_op_threads
    frames = load_frames(args.video, 250)
    print(f"model={Path(args.model).name} input={card.input_wh[0]}x{card.input_wh[1]} video={Path(args.video).name} "
          f"frame={frames[0].shape[1]}x{frames[0].shape[0]} frames={args.frames} batch={batch} "
          f"concurrent_batches={concurrent}")
    overheads: list[float] = []
    engines: list[float] = []
    with tempfile.TemporaryDirectory(prefix="overhead-bench-") as tmp:
        try:
            stand_in = constant_model(Path(args.model), card, frames[len(frames) // 2], Path(tmp))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        constant = settings.model_copy(update={"model": stand_in, "card": None})
        for r in range(args.rounds):
            profile = StageProfile()
            fps, _ = bench_pipeline(constant, profile)
            lines = profile.lines()
            if profile.frames1 - profile.frames0 <= 0:
                print(f"error: too few profile samples at {fps:.0f} fps: a longer run (--frames)", file=sys.stderr)
                return 1
            overhead = 1000 * profile.total_cpu_s() / (profile.frames1 - profile.frames0)
            cpu: list[float] = []
            t0 = time.perf_counter()
            engine_fps = bench_engine_only(Path(args.model), card, frames, batch, threads, concurrent, cpu=cpu)
            engine = 1000 * cpu[0] / len(frames)
            overheads.append(overhead)
            engines.append(engine)
            print(f"round {r + 1} of {args.rounds}: pipeline on the constant model {fps:.0f} fps, "
                  f"{overhead:.2f} ms CPU/frame; the real model alone {engine_fps:.1f} fps, {engine:.2f} ms CPU/frame "
                  f"({time.perf_counter() - t0:.0f} s)")
            for line in lines:
                print("  " + line)
    o, eng = statistics.median(overheads), statistics.median(engines)
    print(f"overhead_ms_per_frame={o:.2f} engine_ms_per_frame={eng:.2f} bound_vs_engine_only={eng / (eng + o):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
