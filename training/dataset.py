"""Write and read synthetic datasets on disk in COCO format.

Layout of a dataset directory::

    DIR/images/000000.png      RGB frames (lossless PNG)
    DIR/semantic/000000.png    uint8 class maps (0 background, k + 1 class k)
    DIR/annotations.json       COCO: images, annotations (bbox xywh, RLE segmentation), categories

COCO category ids are class id + 1 (COCO reserves 0). CLI::

    python -m training.dataset --out DIR --images N --seed S [--scene shapes|plates|plate_chars] [--input WxH]

``--scene plates`` writes plate-scene frames (category ``plate``; each plate annotation carries its
``"text"``); ``--scene plate_chars`` writes letterboxed plate crops (``--input``, default 384x96;
categories = the characters of :data:`training.plates.CHAR_NAMES`; each image record carries the
plate's ``"text"`` and its height in the frame, ``"plate_h_px"``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from streamdet.cli import OneLineErrorParser, positive_int, run_tool
from streamdet.masks import encode_rle
from training.cli_common import cannot_write, command_line, seed_int, wh_type
from training.synth import CLASS_NAMES, Sample, SyntheticDataset

__all__ = ["CocoDataset", "DatasetError", "categories", "coco_document", "encode_rle", "load_coco_dataset", "main",
           "sample_annotations", "write_dataset"]


class DatasetError(ValueError):
    """A dataset directory or annotation file is missing or malformed; the message names the file."""


def categories(names: Sequence[str] = CLASS_NAMES, supercategory: str = "shape") -> list[dict[str, Any]]:
    """COCO categories for ``names`` (default :data:`CLASS_NAMES`; id = class id + 1)."""
    return [{"id": i + 1, "name": n, "supercategory": supercategory} for i, n in enumerate(names)]


def sample_annotations(sample: Sample, image_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """COCO annotations of one sample.

    Args:
        sample: the sample.
        image_id: its COCO image id.
        first_ann_id: id of its first annotation.

    Returns:
        COCO annotation dicts (bbox xywh in frame pixels, RLE segmentation, ``iscrowd`` = ignore flag).
    """
    anns = []
    for k in range(sample.boxes_xyxy.shape[0]):
        x1, y1, x2, y2 = (float(v) for v in sample.boxes_xyxy[k])
        anns.append({
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": int(sample.class_ids[k]) + 1,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(sample.masks[k].sum()),
            "segmentation": encode_rle(sample.masks[k]),
            "iscrowd": int(sample.ignore[k]),
        })
    return anns


def coco_document(images: list[dict[str, Any]], annotations: list[dict[str, Any]],
                  info: dict[str, Any], cats: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Assemble a COCO ground-truth document (``cats`` default: the shapes' :func:`categories`)."""
    return {"info": info, "images": images, "annotations": annotations,
            "categories": categories() if cats is None else cats}


