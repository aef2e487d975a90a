"""A small U-Net-style semantic segmenter: per-pixel class logits at the model input resolution.

The encoder is a plain stack of 3x3 convolution + BatchNorm + ReLU stages, each halving the
resolution (strides 2, 4, 8, 16, 32), the later blocks of a stage residual. The deepest stage gets a
global-average-pool context term (as in ParseNet / the image-pooling branch of DeepLabv3's ASPP).
The decoder, level by level down to ``decoder_stride``, projects the coarser feature to the skip's
width (1x1 convolution + BatchNorm), upsamples it by 2 (bilinear), adds the encoder feature of that
stride (a U-Net skip connection, merged by addition as in FPN, which is cheaper than concatenation)
and mixes them with a 3x3 convolution; a 1x1 head gives the logits, which are upsampled bilinearly
to the input resolution inside the model.

References: Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation"
(MICCAI 2015); Long et al., "Fully Convolutional Networks for Semantic Segmentation" (CVPR 2015);
Lin et al., "Feature Pyramid Networks for Object Detection" (CVPR 2017); Liu et al., "ParseNet:
Looking Wider to See Better" (2015).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamdet.constants import DEFAULT_INPUT_WH
from training.config_dict import PlainConfig, check_known_keys, plain_dict

"""Model input size ``(width, height)`` of the bundled semantic model (the detector's)."""


@dataclass(frozen=True)
class SemanticNetConfig(PlainConfig):
    """Architecture of a :class:`SemanticNet`.

    Attributes:
        num_classes: output channels ``C`` (background + object classes).
        input_wh: model input size ``(width, height)``; both must be multiples of the deepest stride.
        widths: channels of each encoder stage; stage ``i`` has stride ``2 ** (i + 1)``.
        depths: 3x3 convolutions per stage (the first one strided), each >= 1.
        decoder_stride: stride of the logits before the final bilinear upsample (2, 4, ... up to
            half the deepest stride).
        context: add a global-average-pool context term at the deepest stage.
    """

    num_classes: int = 11
    input_wh: tuple[int, int] = DEFAULT_INPUT_WH
    widths: tuple[int, ...] = (16, 32, 64, 96, 128)
    depths: tuple[int, ...] = (1, 2, 2, 2, 2)
    decoder_stride: int = 4
    context: bool = True

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"expected num_classes >= 2, got {self.num_classes}")
        if len(self.widths) < 2 or len(self.widths) != len(self.depths):
            raise ValueError(f"expected >= 2 stages with one depth each, got widths={self.widths} "
                             f"depths={self.depths}")
        if min(self.widths) < 1 or min(self.depths) < 1:
            raise ValueError(f"expected positive widths and depths, got {self.widths} {self.depths}")
        deepest = self.max_stride
        if self.decoder_stride not in [2**k for k in range(1, len(self.widths))]:
            raise ValueError(f"expected decoder_stride a power of 2 in [2, {deepest // 2}], got {self.decoder_stride}")
        w, h = self.input_wh
        if w <= 0 or h <= 0 or w % deepest or h % deepest:
            raise ValueError(f"expected input_wh multiples of the deepest stride {deepest}, got {self.input_wh}")

    @property
    def max_stride(self) -> int:
        """Stride of the deepest encoder stage."""
        return int(2 ** len(self.widths))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SemanticNetConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        check_known_keys(d, ("num_classes", "input_wh", "widths", "depths", "decoder_stride", "context"),
                         "model config")
        kw: dict[str, Any] = {k: tuple(int(x) for x in v) if isinstance(v, list | tuple) else v for k, v in d.items()}
        return cls(**kw)


