"""What the postprocess stage sends to the control API: preview frames and stats snapshots (``--control-port``).

Preview frames cost nothing while nobody watches: the runner writes each source's viewer count
into the ledger (:meth:`~pipeline.supervise.Ledger.preview_viewers`) and the postprocess stage
encodes a frame only when it is non-zero and the source's last preview is older than
``1 / fps``. The frame is read from its slot (already mapped for the sinks) and copied once before
drawing, so the slot goes back to its decoder right after the encode, as it would without a
viewer. Sends never block: when the runner is behind, a preview or snapshot is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import zmq

from pipeline.stages.stats import LiveStats
from pipeline.supervise import Ledger
from streamdet.messages import PreviewFrameMsg, StatsSnapshotMsg

SNAPSHOT_EVERY_S = 0.5
"""How often the stage sends its stats snapshot to the runner."""

LIVE_HWM = 8
"""High-water mark of the live socket: beyond it previews and snapshots are dropped, never queued."""


@dataclass(frozen=True, kw_only=True)
class PreviewConfig:
    """Preview encoding (from ``control.preview_*``; picklable).

    Attributes:
        fps: most preview frames per second and source.
        width: frames wider than this are scaled down to it (aspect kept), pixels.
        quality: JPEG quality, 1-100.
    """

    fps: float = 5.0
    width: int = 640
    quality: int = 75


class LiveView:
    """Preview frames and stats snapshots from the postprocess stage to the runner.

    Args:
        sock: PUSH socket connected to the runner's live endpoint.
        config: preview encoding.
        ledger: the run's ledger (viewer counts per source slot).
    """

    def __init__(self, *, sock: zmq.Socket[Any], config: PreviewConfig, ledger: Ledger | None) -> None:
        self.sock = sock
        self.config = config
        self.ledger = ledger
        self._next: dict[str, float] = {}
        self._next_snapshot = 0.0
        self.sent = 0
        self.dropped = 0

    def wants(self, source_id: str, ledger_index: int) -> bool:
        """Whether a preview of this source's current frame is due (someone watches, rate cap)."""
        if self.ledger is None or ledger_index < 0 or self.ledger.preview_viewers(ledger_index) <= 0:
            return False
        return time.monotonic() >= self._next.get(source_id, 0.0)

    def frame(self, source_id: str, frame_index: int, image_rgb: npt.NDArray[np.uint8], detections: Any,
              class_names: Sequence[str], children: Any = None) -> None:
        """Annotate a copy of the frame, scale it down, encode it as JPEG and send it (dropped if the runner is behind).

        Args:
            source_id: its source.
            frame_index: its index.
            image_rgb: ``(H, W, 3)`` uint8 RGB frame (a slot view: only read).
            detections: its detections in frame pixels.
            class_names: names by class id.
            children: secondary models' results by detection index (a cascade), or None.
        """
        from pipeline.annotate import annotate_result

        self._next[source_id] = time.monotonic() + 1.0 / self.config.fps
        image = annotate_result(image_rgb.copy(), detections, class_names, children)
        h, w = image.shape[:2]
        if w > self.config.width:
            h = max(1, round(h * self.config.width / w))
            w = self.config.width
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, self.config.quality])
        if ok:
            self._send(PreviewFrameMsg(source_id, frame_index, (h, w), jpeg.tobytes()).encode())

    def forget(self, source_id: str) -> None:
        """Drop a source's rate state (it ended)."""
        self._next.pop(source_id, None)

    def tick(self, stats: LiveStats) -> None:
        """Send the stats snapshot when one is due."""
        now = time.monotonic()
        if now < self._next_snapshot:
            return
        self._next_snapshot = now + SNAPSHOT_EVERY_S
        self._send(StatsSnapshotMsg(stats.snapshot(now), stats.metrics_text()).encode())

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data, flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        """Close the socket without lingering (previews are disposable)."""
        self.sock.close(linger=0)
