"""Calibration frames: probe video / image-directory sources, pick evenly spaced frames, feed them preprocessed.

Frames go through the runtime's own preprocess (:func:`streamdet.preprocess_ops.preprocess_batch`),
so the INT8 calibration sees exactly what the engine will see.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.deploy.options import CalibrationError
from streamdet.card import ModelCard
from streamdet.orientation import upright
from streamdet.preprocess_ops import preprocess_batch

__all__ = [
    "DEFAULT_FRAMES",
    "IMAGE_SUFFIXES",
    "FrameCalibrationReader",
    "FrameSource",
    "as_ort_reader",
    "calibration_frames",
    "evenly_spaced",
    "probe_source",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
"""Files of an image-directory source (case-insensitive)."""

DEFAULT_FRAMES = 64
"""Default number of calibration frames (ONNX Runtime's and TensorRT's docs suggest a few hundred
for final models; 64 keeps a CPU calibration of the bundled detector under a minute)."""


@dataclass(frozen=True, slots=True)
class FrameSource:
    """One calibration source and how many frames it has.

    Attributes:
        path: a video file or a directory of images.
        is_video: whether ``path`` is decoded as a video.
        num_frames: frames in the source (> 0).
        image_files: the image files of a directory source, sorted (empty for videos).
    """

    path: Path
    is_video: bool
    num_frames: int
    image_files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.num_frames <= 0:
            raise ValueError(f"expected num_frames > 0, got {self.num_frames}")


def _image_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files and (directory / "images").is_dir():  # a dataset directory (training.dataset layout)
        files = sorted(p for p in (directory / "images").iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files


def _count_video_frames(path: Path) -> int:
    """Frames of the first video stream (the container's count, else the demuxed packets)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CalibrationError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if stream.frames and stream.frames > 0:
                return int(stream.frames)
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except CalibrationError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable video ({type(e).__name__}: {str(e)[:120]})") from e


def probe_source(path: str | os.PathLike[str]) -> FrameSource:
    """Tell what a calibration source is and how many frames it holds.

    Args:
        path: a video file (anything FFmpeg decodes) or a directory of images (``.png``, ``.jpg``, ...;
            a dataset directory with an ``images/`` subdirectory works too).

    Returns:
        The :class:`FrameSource`.

    Raises:
        CalibrationError: if the path is missing, an empty directory, or not a readable video.
    """
    p = Path(path)
    if p.is_dir():
        files = _image_files(p)
        if not files:
            raise CalibrationError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the directory")
        return FrameSource(p, False, len(files), tuple(files))
    if not p.is_file():
        raise CalibrationError(f"{p}: calibration source not found")
    n = _count_video_frames(p)
    if n <= 0:
        raise CalibrationError(f"{p}: the video has no frames")
    return FrameSource(p, True, n)


def evenly_spaced(total: int, count: int) -> npt.NDArray[np.int64]:
    """``min(count, total)`` distinct indices in ``[0, total)``, evenly spaced, first and last included.

    Args:
        total: number of items (> 0).
        count: wanted indices (> 0).

    Returns:
        Ascending int64 indices.

    Raises:
        ValueError: on non-positive arguments.
    """
    if total <= 0 or count <= 0:
        raise ValueError(f"expected positive total and count, got {total} and {count}")
    if count >= total:
        return np.arange(total, dtype=np.int64)
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    return np.unique(np.rint(np.linspace(0, total - 1, count)).astype(np.int64))


def _read_image_rgb(path: Path) -> npt.NDArray[np.uint8]:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise CalibrationError(f"{path}: not a readable image")
    return np.ascontiguousarray(img[:, :, ::-1])


def _video_frames_at(path: Path, indices: Sequence[int]) -> Iterator[npt.NDArray[np.uint8]]:
    """Decode a video sequentially and yield the RGB frames at ``indices`` (ascending)."""
    import av

    wanted = deque(int(i) for i in indices)
    if not wanted:
        return
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i == wanted[0]:
                    rgb = upright(frame.to_ndarray(format="rgb24"), frame.rotation)  # as the pipeline sees it
                    yield np.ascontiguousarray(rgb, dtype=np.uint8)
                    wanted.popleft()
                    if not wanted:
                        return
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise CalibrationError(f"{path}: decoding failed ({type(e).__name__}: {str(e)[:120]})") from e


def calibration_frames(sources: Sequence[FrameSource], num_frames: int) -> Iterator[npt.NDArray[np.uint8]]:
    """Yield ``num_frames`` RGB frames evenly spaced over the concatenation of ``sources``.

    Frames are decoded lazily (only one is held at a time). A video that turns out shorter than
    its declared frame count yields fewer frames.

    Args:
        sources: probed sources (:func:`probe_source`).
        num_frames: frames wanted (all frames if the sources have fewer).

    Yields:
        ``(H, W, 3)`` uint8 RGB frames.

    Raises:
        CalibrationError: if a frame cannot be read.
    """
    total = sum(s.num_frames for s in sources)
    picks = evenly_spaced(total, num_frames)
    start = 0
    for s in sources:
        local = picks[(picks >= start) & (picks < start + s.num_frames)] - start
        start += s.num_frames
        if s.is_video:
            yield from _video_frames_at(s.path, local.tolist())
        else:
            for i in local.tolist():
                yield _read_image_rgb(s.image_files[i])


class FrameCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over frames preprocessed by the runtime's preprocess.

    One frame per batch (batch size 1: ``quant_pre_process`` keeps the dynamic batch axis).
    Frames are pulled from the iterator lazily, so memory holds one frame at a time.

    Args:
        frames: RGB ``(H, W, 3)`` uint8 frames.
        card: the model card (input size, normalization, pad value).
        input_name: the model's input tensor name.
    """

    def __init__(self, *, frames: Iterator[npt.NDArray[np.uint8]], card: ModelCard, input_name: str) -> None:
        self._frames = frames
        self._card = card
        self._input_name = input_name
        self.count = 0

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        """The next input feed ``{input_name: (1, 3, H, W) float32}``, or ``None`` at the end."""
        frame = next(self._frames, None)
        if frame is None:
            return None
        batch, _ = preprocess_batch([frame], self._card)
        self.count += 1
        return {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def __iter__(self) -> Iterator[dict[str, npt.NDArray[Any]]]:
        while (feed := self.get_next()) is not None:
            yield feed


def as_ort_reader(reader: FrameCalibrationReader) -> Any:
    """Wrap the reader in a subclass of ONNX Runtime's abstract ``CalibrationDataReader``.

    Args:
        reader: the frame reader to delegate ``get_next`` to.

    Returns:
        An ``onnxruntime.quantization.CalibrationDataReader``.
    """
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
            return reader.get_next()

    return _Reader()

