"""A small anchor-free single-stage detector in the YOLOv8 style, with an optional instance-mask head.

Architecture (Jocher et al., ultralytics YOLOv8, ``ultralytics/nn/modules/{conv,block,head}.py``):

* backbone: Conv-BN-SiLU stem and stride-2 convs, C2f blocks, SPPF at stride 32;
* neck: PAN-FPN (top-down upsample + concat, then bottom-up stride-2 conv + concat), C2f after
  each merge, outputs at strides 8/16/32;
* head: decoupled (separate box and class conv branches per level); boxes regressed as
  distributions over ``reg_max`` bins per side (Distribution Focal Loss, Li et al. 2020, "Generalized
  Focal Loss", arXiv:2006.04388) and decoded as the distribution's expectation;
* optional instance segmentation (YOLACT, Bolya et al. 2019; ultralytics ``Segment``): 32 mask
  coefficients per anchor from a third branch and 32 prototypes at stride 4 from the stride-8 map.

In training mode :meth:`Detector.forward` returns raw per-level maps for the loss; in eval mode it
returns the export layout: ``output0`` ``(B, 4 + C [+ 32], N)`` (boxes cxcywh in input pixels,
sigmoid class scores, mask coefficients) and, for segmentation, ``output1`` ``(B, 32, H/4, W/4)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from streamdet.constants import DEFAULT_INPUT_WH
from training.config_dict import PlainConfig, check_known_keys

STRIDES: tuple[int, int, int] = (8, 16, 32)
NUM_MASK_COEFFS = 32
CHECKPOINT_FORMAT = "streamdet.detector-checkpoint/1"
"""``format`` key of the checkpoints written by ``training.train``."""


def _round_channels(c: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(math.ceil(c / divisor) * divisor))


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, padding ``k // 2`` (ultralytics ``Conv``)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act: nn.Module = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c1, H, W)`` -> ``(B, c2, H / s, W / s)``."""
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs with an optional residual (ultralytics ``Bottleneck``, ``e=1.0`` as in C2f)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c1, H, W)`` -> ``(B, c2, H, W)``."""
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convs and ``n`` chained Bottlenecks whose outputs are all concatenated.

    Reference: ultralytics ``C2f`` (YOLOv8).
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c1, H, W)`` -> ``(B, c2, H, W)``."""
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools concatenated (ultralytics ``SPPF``)."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c1, H, W)`` -> ``(B, c2, H, W)``."""
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class DFL(nn.Module):
    """Expected value of a softmax distribution over ``reg_max`` integer bins, per box side.

    Reference: Li et al. 2020 (GFL, Distribution Focal Loss); ultralytics ``DFL`` (which uses a
    fixed 1x1 conv over a softmax on axis 1). Here the softmax runs over the last axis and a
    MatMul with ``0..reg_max-1`` takes the expectation: the same numbers, but ONNX Runtime's
    Softmax is several times faster on the innermost axis.
    """

    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32).view(reg_max, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 4 * reg_max, N)`` logits -> ``(B, 4, N)`` distances in grid units."""
        b, _, n = x.shape
        probs = x.view(b, 4, self.reg_max, n).transpose(2, 3).softmax(-1)  # (B, 4, N, reg_max)
        proj = self.proj
        assert isinstance(proj, torch.Tensor)
        return probs.matmul(proj).view(b, 4, n)


class Proto(nn.Module):
    """Mask prototypes: Conv, 2x transposed-conv upsample, Conv, 1x1 Conv (ultralytics ``Proto``)."""

    def __init__(self, c1: int, c_: int, c2: int = NUM_MASK_COEFFS) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c_, 3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, 3)
        self.cv3 = Conv(c_, c2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c1, H/8, W/8)`` -> ``(B, c2, H/4, W/4)``."""
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


