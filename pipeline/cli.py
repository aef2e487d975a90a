"""The ``streamdet`` command and ``run_pipeline.py``: run the pipeline, watch it, prepare its engines.

``streamdet run [FLAGS]`` is ``python run_pipeline.py [FLAGS]`` (with no flags: the bundled
detector on the bundled demo video, detections published on ``tcp://127.0.0.1:5556``);
``streamdet subscribe`` is ``python -m pipeline.subscribe``; ``streamdet ctl`` is the control
API's client (``python -m pipeline.ctl``); ``streamdet calibrate`` and ``streamdet build-engine``
are the deployment tools of :mod:`engines.deploy`. The training tools are ``streamdet-train``
(:mod:`training.commands`), which needs the ``train`` extra. Exit status: 0 finished, 1 failed (bad
input, model, port in use, decode error), 2 invalid settings or arguments, 130 stopped by SIGINT,
143 by SIGTERM, 129 by SIGHUP (the terminal closed).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engines.deploy.commands import BUILD_ENGINE, CALIBRATE
from pipeline import ctl, subscribe
from streamdet.cli import Command, OneLineErrorParser, Subcommand
from streamdet.constants import EXIT_SIGINT, EXIT_USAGE

if TYPE_CHECKING:
    from pipeline.cluster.driver import ClusterRun


def _settings_epilog() -> str:
    from pipeline.settings import describe_settings

    rows = describe_settings()
    width = max(len(r[0]) for r in rows)
    lines = [
        "settings (precedence: flags > environment > --config YAML > defaults; any of them via",
        "--set NAME=VALUE or its environment variable; presets in configs/*.yaml):",
    ]
    for name, default, env in rows:
        lines.append(f"  {name:<{width}}  default {default}  (env {env})")
    lines.append("")
    lines.append("exit status: 0 finished, 1 failed, 2 invalid settings/arguments, 130 SIGINT, 143 SIGTERM, "
                 "129 SIGHUP")
    return "\n".join(lines)


def build_parser(prog: str = "run_pipeline.py") -> argparse.ArgumentParser:
    """The command-line parser (every flag maps onto a setting of ``pipeline.settings.Settings``).

    Args:
        prog: the program name in usage and help (``run_pipeline.py`` or ``streamdet run``).
    """
    p = OneLineErrorParser(
        prog=prog,
        description="Streaming video detection: decode, preprocess, engine, postprocess and sinks, each in "
                    "its own process, connected by ZeroMQ. Without arguments: the bundled detector on the "
                    "bundled demo video, detections published on tcp://127.0.0.1:5556.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_epilog(),
    )
    p.add_argument("--source", action="append", metavar="PATH_OR_URL",
                   help="video file or URL (repeat for several sources) [sources]")
    p.add_argument("--model", metavar="MODEL.onnx", help="ONNX model (card MODEL.json beside it, or "
                   "ultralytics metadata inside) [model]")
    p.add_argument("--card", metavar="CARD.json", help="model card, if not beside the model [card]")
    p.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ PUB endpoint, or 'none' [sinks.publish]")
    p.add_argument("--wait-subscribers", type=int, metavar="N",
                   help="wait for N subscribers before decoding [sinks.publish_wait_subscribers]")
    p.add_argument("--jsonl", metavar="OUT.jsonl", help="also write every message to this file [sinks.jsonl]")
    p.add_argument("--video-out", metavar="OUT.mp4", help="write the annotated video [sinks.video_out]")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop each source after N frames [max_frames]")
    p.add_argument("--batch", type=int, metavar="N", help="frames per engine batch [preprocess.max_batch]")
    p.add_argument("--threads", type=int, metavar="N",
                   help="engine threads per operator, 0 = one per core [engine.intra_op_threads]")
    p.add_argument("--backend", metavar="NAME", help="onnxruntime, tensorrt or cuda [engine.backend]")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N [engine.device]")
    p.add_argument("--loop", type=int, metavar="N", help="read each file N times (soak test) [decode.loop]")
    p.add_argument("--hwaccel", metavar="NAME", help="video decoder: none (CPU) or cuda (NVDEC) [decode.hwaccel]")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on this port (off by default) [sinks.metrics_port]")
    p.add_argument("--mqtt", metavar="URL", help="also publish to this MQTT broker, mqtt://HOST:PORT or "
                   "mqtts://... (login from sinks.mqtt_username / STREAMDET_SINKS__MQTT_PASSWORD) [sinks.mqtt]")
    p.add_argument("--ray-address", metavar="ADDR", help="run over this Ray cluster: HOST:PORT of its head, or "
                   "'auto' (see docs/cluster.md) [cluster.ray_address]")
    p.add_argument("--control-port", type=int, metavar="PORT",
                   help="serve the control API and live preview page on this port (off by default; see "
                        "docs/control.md) [control.port]")
    p.add_argument("--config", metavar="X.yaml", help="YAML preset (default $STREAMDET_CONFIG)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any setting by its dotted name, e.g. --set postprocess.nms=soft_gaussian (value "
                        "parsed as YAML)")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar [quiet]")
    return p


def sets_tree(items: Sequence[str]) -> dict[str, Any]:
    """The settings tree (nested dicts) of ``--set NAME=VALUE`` items, each value parsed as YAML (else kept as text).

    Raises:
        pipeline.settings.SettingsError: on an item without ``=`` or a bad setting name.
    """
    import yaml

    from pipeline.settings import SettingsError, set_dotted

    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SettingsError(f"expected --set NAME=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key.strip(), value)
    return tree


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings tree given on the command line (nested dicts).

    Raises:
        pipeline.settings.SettingsError: on a malformed ``--set``.
    """
    from pipeline.settings import set_dotted

    tree = sets_tree(args.set)
    flags = {
        "sources": args.source, "model": args.model, "card": args.card, "sinks.publish": args.publish,
        "sinks.publish_wait_subscribers": args.wait_subscribers, "sinks.jsonl": args.jsonl,
        "sinks.video_out": args.video_out, "max_frames": args.max_frames, "preprocess.max_batch": args.batch,
        "engine.intra_op_threads": args.threads, "engine.backend": args.backend,
        "engine.device": args.device, "decode.loop": args.loop, "decode.hwaccel": args.hwaccel,
        "sinks.metrics_port": args.metrics_port, "sinks.mqtt": args.mqtt, "cluster.ray_address": args.ray_address,
        "control.port": args.control_port,
        "quiet": args.quiet,
    }
    for key, value in flags.items():
        if value is not None:
            set_dotted(tree, key, value)
    return tree


