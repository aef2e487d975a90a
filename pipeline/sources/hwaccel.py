"""Start-up check that the hardware decoder (NVDEC through PyAV's hwaccel) works for a source.

Hardware decoding (``decode.hwaccel: cuda``, :class:`~pipeline.sources.options.HWAccelOptions`)
hands the bitstream to NVDEC through FFmpeg's hwaccel in PyAV. PyAV downloads each decoded surface
to host memory (NV12) as it leaves the decoder, and the RGB24 conversion and the slot copy run on
the CPU as in software decode, so nothing downstream changes. The check here proves NVDEC works
for each source (file: its first frame decodes on the device; URL: a CUDA device opens); the
probe (:func:`pipeline.sources.probe.probe_source`) fails naming the source otherwise, or falls
back to software decode when ``decode.hwaccel_fallback`` asks for it.
"""

from __future__ import annotations

from typing import Any

from pipeline.sources.ffmpeg import ffmpeg_log_detail, ffmpeg_problem, open_input
from pipeline.sources.options import HWAccelOptions
from pipeline.transport import redact_url

HWACCEL_PROBE_PACKETS = 64
"""The start-up probe gives up finding a first frame on the hardware decoder after this many packets."""


def hwaccel_problem(url: str | None, hwaccel: HWAccelOptions) -> str:
    """Check that the hardware decoder works here (and for ``url``, if given); nothing is kept open.

    Without ``url`` only the device is checked (a CUDA context for NVDEC, as H.264 decode would
    make it): used for live sources, which are not opened at start-up. With ``url`` the file is
    opened with the hardware decoder, its video stream must be one the decoder supports, and its
    first frame must decode on the device.

    Args:
        url: a file to try, or None.
        hwaccel: the options (:attr:`HWAccelOptions.enabled`).

    Returns:
        "" if it works, else the problem (one line; credentials redacted), naming the setting.
    """
    import av
    import av.logging
    from av.codec.hwaccel import hwdevices_available

    what = f"hardware decode ({hwaccel.setting}) unavailable"
    if hwaccel.mode.value not in hwdevices_available():
        return f"{what}: this PyAV's FFmpeg has no {hwaccel.mode.value} support"
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # keeps FFmpeg's reason (e.g. "Cannot load libcuda.so.1") for the message
    error = ""
    try:
        with av.logging.Capture() as logs:
            try:
                problem = _try_hwaccel(av, url, hwaccel)
            except (av.FFmpegError, RuntimeError, NotImplementedError) as e:
                problem, error = f"cannot create a {hwaccel.mode.value.upper()} device", ffmpeg_problem(e)
    finally:
        av.logging.set_level(previous)
    if not problem:
        return ""
    detail = redact_url(ffmpeg_log_detail(logs))
    if detail and detail not in problem:
        problem = f"{problem}: {detail}"
    if error:
        problem = f"{problem} ({error})"
    return f"{what}: {problem}"


def _try_hwaccel(av: Any, url: str | None, hwaccel: HWAccelOptions) -> str:
    """The problem of :func:`hwaccel_problem` ("" if none); FFmpeg errors propagate."""
    if url is None:
        accel = hwaccel.av_hwaccel()
        try:
            accel.create(av.Codec("h264", "r"))  # makes (and frees) the device context NVDEC would use
        except NotImplementedError:
            return f"this PyAV's FFmpeg has no {hwaccel.mode.value} H.264 decoder"
        return ""
    with open_input(url, hwaccel=hwaccel, timeout=10.0) as container:
        stream = container.streams.video[0]
        if not stream.codec_context.is_hwaccel:
            return f"no {hwaccel.mode.value} hardware decoder for codec {stream.codec_context.name!r}"
        for k, packet in enumerate(container.demux(stream)):
            try:
                if stream.codec_context.decode(packet):
                    return ""
            except av.FFmpegError as e:
                return f"the first frame does not decode on the device ({ffmpeg_problem(e)})"
            if k >= HWACCEL_PROBE_PACKETS:
                break
        return f"no frame decoded on the device from the first {HWACCEL_PROBE_PACKETS} packets"