def write_dataset(out: Path, *, num_images: int, seed: int, show_progress: bool = True,
                  command: str = "", scene: str = "shapes", input_wh: tuple[int, int] | None = None,
                  workers: int | None = None) -> Path:
    """Generate a dataset directory (atomically: built in a temporary directory, then renamed).

    Args:
        out: destination directory; must not exist or be empty.
        num_images: number of images.
        seed: dataset seed.
        show_progress: show a progress bar.
        command: the command line, recorded in the annotation ``info``.
        scene: ``shapes``, ``plates`` or ``plate_chars`` (see the module docstring).
        input_wh: the crops' size for ``plate_chars`` (default 384x96).
        workers: processes rendering the images (None: one per core for at least
            :data:`PARALLEL_MIN_IMAGES` images, else 1; 1: in this process). Every image depends
            only on ``(seed, index)``, so the files are the same for any count.

    Returns:
        ``out``.

    Raises:
        DatasetError: if ``out`` exists and is not an empty directory.
        OSError: if it cannot be written.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: output exists and is not an empty directory")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "semantic").mkdir()
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        job = _RenderJob(tmp=tmp, scene=scene, seed=seed, num_images=num_images, input_wh=input_wh)
        chunks = [range(a, min(a + RENDER_CHUNK, num_images)) for a in range(0, num_images, RENDER_CHUNK)]
        if workers is None:  # starting the processes costs about 2 s: worth it for large sets only
            workers = (os.cpu_count() or 1) if num_images >= PARALLEL_MIN_IMAGES else 1
        procs = min(workers, len(chunks))
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(tqdm(total=num_images, desc="dataset", disable=not show_progress,
                                           file=sys.stderr))
            if procs > 1:  # every sample depends only on (seed, index): rendered in any order, merged in order
                pool = stack.enter_context(ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")))
                rendered: Iterable[list[_Rendered]] = pool.map(job, chunks)
            else:
                rendered = map(job, chunks)
            for chunk in rendered:
                for r in chunk:
                    images.append(r.image)
                    offset = len(anns)  # annotation ids run on over the whole dataset
                    for a in r.annotations:
                        a["id"] += offset
                    anns.extend(r.annotations)
                    bar.update(1)
        info = {"seed": seed, "num_images": num_images, "command": command,
                "generator": "training.synth" if scene == "shapes" else "training.plates"}
        if scene != "shapes":
            info["scene"] = scene
        doc = coco_document(images, anns, info, _scene_categories(scene))
        (tmp / "annotations.json").write_text(json.dumps(doc))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


RENDER_CHUNK = 16
"""Images rendered per task when :func:`write_dataset` renders in several processes."""

PARALLEL_MIN_IMAGES = 128
"""``write_dataset(workers=None)`` renders in one process per core from this many images on."""


@dataclass(frozen=True)
class _Rendered:
    """One rendered image: its COCO ``images`` entry and annotations (ids from 1 within the image)."""

    image: dict[str, Any]
    annotations: list[dict[str, Any]]


@dataclass(frozen=True)
class _RenderJob:
    """Renders and writes a range of a dataset's images (picklable: run in worker processes)."""

    tmp: Path
    scene: str
    seed: int
    num_images: int
    input_wh: tuple[int, int] | None

    def __call__(self, indices: range) -> list[_Rendered]:
        ds = _scene_dataset(self.scene, self.seed, self.num_images, self.input_wh)
        out = []
        for i in indices:
            s = ds[i]
            name = f"{i:06d}.png"
            cv2.imwrite(str(self.tmp / "images" / name), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(self.tmp / "semantic" / name), s.semantic)
            h, w = s.image.shape[:2]
            anns = sample_annotations(s, i, 1)
            for k, text in enumerate(getattr(s, "texts", ())):  # plate scene: each plate's text
                anns[k]["text"] = text
            out.append(_Rendered({"id": i, "file_name": name, "width": w, "height": h, **_image_extra(s)}, anns))
        return out


@functools.lru_cache(maxsize=4)
def _scene_dataset(scene: str, seed: int, num_images: int, input_wh: tuple[int, int] | None) -> Any:
    if scene == "shapes":
        return SyntheticDataset(seed=seed, num_images=num_images)
    from training.plates import CHAR_INPUT_WH, CharCropDataset, PlateDataset

    if scene == "plates":
        return PlateDataset(seed=seed, num_images=num_images, with_chars=False)
    if scene == "plate_chars":
        return CharCropDataset(seed=seed, num_images=num_images, input_wh=input_wh or CHAR_INPUT_WH)
    raise DatasetError(f"--scene: expected shapes, plates or plate_chars, got {scene!r}")


def _scene_categories(scene: str) -> list[dict[str, Any]] | None:
    if scene == "shapes":
        return None
    from training.plates import scene_class_names

    return categories(scene_class_names(scene), "plate" if scene == "plates" else "character")


def _image_extra(sample: Sample) -> dict[str, Any]:
    """Image-record fields of a plate crop: its ``text`` and ``plate_h_px`` (nothing for other samples)."""
    text = getattr(sample, "text", None)
    if text is None:
        return {}
    return {"text": text, "plate_h_px": round(float(getattr(sample, "plate_h_px", 0.0)), 2)}