def run_main(argv: list[str] | None = None, *, prog: str = "run_pipeline.py") -> int:
    """Run the pipeline from the command line (``run_pipeline.py`` and ``streamdet run``).

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        prog: the program name in usage, help and error lines.

    Returns:
        The exit status: 0 finished, 1 failed, 2 invalid settings or arguments, 130 / 143 / 129
        stopped by SIGINT / SIGTERM / SIGHUP.
    """
    args = build_parser(prog).parse_args(argv)
    from pipeline.runner import Pipeline, PipelineError, format_summary
    from pipeline.settings import SettingsError, load_settings

    try:
        settings = load_settings(overrides=overrides_from_args(args), config_file=args.config)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    pipeline: Pipeline | ClusterRun
    if settings.cluster.ray_address is not None:
        from pipeline.cluster.driver import ClusterRun

        pipeline = ClusterRun(settings=settings)
    else:
        pipeline = Pipeline(settings=settings)
    from pipeline.restarts import stop_fork_server, to_devnull

    try:
        summary = pipeline.run()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # (Ctrl-C before the run's own stop handling is in place: while checking the inputs)
        return EXIT_SIGINT
    finally:  # the stages' CPU time then counts in this process's children (time, wait4)
        stop_fork_server()
    try:
        for line in format_summary(summary):
            print(line)
        for warn in summary.warnings:
            print(f"warning: {warn}", file=sys.stderr)
        for err in summary.errors:
            print(f"error: {err}", file=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:  # (| head, a dropped session): the run's outputs are done; its exit status stands
        with contextlib.suppress(OSError, ValueError):  # (streams without a descriptor: nothing to flush there)
            to_devnull([sys.stdout.fileno(), sys.stderr.fileno()])  # (so that the flush at exit does not fail again)
    return summary.exit_code


main = Command(
    "streamdet",
    "Streaming video detection: video files and RTSP cameras in, detections out over ZeroMQ.",
    (
        Subcommand("run", "run the pipeline (no flags: the bundled detector on the bundled demo video)",
                   lambda argv: run_main(argv, prog="streamdet run")),
        Subcommand("subscribe", "print a running pipeline's messages (python -m pipeline.subscribe)", subscribe.main),
        Subcommand("ctl", "list, add and remove sources of a running pipeline (python -m pipeline.ctl)", ctl.main),
        CALIBRATE,
        BUILD_ENGINE,
    ),
    epilog="training tools (pip install 'streamdet[train]'): streamdet-train --help",
)
"""The ``streamdet`` command (console script): ``streamdet COMMAND [ARGS...]``."""

if __name__ == "__main__":
    raise SystemExit(main())