class ConvBNReLU(nn.Sequential):
    """3x3 (or ``k`` x ``k``) convolution, BatchNorm, ReLU; ``(B, c_in, H, W) -> (B, c_out, H/s, W/s)``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, k: int = 3) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Residual(nn.Module):
    """``x + f(x)`` around a shape-preserving block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block and add its input."""
        return x + self.block(x)


class GlobalContext(nn.Module):
    """Adds a per-image context vector: ``x + relu(W @ mean_hw(x) + b)`` broadcast over ``H, W``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the context vector; ``(B, C, H, W) -> (B, C, H, W)``."""
        return x + F.relu(self.proj(x.mean(dim=(2, 3), keepdim=True)))


class SemanticNet(nn.Module):
    """U-Net-style semantic segmenter.

    Input: ``(B, 3, H, W)`` float32 RGB, ``pixel / 255``, letterboxed to ``config.input_wh``
    (other sizes work if ``H`` and ``W`` are multiples of ``config.max_stride``).
    Output: ``(B, num_classes, H, W)`` float32 logits (class 0 = background).

    Args:
        config: the architecture.
    """

    def __init__(self, config: SemanticNetConfig) -> None:
        super().__init__()
        self.config = config
        stages: list[nn.Module] = []
        c = 3
        for width, depth in zip(config.widths, config.depths):
            blocks: list[nn.Module] = [ConvBNReLU(c, width, stride=2)]
            blocks += [Residual(ConvBNReLU(width, width)) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            c = width
        self.stages = nn.ModuleList(stages)
        self.context = GlobalContext(c) if config.context else nn.Identity()
        # decoder levels from stride max/2 down to decoder_stride; level i has stride 2 ** (i + 1)
        first = len(config.widths) - 2
        last = int(np.log2(config.decoder_stride)) - 1
        self.skip_levels = list(range(first, last - 1, -1))
        lateral: list[nn.Module] = []
        decoder: list[nn.Module] = []
        for i in self.skip_levels:
            # 1x1 projection before the upsample (cheaper than after; both are linear)
            lateral.append(nn.Sequential(nn.Conv2d(c, config.widths[i], 1, bias=False),
                                         nn.BatchNorm2d(config.widths[i])))
            decoder.append(ConvBNReLU(config.widths[i], config.widths[i]))
            c = config.widths[i]
        self.lateral = nn.ModuleList(lateral)
        self.decoder = nn.ModuleList(decoder)
        self.head = nn.Conv2d(c, config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` float32 in ``[0, 1]`` to ``(B, num_classes, H, W)`` logits."""
        feats: list[torch.Tensor] = []
        y = x
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        y = self.context(y)
        for i, lateral, block in zip(self.skip_levels, self.lateral, self.decoder):
            y = F.interpolate(lateral(y), scale_factor=2.0, mode="bilinear", align_corners=False)
            y = block(y + feats[i])
        y = self.head(y)
        return F.interpolate(y, scale_factor=float(self.config.decoder_stride), mode="bilinear",
                             align_corners=False)


class SemanticArch(str, Enum):
    """Architecture of a semantic checkpoint (``model_config["arch"]``; absent means ``UNET``)."""

    UNET = "unet"
    """:class:`SemanticNet`: the plain U-Net above, trained from random weights."""
    PAN_FCN = "pan_fcn"
    """:class:`PanFcnNet`: the detector's backbone and top-down FPN with an FCN head."""


