"""Source options as settings build them: decoder threading, hardware decode, live connection and backoff.

Nothing here imports PyAV at module level (only :meth:`HWAccelOptions.av_hwaccel` does, when
called), so :mod:`pipeline.settings` can import it cheaply.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pipeline.cgroups import machine_cores


class RtspTransport(str, Enum):
    """Lower transport of RTSP (FFmpeg ``rtsp_transport``)."""

    TCP = "tcp"  # interleaved in the RTSP connection: no loss, passes NAT and firewalls
    UDP = "udp"


@dataclass(frozen=True, kw_only=True)
class LiveOptions:
    """How live sources connect and reconnect.

    Attributes:
        rtsp_transport: RTSP lower transport.
        open_timeout_s: longest wait to connect, seconds.
        read_timeout_s: longest wait for data once connected (FFmpeg I/O timeout), seconds.
        stall_timeout_s: no frame for this long counts as a lost stream, seconds.
        reconnect_initial_s: first reconnection delay, seconds (doubled each failed attempt).
        reconnect_max_s: longest reconnection delay, seconds.
        reconnect_max_attempts: give up after this many failed attempts in a row (None: never).
    """

    rtsp_transport: RtspTransport = RtspTransport.TCP
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    stall_timeout_s: float = 5.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    reconnect_max_attempts: int | None = None

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "read_timeout_s", "stall_timeout_s", "reconnect_initial_s", "reconnect_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)!r}")
        if self.reconnect_max_attempts is not None and self.reconnect_max_attempts < 1:
            raise ValueError(f"expected reconnect_max_attempts >= 1 or None, got {self.reconnect_max_attempts!r}")

    def av_options(self, url: str) -> dict[str, str]:
        """FFmpeg options for opening ``url`` (RTSP transport and socket timeout in microseconds)."""
        if url.lower().startswith(("rtsp://", "rtsps://")):
            return {"rtsp_transport": self.rtsp_transport.value, "timeout": str(int(self.read_timeout_s * 1e6))}
        return {}


def reconnect_delay(attempt: int, *, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before reconnection attempt ``attempt``: exponential backoff with jitter.

    ``min(max_s, initial_s * 2 ** (attempt - 1))`` times a uniform factor in ``[0.75, 1.25]``
    (so consecutive delays still grow by at least 1.2x until the cap), as in the "exponential
    backoff and jitter" scheme (AWS Architecture Blog, 2015).

    Args:
        attempt: 1 for the first reconnection.
        initial_s: first delay, seconds.
        max_s: cap, seconds.
        rng: random source (default: the module's).

    Returns:
        Seconds to wait.

    Raises:
        ValueError: if ``attempt < 1``.
    """
    if attempt < 1:
        raise ValueError(f"expected attempt >= 1, got {attempt}")
    base = min(max_s, initial_s * 2.0 ** min(attempt - 1, 60))
    return base * (rng or random).uniform(0.75, 1.25)


class DecodeThreads(str, Enum):
    """FFmpeg decoder threading (``codec_context.thread_type``)."""

    AUTO = "AUTO"  # frame + slice threads where the codec supports them
    FRAME = "FRAME"
    SLICE = "SLICE"
    NONE = "NONE"


MAX_DECODER_THREADS = 16
"""FFmpeg's own cap on automatic decoder threads."""


def decoder_thread_count() -> int:
    """``codec_context.thread_count`` for a software decoder: 0 (FFmpeg's automatic count), or fewer.

    FFmpeg counts the CPU affinity, not a container's CPU quota: under ``docker run --cpus=2`` on
    a 64-core host each decoder would start 16 threads, and frame threads delay every frame by
    one frame per thread. Where the quota leaves fewer cores than the host has, the decoder gets
    that many (:func:`pipeline.cgroups.machine_cores`).
    """
    cores = machine_cores()
    return min(cores, MAX_DECODER_THREADS) if cores < (os.cpu_count() or cores) else 0


class DecodePlacement(str, Enum):
    """Which process decodes a source given at start-up (see :mod:`pipeline.stages.colocated`)."""

    SEPARATE = "separate"  # its own process, frames to the preprocess process over ipc://
    WITH_PREPROCESS = "with_preprocess"  # a thread of its model chain's preprocess process, frames over inproc://
    AUTO = "auto"  # with_preprocess with at most SMALL_MACHINE_CORES cores and no control API, else separate


SMALL_MACHINE_CORES = 2
"""``decode.placement: auto`` puts decoders in the preprocess process on machines with at most this many cores."""


class HWAccelMode(str, Enum):
    """Hardware video decoding through FFmpeg's hwaccel (PyAV ``HWAccel``)."""

    NONE = "none"  # software decode on the CPU (FFmpeg's native decoders)
    CUDA = "cuda"  # NVDEC on an NVIDIA GPU; frames are downloaded to host memory as they leave the decoder


HWACCEL_FALLBACK_SETTING = "decode.hwaccel_fallback"
"""The setting that allows software decode when the hardware decoder cannot be used."""


@dataclass(frozen=True, kw_only=True)
class HWAccelOptions:
    """Hardware decoding of a source.

    Attributes:
        mode: :attr:`HWAccelMode.NONE` (software) or a hardware decoder.
        device: GPU index for the hardware decoder (CUDA ordinal).
        fallback: decode in software, with a warning, when the hardware decoder cannot be used for a
            source (default: fail naming the source).
    """

    mode: HWAccelMode = HWAccelMode.NONE
    device: int = 0
    fallback: bool = False

    def __post_init__(self) -> None:
        if self.device < 0:
            raise ValueError(f"expected device >= 0, got {self.device!r}")

    @property
    def enabled(self) -> bool:
        """Whether a hardware decoder is asked for."""
        return self.mode is not HWAccelMode.NONE

    @property
    def setting(self) -> str:
        """The settings as a user writes them: ``decode.hwaccel=cuda`` (and the device if not 0)."""
        return f"decode.hwaccel={self.mode.value}" + (f", decode.hwaccel_device={self.device}" if self.device else "")

    def software(self) -> HWAccelOptions:
        """The same options with hardware decoding off."""
        return HWAccelOptions(device=self.device, fallback=self.fallback)

    def av_hwaccel(self) -> Any:
        """The ``av.codec.hwaccel.HWAccel`` for ``av.open(..., hwaccel=...)``, or None for software decode.

        PyAV's own software fallback is always off: a stream the hardware decoder cannot take must
        fail (or be reopened in software by the caller, which says so), never switch silently.
        """
        if not self.enabled:
            return None
        from av.codec.hwaccel import HWAccel

        return HWAccel(device_type=self.mode.value, device=str(self.device), allow_software_fallback=False)