@dataclass(frozen=True)
class DetectorConfig(PlainConfig):
    """Constructor configuration of :class:`Detector` (stored in checkpoints).

    Attributes:
        num_classes: number of classes ``C``.
        width: channels of the backbone stages at strides 2/4/8/16/32 before multipliers.
        width_mult: multiplier on ``width`` (rounded to multiples of 8).
        depth: Bottlenecks per C2f (stride 4/8/16/32 backbone stages; neck uses ``depth[-1]``).
        depth_mult: multiplier on ``depth`` (rounded, at least 1).
        reg_max: DFL bins per box side.
        segment: add the instance-mask head (32 coefficients + prototypes).
        proto_channels: hidden channels of the prototype branch (ultralytics: 64 for its nano model;
            16 here keeps the stride-4 convs within the CPU budget).
        head_box_channels: hidden channels of the box branch (0: ultralytics rule
            ``max(16, P3 / 4, 4 reg_max)`` = 64; 32 here, measured ~25% faster on CPU).
        head_cls_channels: hidden channels of the class branch (0: ultralytics rule
            ``max(P3, min(C, 100))`` = 64; 48 here).
        input_wh: model input size ``(width, height)``; both multiples of 32.
    """

    num_classes: int = 10
    width: tuple[int, ...] = (16, 32, 64, 96, 128)
    width_mult: float = 1.0
    depth: tuple[int, ...] = (1, 1, 1, 1)
    depth_mult: float = 1.0
    reg_max: int = 16
    segment: bool = False
    proto_channels: int = 16
    head_box_channels: int = 32
    head_cls_channels: int = 48
    input_wh: tuple[int, int] = DEFAULT_INPUT_WH

    def __post_init__(self) -> None:
        if self.num_classes <= 0:
            raise ValueError(f"expected num_classes > 0, got {self.num_classes}")
        if len(self.width) != 5 or len(self.depth) != 4:
            raise ValueError(f"expected 5 widths and 4 depths, got {self.width} and {self.depth}")
        if self.input_wh[0] % 32 or self.input_wh[1] % 32 or min(self.input_wh) <= 0:
            raise ValueError(f"expected input_wh multiples of 32, got {self.input_wh}")
        if self.reg_max < 2:
            raise ValueError(f"expected reg_max >= 2, got {self.reg_max}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        check_known_keys(d, cls.__dataclass_fields__, "DetectorConfig")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


class Detector(nn.Module):
    """YOLOv8-style detector (optionally with instance masks).

    Args:
        config: the :class:`DetectorConfig`.

    Training-mode output (``model.train()``): a dict with ``feats``: list of 3 tensors
    ``(B, 4 * reg_max + C [+ 32], H/s, W/s)`` for strides 8/16/32 (box logits, class logits, mask
    coefficients, channel order as listed) and, for segmentation, ``protos`` ``(B, 32, H/4, W/4)``.

    Eval-mode output (``model.eval()``, also the ONNX export): ``output0`` ``(B, 4 + C [+ 32], N)``
    float32, ``N = sum_s (H/s)(W/s)``, boxes cxcywh in input pixels, class scores after sigmoid, then
    mask coefficients; for segmentation a tuple ``(output0, output1)`` with prototypes ``(B, 32, H/4, W/4)``.
    """

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        w = [_round_channels(c * config.width_mult) for c in config.width]
        d = [max(1, round(n * config.depth_mult)) for n in config.depth]
        nc, reg_max = config.num_classes, config.reg_max
        self.nc, self.reg_max, self.segment = nc, reg_max, config.segment
        self.strides = STRIDES
        self.nm = NUM_MASK_COEFFS if config.segment else 0
        # backbone
        self.stem = Conv(3, w[0], 3, 2)  # /2
        self.down1 = Conv(w[0], w[1], 3, 2)  # /4
        self.c2f1 = C2f(w[1], w[1], d[0], shortcut=True)
        self.down2 = Conv(w[1], w[2], 3, 2)  # /8  -> P3
        self.c2f2 = C2f(w[2], w[2], d[1], shortcut=True)
        self.down3 = Conv(w[2], w[3], 3, 2)  # /16 -> P4
        self.c2f3 = C2f(w[3], w[3], d[2], shortcut=True)
        self.down4 = Conv(w[3], w[4], 3, 2)  # /32 -> P5
        self.c2f4 = C2f(w[4], w[4], d[3], shortcut=True)
        self.sppf = SPPF(w[4], w[4])
        # PAN-FPN neck
        dn = d[-1]
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.td4 = C2f(w[4] + w[3], w[3], dn)  # top-down at /16
        self.td3 = C2f(w[3] + w[2], w[2], dn)  # top-down at /8 -> N3
        self.bu3 = Conv(w[2], w[2], 3, 2)
        self.bu4 = C2f(w[2] + w[3], w[3], dn)  # bottom-up at /16 -> N4
        self.bu4d = Conv(w[3], w[3], 3, 2)
        self.bu5 = C2f(w[3] + w[4], w[4], dn)  # bottom-up at /32 -> N5
        ch = (w[2], w[3], w[4])
        # decoupled head (ultralytics Detect channel rules unless overridden)
        c2 = config.head_box_channels or max(16, ch[0] // 4, reg_max * 4)
        c3 = config.head_cls_channels or max(ch[0], min(nc, 100))
        self.box_branch = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in ch
        )
        self.cls_branch = nn.ModuleList(
            nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch
        )
        self.mask_branch: nn.ModuleList | None = None
        self.proto: Proto | None = None
        if config.segment:
            c4 = max(ch[0] // 4, self.nm)
            self.mask_branch = nn.ModuleList(
                nn.Sequential(Conv(c, c4, 3), Conv(c4, c4, 3), nn.Conv2d(c4, self.nm, 1)) for c in ch
            )
            self.proto = Proto(ch[0], config.proto_channels, self.nm)
        self.dfl = DFL(reg_max)
        self.channels = tuple(w)
        self._init_bias()

    def _init_bias(self) -> None:
        """Prior-probability bias init (ultralytics ``Detect.bias_init``; Lin et al. 2017, RetinaNet)."""
        iw, ih = self.config.input_wh
        for box, cls, s in zip(self.box_branch, self.cls_branch, self.strides, strict=True):
            last_box = list(box.children())[-1]
            last_cls = list(cls.children())[-1]
            assert isinstance(last_box, nn.Conv2d) and isinstance(last_cls, nn.Conv2d)
            assert last_box.bias is not None and last_cls.bias is not None
            last_box.bias.data[:] = 1.0
            # ~5 objects per class per image over the anchors of this level
            last_cls.bias.data[: self.nc] = math.log(5 / self.nc / (iw * ih / s**2))

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.down1(self.stem(x))
        x = self.c2f1(x)
        p3 = self.c2f2(self.down2(x))
        p4 = self.c2f3(self.down3(p3))
        p5 = self.sppf(self.c2f4(self.down4(p4)))
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        n3 = self.td3(torch.cat((self.up(t4), p3), 1))
        n4 = self.bu4(torch.cat((self.bu3(n3), t4), 1))
        n5 = self.bu5(torch.cat((self.bu4d(n4), p5), 1))
        return n3, n4, n5

    def forward(self, images: torch.Tensor) -> Any:
        """Run the model.

        Args:
            images: ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``, ``(W, H) = config.input_wh``.

        Returns:
            Training mode: dict (see class docstring). Eval mode: ``output0`` or ``(output0, output1)``.
        """
        raw = self.forward_raw(images)
        if self.training:
            return raw
        out0 = self.decode(raw["feats"])
        return (out0, raw["protos"]) if "protos" in raw else out0

    def forward_raw(self, images: torch.Tensor) -> dict[str, Any]:
        """The raw per-level maps (the training-mode output), in either mode.

        Args:
            images: ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``.

        Returns:
            ``{"feats": [3 x (B, 4 * reg_max + C [+ 32], H/s, W/s)]}`` plus ``"protos"``
            ``(B, 32, H/4, W/4)`` for segmentation.
        """
        feats = self._features(images)
        outs = []
        for i, f in enumerate(feats):
            parts = [self.box_branch[i](f), self.cls_branch[i](f)]
            if self.mask_branch is not None:
                parts.append(self.mask_branch[i](f))
            outs.append(torch.cat(parts, 1))
        result: dict[str, Any] = {"feats": outs}
        if self.proto is not None:
            result["protos"] = self.proto(feats[0])
        return result

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decode per-level maps to the ultralytics export layout.

        Args:
            feats: 3 tensors ``(B, 4 * reg_max + C [+ 32], H/s, W/s)``.

        Returns:
            ``(B, 4 + C [+ 32], N)``: cxcywh in input pixels, sigmoid scores, mask coefficients.
        """
        b = feats[0].shape[0]
        x = torch.cat([f.view(b, f.shape[1], -1) for f in feats], 2)
        anchors, strides = make_anchors(feats, self.strides)  # (N, 2), (N, 1)
        box, cls = x[:, : 4 * self.reg_max], x[:, 4 * self.reg_max : 4 * self.reg_max + self.nc]
        dist = self.dfl(box)  # (B, 4, N) ltrb in grid units
        a = anchors.transpose(0, 1).unsqueeze(0)  # (1, 2, N)
        lt, rb = dist[:, :2], dist[:, 2:]
        x1y1, x2y2 = a - lt, a + rb
        cxcy = (x1y1 + x2y2) * 0.5
        wh = x2y2 - x1y1
        st = strides.transpose(0, 1).unsqueeze(0)  # (1, 1, N)
        parts = [torch.cat((cxcy, wh), 1) * st, cls.sigmoid()]
        if self.nm:
            parts.append(x[:, 4 * self.reg_max + self.nc :])
        return torch.cat(parts, 1)


def make_anchors(
    feats: list[torch.Tensor], strides: tuple[int, ...], offset: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points (grid-cell centres) of all levels (ultralytics ``make_anchors``).

    Args:
        feats: per-level maps ``(B, *, H/s, W/s)`` (only their shapes are used).
        strides: the strides of the levels.
        offset: cell-centre offset in grid units.

    Returns:
        ``(N, 2)`` float32 anchor points ``(x, y)`` in grid units of their level, and ``(N, 1)``
        float32 strides; level-major, row-major order.
    """
    points, stride_list = [], []
    for f, s in zip(feats, strides, strict=True):
        h, w = int(f.shape[2]), int(f.shape[3])
        sx = torch.arange(w, dtype=torch.float32, device=f.device) + offset
        sy = torch.arange(h, dtype=torch.float32, device=f.device) + offset
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).view(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(s), dtype=torch.float32, device=f.device))
    return torch.cat(points), torch.cat(stride_list)