@dataclass(frozen=True)
class PanFcnConfig(PlainConfig):
    """Architecture of a :class:`PanFcnNet`.

    Attributes:
        num_classes: output channels ``C`` (background + object classes).
        input_wh: model input size ``(width, height)``, multiples of 32.
        width: the detector's backbone widths at strides 2/4/8/16/32 (see
            :class:`training.model.DetectorConfig`), before ``width_mult``.
        width_mult: channel multiplier, as the detector's.
        depth: Bottlenecks per C2f, as the detector's.
        depth_mult: depth multiplier, as the detector's.
        head_channels: channels of the FCN head (stride 8 and stride 4 convolutions).
    """

    num_classes: int = 11
    input_wh: tuple[int, int] = DEFAULT_INPUT_WH
    width: tuple[int, ...] = (16, 32, 64, 96, 128)
    width_mult: float = 1.0
    depth: tuple[int, ...] = (1, 1, 1, 1)
    depth_mult: float = 1.0
    head_channels: int = 48

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"expected num_classes >= 2, got {self.num_classes}")
        if len(self.width) != 5 or len(self.depth) != 4:
            raise ValueError(f"expected 5 widths and 4 depths, got {self.width} and {self.depth}")
        w, h = self.input_wh
        if w <= 0 or h <= 0 or w % 32 or h % 32:
            raise ValueError(f"expected input_wh multiples of 32, got {self.input_wh}")
        if self.head_channels < 1:
            raise ValueError(f"expected head_channels >= 1, got {self.head_channels}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form for checkpoints (lists instead of tuples), with ``arch``."""
        return {"arch": SemanticArch.PAN_FCN.value, **plain_dict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PanFcnConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        d = {k: v for k, v in d.items() if k != "arch"}
        check_known_keys(d, cls.__dataclass_fields__, "model config")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()}
        return cls(**kw)

    def detector_config(self) -> Any:
        """The :class:`training.model.DetectorConfig` whose backbone and neck this model shares."""
        from training.model import DetectorConfig

        return DetectorConfig(num_classes=1, width=self.width, width_mult=self.width_mult, depth=self.depth,
                              depth_mult=self.depth_mult, input_wh=self.input_wh)


class PanFcnNet(nn.Module):
    """Semantic segmenter on the detector's backbone: C2f backbone + SPPF, top-down FPN, FCN head.

    The backbone and the top-down path of the neck are the modules of
    :class:`training.model.Detector` under the same names (prefixed ``body.``), so a trained
    detector's weights initialise them (``python -m training.train --task semantic --arch pan_fcn
    --init DETECTOR.pt``); the detector's bottom-up path and heads are not built. The head, FCN-style
    with one U-Net skip: a 3x3 Conv on the stride-8 FPN output, 2x bilinear upsample, plus a 1x1
    projection of the stride-4 backbone feature, a 3x3 Conv, a 1x1 classifier, and a 4x bilinear
    upsample of the logits to the input resolution.

    Input: ``(B, 3, H, W)`` float32 RGB ``pixel / 255``, ``H`` and ``W`` multiples of 32.
    Output: ``(B, num_classes, H, W)`` float32 logits (class 0 = background).

    References: Long et al., "Fully Convolutional Networks for Semantic Segmentation" (CVPR 2015);
    Kirillov et al., "Panoptic Feature Pyramid Networks" (CVPR 2019), a semantic head on a
    detector's FPN.

    Args:
        config: the architecture.
    """

    def __init__(self, config: PanFcnConfig) -> None:
        super().__init__()
        from training.model import Conv, Detector

        self.config = config
        body = Detector(config.detector_config())
        for name in ("bu3", "bu4", "bu4d", "bu5", "box_branch", "cls_branch", "mask_branch", "proto", "dfl"):
            if hasattr(body, name):
                delattr(body, name)
        self.body = body
        w = body.channels
        c = config.head_channels
        self.head8 = Conv(w[2], c, 3)
        self.lateral4 = Conv(w[1], c, 1)
        self.head4 = Conv(c, c, 3)
        self.classifier = nn.Conv2d(c, config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` float32 in ``[0, 1]`` to ``(B, num_classes, H, W)`` logits."""
        b = self.body
        s4 = b.c2f1(b.down1(b.stem(x)))
        p3 = b.c2f2(b.down2(s4))
        p4 = b.c2f3(b.down3(p3))
        p5 = b.sppf(b.c2f4(b.down4(p4)))
        t4 = b.td4(torch.cat((b.up(p5), p4), 1))
        n3 = b.td3(torch.cat((b.up(t4), p3), 1))
        y = F.interpolate(self.head8(n3), scale_factor=2.0, mode="bilinear", align_corners=False)
        y = self.head4(y + self.lateral4(s4))
        return F.interpolate(self.classifier(y), scale_factor=4.0, mode="bilinear", align_corners=False)


SemanticConfig = SemanticNetConfig | PanFcnConfig


def semantic_config_from_dict(d: dict[str, Any]) -> SemanticConfig:
    """The config of a checkpoint's ``model_config`` (its ``arch``, a :class:`SemanticArch` value).

    Raises:
        ValueError: on an unknown ``arch``, unknown keys or invalid values.
    """
    try:
        arch = SemanticArch(d.get("arch", SemanticArch.UNET.value))
    except ValueError as e:
        raise ValueError(f"expected arch in {[a.value for a in SemanticArch]}, got {d.get('arch')!r}") from e
    if arch is SemanticArch.PAN_FCN:
        return PanFcnConfig.from_dict(d)
    return SemanticNetConfig.from_dict({k: v for k, v in d.items() if k != "arch"})


def build_semantic_model(config: SemanticConfig) -> nn.Module:
    """The model of a config: :class:`SemanticNet` or :class:`PanFcnNet`."""
    if isinstance(config, PanFcnConfig):
        return PanFcnNet(config)
    return SemanticNet(config)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights and biases; BatchNorm running statistics excluded)."""
    return int(sum(p.numel() for p in model.parameters()))


def gflops(model: nn.Module, input_wh: tuple[int, int]) -> float:
    """GFLOPs (2 x multiply-accumulates of convolutions and matrix products) for one image.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a ``(1, 3, H, W)`` input, in
    eval mode (the model's mode is restored afterwards).

    Args:
        model: the model.
        input_wh: input size ``(width, height)``.

    Returns:
        GFLOPs per image.
    """
    from training.model import count_gflops

    return float(count_gflops(model, input_wh))
