"""The plate scene: vehicles carrying license plates over real video frames, and plate crops.

Two kinds of samples, both pure functions of ``(seed, index)``:

- :func:`make_plate_sample`: a 1280x720 frame of a background clip (:func:`training.synth.background`)
  with 0 to 4 vehicles (car- or motorbike-like bodies), each carrying a plate
  (:mod:`training.plates_render`: 4 to 8 characters of :data:`CHAR_NAMES`, several Hershey fonts,
  moderate perspective, 16 to 120 px high, defocus blur), some partly hidden by a pole or another
  vehicle or cut by the frame edge (``ignore`` when less than half of it is visible), sensor noise.
  Ground truth for the plate detector (class 0 ``plate``) plus each plate's text and each
  character's box, class and mask (:class:`PlateSample`).
- :func:`make_char_crop_sample`: what the cascade's secondary model sees. A plate is rendered on a
  vehicle over a background patch the way it appears in frames (blur, noise, then an x264 or JPEG
  round trip), the crop is cut around the plate box jittered by up to :data:`CROP_JITTER` of its
  size on each edge (a detector's error) and widened by :data:`CROP_PAD` of its size on each side
  (the pipeline's padding), and letterboxed into the model input exactly as
  :func:`streamdet.letterbox.letterbox` does (pad 114). Boxes and masks are the characters', in
  the letterboxed crop's pixels (:class:`CharCropSample`).
"""

from __future__ import annotations

from training.plates_crops import (
    CHAR_INPUT_WH,
    CROP_JITTER,
    CROP_PAD,
    CharCropDataset,
    CharCropSample,
    crop_box_xyxy,
    make_char_crop_sample,
)
from training.plates_render import CHAR_NAMES
from training.plates_scene import (
    IGNORE_VISIBLE_FRACTION,
    MAX_PLATE_PX,
    MIN_PLATE_PX,
    PLATE_NAMES,
    PlateDataset,
    PlateSample,
    Vehicle,
    compose_vehicles,
    make_plate_sample,
    random_vehicle,
)
from training.synth import SyntheticDataset

__all__ = [
    "CHAR_INPUT_WH", "CHAR_NAMES", "CROP_JITTER", "CROP_PAD", "IGNORE_VISIBLE_FRACTION", "MAX_PLATE_PX",
    "MIN_PLATE_PX", "PLATE_NAMES", "SCENES", "CharCropDataset", "CharCropSample", "PlateDataset", "PlateSample",
    "Vehicle", "compose_vehicles", "crop_box_xyxy", "make_char_crop_sample", "make_plate_sample", "random_vehicle",
    "scene_class_names", "scene_dataset",
]

SCENES: tuple[str, ...] = ("shapes", "plates", "plate_chars")
"""Training scenes: the shapes of :mod:`training.synth`, plate-scene frames (plate detector),
letterboxed plate crops (character segmenter)."""


def scene_class_names(scene: str) -> tuple[str, ...]:
    """Class names of a scene's models.

    Raises:
        ValueError: on an unknown scene.
    """
    if scene == "shapes":
        from training.synth import CLASS_NAMES

        return CLASS_NAMES
    if scene == "plates":
        return PLATE_NAMES
    if scene == "plate_chars":
        return CHAR_NAMES
    raise ValueError(f"expected a scene of {SCENES}, got {scene!r}")


def scene_dataset(scene: str, *, seed: int, num_images: int,
                  input_wh: tuple[int, int] = CHAR_INPUT_WH) -> SyntheticDataset | PlateDataset | CharCropDataset:
    """A scene's training dataset (for ``plate_chars`` the crops are letterboxed into ``input_wh``).

    Raises:
        ValueError: on an unknown scene.
    """
    if scene == "shapes":
        return SyntheticDataset(seed=seed, num_images=num_images)
    if scene == "plates":
        return PlateDataset(seed=seed, num_images=num_images, with_chars=False)
    if scene == "plate_chars":
        return CharCropDataset(seed=seed, num_images=num_images, input_wh=input_wh)
    raise ValueError(f"expected a scene of {SCENES}, got {scene!r}")
