"""Test clip and decode measurements of the GPU check (``bench/gpu_check.py``).

* :func:`make_clip`: an H.264 clip made on the machine itself (no network): the bundled demo video's
  frames scaled to the asked size, encoded with libx264 ``preset=ultrafast``, one keyframe a second.
* :func:`decode_figures`: one stream decoded on one core: software decode to YUV (what the check's
  stream phase uploads), software decode + RGB24 (what the multi-process pipeline's decoder does
  today), NVDEC with the frame downloaded to the host (``decode.hwaccel: cuda``), and NVDEC with
  the frame kept on the device (PyAV ``is_hw_owned`` + DLPack), each as frames per second and CPU
  milliseconds per frame (process time, so other processes do not count).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipeline" / "samples" / "demo.mp4"


def make_clip(path: Path, *, wh: tuple[int, int], seconds: float, fps: int = 30) -> dict[str, Any]:
    """Encode ``seconds`` of the demo video scaled to ``wh`` as H.264 (ultrafast, GOP = ``fps``).

    Returns:
        ``{"path", "frames", "wh", "fps", "encode_s", "bytes"}``.
    """
    import av
    import cv2

    t0 = time.perf_counter()
    src = []
    with av.open(str(DEMO)) as c:
        for f in c.decode(video=0):
            src.append(cv2.resize(f.to_ndarray(format="rgb24"), wh, interpolation=cv2.INTER_AREA))
            if len(src) >= 60:
                break
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = wh[0], wh[1], "yuv420p"
        st.options = {"preset": "ultrafast", "g": str(fps), "keyint_min": str(fps), "bf": "0"}
        for i in range(n):
            k = i % (2 * len(src))  # forwards then backwards: no jump cut
            img = src[k] if k < len(src) else src[2 * len(src) - 1 - k]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return {"path": str(path), "frames": n, "wh": list(wh), "fps": fps, "encode_s": round(time.perf_counter() - t0, 2),
            "bytes": path.stat().st_size}


def _decode(path: Path, how: str, max_frames: int, deadline: float) -> dict[str, Any]:
    import av

    from pipeline.sources.ffmpeg import open_input
    from pipeline.sources.options import HWAccelMode, HWAccelOptions

    hw = how.startswith("nvdec")
    opts = HWAccelOptions(mode=HWAccelMode.CUDA) if hw else HWAccelOptions()
    n = 0
    w0, c0 = time.perf_counter(), time.process_time()
    if how == "nvdec_device":
        import torch
        from av.codec.hwaccel import HWAccel

        accel = HWAccel("cuda", allow_software_fallback=False, is_hw_owned=True, options={"primary_ctx": "1"})
        container = av.open(str(path), hwaccel=accel)
    else:
        container = open_input(str(path), hwaccel=opts, timeout=10.0)
    with container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
        for f in container.decode(stream):
            if how == "sw_yuv":
                f.to_ndarray(format="yuv420p")
            elif how in ("sw_rgb", "nvdec_host_rgb"):
                f.to_ndarray(format="rgb24")
            elif how == "nvdec_host":
                f.to_ndarray(format="nv12")
            else:  # nvdec_device: the NV12 planes as CUDA tensors, no host copy
                y = torch.from_dlpack(f.planes[0])
                uv = torch.from_dlpack(f.planes[1])
                if n == 0:
                    torch.cuda.synchronize()
                    _ = (int(y.float().mean()), int(uv.float().mean()))
            n += 1
            if n >= max_frames or time.perf_counter() > deadline:
                break
    if how == "nvdec_device":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"frames": n, "fps": round(n / wall, 1), "cpu_ms_per_frame": round(1000.0 * cpu / max(n, 1), 3)}


def decode_figures(path: Path, *, nvdec: bool, max_frames: int, budget_s: float) -> dict[str, Any]:
    """Decode ``path`` each way (one thread); a way that fails records its error instead of figures."""
    ways = ["sw_yuv", "sw_rgb"] + (["nvdec_host", "nvdec_host_rgb", "nvdec_device"] if nvdec else [])
    out: dict[str, Any] = {}
    t_end = time.perf_counter() + budget_s
    for i, how in enumerate(ways):
        share = (t_end - time.perf_counter()) / (len(ways) - i)
        try:
            out[how] = _decode(path, how, max_frames, time.perf_counter() + max(0.5, share))
        except Exception as e:  # report and go on: FFmpeg, CUDA and DLPack errors come in many types
            out[how] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    sw, rgb = out.get("sw_yuv", {}), out.get("sw_rgb", {})
    if "cpu_ms_per_frame" in sw and "cpu_ms_per_frame" in rgb:
        out["rgb_conversion_cpu_ms_per_frame"] = round(rgb["cpu_ms_per_frame"] - sw["cpu_ms_per_frame"], 3)
    return out
