"""GPU letterbox + normalize (torch, run here on CPU tensors) against the CPU preprocess (cv2)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.gpu.gpu_preprocess import GpuLetterbox, frames_to_device  # noqa: E402
from streamdet.card import HeadLayout, HeadSpec, InputSpec, ModelCard, Normalization, Task  # noqa: E402
from streamdet.letterbox import ResizeMode  # noqa: E402
from streamdet.preprocess_ops import preprocess_batch  # noqa: E402

torch.set_num_threads(1)


def card(order: str = "RGB", dtype: str = "float32", mean: float = 0.0, std: float = 255.0,
         input_wh: tuple[int, int] = (640, 384), resize: ResizeMode = ResizeMode.LETTERBOX) -> ModelCard:
    return ModelCard(name="t", task=Task.DETECT, head=HeadSpec(layout=HeadLayout.ULTRALYTICS_DETECT, num_classes=1),
                     input=InputSpec(width=input_wh[0], height=input_wh[1], channel_order=order, dtype=dtype,
                                     resize=resize),
                     normalization=Normalization(mean=(mean, mean + 3, mean + 7), std=(std, std + 1, std + 2)),
                     class_names=("a",))


def natural_frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradients plus sharp-edged rectangles and noise (like decoded video, unlike pure noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=2)
    for _ in range(8):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        img[y0 : y0 + rng.integers(5, h // 2 + 6), x0 : x0 + rng.integers(5, w // 2 + 6)] = rng.integers(0, 256, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


SIZES = [(720, 1280), (1080, 1920), (240, 320), (384, 640), (517, 333), (272, 640), (100, 900)]
EXACT = {(720, 1280), (1080, 1920), (384, 640), (272, 640)}  # scale 1/2, 1/3, 1 and 1 (pad only)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("variant", ["rgb", "bgr-meanstd", "stretch"])
def test_matches_cpu_preprocess(hw: tuple[int, int], variant: str) -> None:
    c = {"rgb": card(), "bgr-meanstd": card(order="BGR", mean=100.0, std=50.0),
         "stretch": card(resize=ResizeMode.STRETCH)}[variant]
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    frames = [natural_frame(rng, *hw) for _ in range(2)]
    want, want_lb = preprocess_batch(frames, c)
    lb = GpuLetterbox(card=c, max_batch=4, device="cpu")
    got, got_lb = lb(frames_to_device(frames, "cpu"))
    assert got_lb == want_lb
    assert got.shape == want.shape and got.dtype == torch.float32
    diff = np.abs(got.numpy() - want)
    level = 1.0 / min(c.normalization.std)  # one pixel level after normalising
    # OpenCV interpolates uint8 in fixed point: at most one level off, on a few percent of the pixels;
    # integer downscale factors (and no resize) give the same bytes
    assert diff.max() <= level * 1.0001, diff.max()
    # two scales (stretch) round on more pixels: 0.11-0.13 of a level on average measured
    assert diff.mean() <= (0.15 if variant == "stretch" else 0.1) * level
    if hw in EXACT and (variant != "stretch" or hw == (384, 640)):
        assert diff.max() <= 1e-6
    # the padding is exact
    (rw, rh), (px, py) = want_lb[0].resized_wh, want_lb[0].pad_xy
    pad_mask = np.ones(want.shape[2:], bool)
    pad_mask[py : py + rh, px : px + rw] = False
    np.testing.assert_array_equal(got.numpy()[:, :, pad_mask], want[:, :, pad_mask])


def test_mixed_sizes_and_stacked_batch() -> None:
    c = card()
    rng = np.random.default_rng(0)
    frames = [natural_frame(rng, *hw) for hw in [(720, 1280), (480, 640), (720, 1280)]]
    want, _ = preprocess_batch(frames, c)
    lb = GpuLetterbox(card=c, max_batch=3, device="cpu")
    got, _ = lb(frames_to_device(frames, "cpu"))
    assert np.abs(got.numpy() - want).max() <= 1.0001 / 255
    same = torch.from_numpy(np.stack([frames[0], frames[2]]))  # (B, H, W, 3) as from a slot ring
    got2, _ = lb(same)
    np.testing.assert_array_equal(got2.numpy(), got.numpy()[[0, 2]])


def test_float16_card() -> None:
    c = card(dtype="float16")
    frame = natural_frame(np.random.default_rng(1), 720, 1280)
    want, _ = preprocess_batch([frame], c)
    got, _ = GpuLetterbox(card=c, max_batch=1, device="cpu")(frames_to_device([frame], "cpu"))
    assert got.dtype == torch.float16
    assert np.abs(got.numpy().astype(np.float32) - want.astype(np.float32)).max() <= 1.0 / 255 + 1e-3


@pytest.mark.parametrize("bad, match", [
    ([], "expected 1..2 frames"),
    ([np.zeros((4, 4, 3), np.uint8)] * 3, "expected 1..2 frames"),
    ([np.zeros((4, 4), np.uint8)], "expected frame 0"),
    ([np.zeros((4, 4, 3), np.float32)], "expected frame 0"),
])
def test_rejects_bad_frames(bad: list[np.ndarray], match: str) -> None:
    lb = GpuLetterbox(card=card(), max_batch=2, device="cpu")
    with pytest.raises(ValueError, match=match):
        lb([torch.from_numpy(f) for f in bad])
