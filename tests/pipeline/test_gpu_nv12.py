"""YUV 4:2:0 -> RGB + letterbox on the device (pipeline/gpu/nv12.py) against PyAV's and OpenCV's conversions."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.gpu.cuda_slotpool import CudaFramePool  # noqa: E402
from pipeline.gpu.gpu_preprocess import GpuLetterbox  # noqa: E402
from pipeline.gpu.nv12 import (  # noqa: E402
    GpuYuvLetterbox,
    YuvLayout,
    YuvMatrix,
    yuv420_slot_hw,
    yuv420_to_rgb,
    yuv_coefficients,
    yuv_matrix_for,
    yuv_view,
)
from tests.helpers.standin import bikes_path, standin_card  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "demo.mp4"


def _frames(path: Path, n: int = 3, skip: int = 5) -> list[av.VideoFrame]:
    out = []
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= skip:
                out.append(f)
            if len(out) == n:
                break
    return out


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


@pytest.mark.parametrize("path", [DEMO, bikes_path()], ids=["demo-720p", "bikes"])
def test_matches_pyav_and_opencv_on_real_frames(path: Path) -> None:
    frames = _frames(path)
    h, w = frames[0].height, frames[0].width
    matrix, full = yuv_matrix_for(frames[0])
    assert (matrix, full) == (YuvMatrix.BT601, False)  # untagged streams: FFmpeg's default
    i420 = torch.from_numpy(np.stack([f.to_ndarray(format="yuv420p") for f in frames]))
    nv12 = np.stack([f.to_ndarray(format="nv12") for f in frames])
    a = yuv420_to_rgb(i420, (h, w), layout=YuvLayout.I420, matrix=matrix).numpy()
    b = yuv420_to_rgb(torch.from_numpy(nv12), (h, w), layout=YuvLayout.NV12, matrix=matrix).numpy()
    assert np.array_equal(a, b)  # same samples, other layout
    for k, f in enumerate(frames):
        mx, mean = _diff(a[k], f.to_ndarray(format="rgb24"))  # the CPU pipeline's frames
        assert mx <= 3 and mean <= 1.0, (mx, mean)
        mx, mean = _diff(b[k], cv2.cvtColor(nv12[k], cv2.COLOR_YUV2RGB_NV12))
        assert mx <= 4 and mean <= 1.0, (mx, mean)  # OpenCV rounds; FFmpeg and this truncate


@pytest.mark.parametrize("matrix", list(YuvMatrix))
@pytest.mark.parametrize("full", [False, True])
def test_coefficients_match_the_float64_formula(matrix: YuvMatrix, full: bool) -> None:
    rng = np.random.default_rng(3)
    h, w = 8, 12
    y = rng.integers(0, 256, (h, w)).astype(np.uint8)
    u = rng.integers(0, 256, (h // 2, w // 2)).astype(np.uint8)
    v = rng.integers(0, 256, (h // 2, w // 2)).astype(np.uint8)
    i420 = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)
    got = yuv420_to_rgb(torch.from_numpy(i420)[None], (h, w), layout=YuvLayout.I420, matrix=matrix,
                        full_range=full)[0].numpy()
    kr, kb = (0.299, 0.114) if matrix is YuvMatrix.BT601 else (0.2126, 0.0722)
    ys, cs, yo = (1.0, 1.0, 0.0) if full else (255 / 219, 255 / 224, 16.0)
    yf = (y.astype(np.float64) - yo) * ys
    uf = np.repeat(np.repeat(u.astype(np.float64) - 128, 2, 0), 2, 1) * cs
    vf = np.repeat(np.repeat(v.astype(np.float64) - 128, 2, 0), 2, 1) * cs
    r = yf + 2 * (1 - kr) * vf
    bb = yf + 2 * (1 - kb) * uf
    g = (yf - kr * r - kb * bb) / (1 - kr - kb)
    ref = np.clip(np.floor(np.stack([r, g, bb], -1) + 1e-9), 0, 255)
    assert np.abs(got.astype(np.float64) - ref).max() <= 1.0
    assert yuv_coefficients(matrix, full_range=full).y_scale == pytest.approx(ys)


def test_matrix_from_tags() -> None:
    class F:
        colorspace, color_range = 1, 1

        class format:  # noqa: N801
            name = "yuv420p"

    assert yuv_matrix_for(F()) == (YuvMatrix.BT709, False)
    F.colorspace, F.color_range = 5, 2
    assert yuv_matrix_for(F()) == (YuvMatrix.BT601, True)


def _check_letterbox(device: str) -> None:
    frames = _frames(DEMO, n=2)
    h, w = frames[0].height, frames[0].width
    card = standin_card((640, 384))
    yuv = torch.from_numpy(np.stack([f.to_ndarray(format="yuv420p") for f in frames])).to(device)
    # through a frame ring slot, as the GPU check's decoders send them
    pool = CudaFramePool.create(name="yuv", num_slots=2, frame_hw=yuv420_slot_hw((h, w)), device=device)
    for s in range(2):
        assert pool.acquire() == s
        pool.write(s, yuv[s].reshape(h // 2, w, 3))
    assert pool.ring is not None
    got, lbs = GpuYuvLetterbox(card=card, max_batch=4, frame_hw=(h, w), layout=YuvLayout.I420,
                               device=device)(yuv_view(pool.ring, (h, w)))
    rgb = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in frames])).to(device)
    ref, ref_lbs = GpuLetterbox(card=card, max_batch=4, device=device)(rgb)
    assert lbs == ref_lbs
    d = (got.float() - ref.float()).abs() * 255.0  # levels (std 255)
    assert float(d.max()) <= 3.01 and float(d.mean()) <= 1.0


def test_letterbox_equals_rgb_path_on_cpu() -> None:
    _check_letterbox("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_letterbox_equals_rgb_path_on_cuda() -> None:
    _check_letterbox("cuda")


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="even frame size"):
        yuv420_slot_hw((181, 320))
    with pytest.raises(ValueError, match="expected YUV frames"):
        yuv420_to_rgb(torch.zeros((1, 10, 10), dtype=torch.uint8), (8, 10), layout=YuvLayout.NV12,
                      matrix=YuvMatrix.BT601)
    lb = GpuYuvLetterbox(card=standin_card((64, 32)), max_batch=1, frame_hw=(8, 8), layout=YuvLayout.NV12,
                         device="cpu")
    with pytest.raises(ValueError, match="1..1 YUV frames"):
        lb(torch.zeros((2, 12, 8), dtype=torch.uint8))