@dataclass(frozen=True)
class CocoDataset:
    """A dataset directory, validated.

    Attributes:
        root: the directory.
        coco: the parsed ``annotations.json``.
        class_names: category names ordered by category id.
    """

    root: Path
    coco: dict[str, Any]
    class_names: tuple[str, ...]

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in file order."""
        return [int(im["id"]) for im in self.coco["images"]]

    def image_path(self, image: dict[str, Any]) -> Path:
        """Path of an image entry's file."""
        return self.root / "images" / str(image["file_name"])

    def semantic_path(self, image: dict[str, Any]) -> Path:
        """Path of an image entry's semantic map."""
        return self.root / "semantic" / str(image["file_name"])

    def read_image_rgb(self, image: dict[str, Any]) -> npt.NDArray[np.uint8]:
        """Read an image as ``(H, W, 3)`` uint8 RGB.

        Raises:
            DatasetError: if the file is missing or not an image.
        """
        p = self.image_path(image)
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"{p}: missing or not an image")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def read_semantic(self, image: dict[str, Any]) -> npt.NDArray[np.uint8]:
        """Read an image's semantic map as ``(H, W)`` uint8.

        Raises:
            DatasetError: if the file is missing or not an image.
        """
        p = self.semantic_path(image)
        m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if m is None or m.ndim != 2:
            raise DatasetError(f"{p}: missing or not a single-channel class map")
        return m


def load_coco_dataset(root: str | os.PathLike[str]) -> CocoDataset:
    """Open and validate a dataset directory.

    Args:
        root: the directory holding ``annotations.json`` and ``images/``.

    Returns:
        The :class:`CocoDataset`.

    Raises:
        DatasetError: if the directory or annotation file is missing or malformed (the message
            names the file and the problem).
    """
    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"{r}: dataset directory not found")
    ann = r / "annotations.json"
    try:
        coco = json.loads(ann.read_text())
    except FileNotFoundError as e:
        raise DatasetError(f"{ann}: annotation file not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{ann}: not valid JSON ({e})") from e
    if not isinstance(coco, dict):
        raise DatasetError(f"{ann}: expected a COCO object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"{ann}: expected a list under '{key}'")
    cat_ids = set()
    for c in coco["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{ann}: malformed category {str(c)[:80]}")
        cat_ids.add(c["id"])
    img_ids = set()
    for im in coco["images"]:
        if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "width", "height")):
            raise DatasetError(f"{ann}: malformed image entry {str(im)[:80]}")
        img_ids.add(im["id"])
    for a in coco["annotations"]:
        if not isinstance(a, dict) or not all(k in a for k in ("image_id", "category_id", "bbox")):
            raise DatasetError(f"{ann}: malformed annotation {str(a)[:80]}")
        if a["image_id"] not in img_ids:
            raise DatasetError(f"{ann}: annotation {a.get('id')} refers to unknown image {a['image_id']}")
        if a["category_id"] not in cat_ids:
            raise DatasetError(f"{ann}: annotation {a.get('id')} has unknown category {a['category_id']}")
        b = a["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and b[2] >= 0 and b[3] >= 0):
            raise DatasetError(f"{ann}: annotation {a.get('id')} has malformed bbox {b}")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    return CocoDataset(root=r, coco=coco, class_names=tuple(c["name"] for c in cats))


def main(argv: Iterable[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    ap = OneLineErrorParser(prog="python -m training.dataset", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    ap.add_argument("--images", required=True, type=positive_int, help="number of images")
    ap.add_argument("--seed", type=seed_int, default=0, help="dataset seed (0..2^32-1)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--scene", choices=("shapes", "plates", "plate_chars"), default="shapes",
                    help="shapes, plate-scene frames, or letterboxed plate crops")
    ap.add_argument("--input", type=wh_type(32), default=None,
                    help="plate_chars: crop (model input) size WIDTHxHEIGHT (default 384x96)")
    argv = list(sys.argv[1:] if argv is None else argv)

    def run(args: argparse.Namespace) -> None:
        with cannot_write(args.out, DatasetError):
            write_dataset(args.out, num_images=args.images, seed=args.seed, show_progress=not args.quiet,
                          command=command_line("training.dataset", argv, quote=False), scene=args.scene,
                          input_wh=args.input)
        print(f"wrote {args.images} images to {args.out}")

    return run_tool(ap, run, argv, errors=(DatasetError,))


if __name__ == "__main__":
    raise SystemExit(main())