def num_anchors(input_wh: tuple[int, int], strides: tuple[int, ...] = STRIDES) -> int:
    """Anchor count ``N = sum_s (H/s)(W/s)`` for an input ``(W, H)``."""
    return sum((input_wh[0] // s) * (input_wh[1] // s) for s in strides)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable and frozen, excluding buffers)."""
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, input_wh: tuple[int, int] | None = None) -> float:
    """GFLOPs of one image at ``input_wh`` in eval mode (2 x conv/linear MACs, as ultralytics reports).

    Counts with :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions, transposed
    convolutions, matmuls); element-wise ops are not counted.

    Args:
        model: a :class:`Detector` (or any module taking ``(1, 3, H, W)``).
        input_wh: input size ``(W, H)``; defaults to ``model.config.input_wh``.

    Returns:
        GFLOPs per image.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if input_wh is None:
        config = getattr(model, "config", None)
        if not isinstance(config, DetectorConfig):
            raise ValueError("expected input_wh for a model without a DetectorConfig, got None")
        input_wh = config.input_wh
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, input_wh[1], input_wh[0])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def model_summary(model: Detector) -> dict[str, Any]:
    """Parameters, GFLOPs and layout figures of a detector, for logs and the model card.

    Returns:
        Dict with ``params`` (int), ``gflops`` (float), ``channels``, ``num_anchors``, ``input_wh``.
    """
    return {
        "params": count_params(model),
        "gflops": round(count_gflops(model), 3),
        "channels": list(model.channels),
        "num_anchors": num_anchors(model.config.input_wh),
        "input_wh": list(model.config.input_wh),
    }
