"""The streamdet engine file: a small self-describing header followed by a serialized TensorRT plan.

A TensorRT plan only runs on the TensorRT version and the GPU model (compute capability) that
built it, and a plan file tells neither in a form one can read before deserializing. The header
makes a mismatch a clear error (or a reason to rebuild) instead of a crash, and records what the
plan was built from.

Layout (little endian)::

    offset 0   8 bytes   MAGIC  b"SDTRTEN1"
    offset 8   4 bytes   uint32 header length L
    offset 12  L bytes   UTF-8 JSON object (:class:`EngineHeader`)
    offset 12+L          the serialized plan (``IHostMemory`` bytes from ``build_serialized_network``)

This module is pure Python (no TensorRT needed): it reads and writes headers and compares them
with a runtime description.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

MAGIC = b"SDTRTEN1"
HEADER_FORMAT = "streamdet.engine/1"
_PREFIX = struct.Struct("<8sI")
MAX_HEADER_BYTES = 1 << 20
"""A longer header length means the file is not an engine file (or is damaged)."""


class EngineFileError(ValueError):
    """An engine file is missing, not an engine file, or damaged; the message is ``<path>: <problem>``."""


class Precision(str, Enum):
    """Compute precision of a model or engine."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True, slots=True)
class BatchProfile:
    """The dynamic-batch optimization profile of an engine: ``min <= opt <= max``, all >= 1."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"expected 1 <= min <= opt <= max, got {self.min},{self.opt},{self.max}")

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """Parse ``"MIN,OPT,MAX"`` (or one number ``"N"`` for a fixed batch).

        Raises:
            ValueError: on anything else.
        """
        parts = [p.strip() for p in text.split(",")]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected MIN,OPT,MAX batch sizes, got {text!r}") from None
        if len(nums) == 1:
            nums = nums * 3
        if len(nums) != 3:
            raise ValueError(f"expected MIN,OPT,MAX batch sizes, got {text!r}")
        return cls(*nums)


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """What a plan depends on: the TensorRT version and the GPU.

    Attributes:
        tensorrt_version: ``tensorrt.__version__`` (e.g. ``"10.13.0.35"``).
        gpu_name: the CUDA device name (e.g. ``"NVIDIA H100 80GB HBM3"``).
        compute_capability: ``(major, minor)``.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


@dataclass(frozen=True, slots=True)
class EngineHeader:
    """The JSON header of an engine file.

    Attributes:
        tensorrt_version: TensorRT version that built the plan.
        gpu_name: GPU the plan was built on.
        compute_capability: its ``(major, minor)`` compute capability.
        precision: :class:`Precision` of the source ONNX (and so of the strongly typed network).
        onnx_sha256: SHA-256 hex digest of the source ONNX file.
        onnx_name: the source ONNX file name (for messages; not checked).
        input_name: the input tensor name.
        input_chw: input ``(channels, height, width)``.
        batch: the :class:`BatchProfile`.
        output_names: output tensor names, in ONNX order.
        format: :data:`HEADER_FORMAT`.
        extra: free-form build details (builder settings, timing cache, build seconds).
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: Precision
    onnx_sha256: str
    onnx_name: str
    input_name: str
    input_chw: tuple[int, int, int]
    batch: BatchProfile
    output_names: tuple[str, ...]
    format: str = HEADER_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.precision, Precision):
            raise ValueError(f"expected precision as Precision, got {self.precision!r}")
        if len(self.onnx_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.onnx_sha256):
            raise ValueError(f"expected a 64-digit lowercase hex onnx_sha256, got {self.onnx_sha256!r}")
        if len(self.input_chw) != 3 or min(self.input_chw) <= 0:
            raise ValueError(f"expected positive input_chw (C, H, W), got {self.input_chw}")
        if len(self.compute_capability) != 2:
            raise ValueError(f"expected compute_capability (major, minor), got {self.compute_capability}")
        if not self.output_names:
            raise ValueError("expected at least one output name, got none")
        if self.format != HEADER_FORMAT:
            raise ValueError(f"expected format {HEADER_FORMAT}, got {self.format}")

    @property
    def input_wh(self) -> tuple[int, int]:
        """Input size ``(width, height)`` in pixels."""
        return (self.input_chw[2], self.input_chw[1])

    @property
    def runtime(self) -> RuntimeInfo:
        """The :class:`RuntimeInfo` the plan was built for."""
        return RuntimeInfo(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def to_json(self) -> str:
        """Compact JSON of the header."""
        d = asdict(self)
        d["precision"] = self.precision.value
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EngineHeader:
        """Parse :meth:`to_json` output.

        Raises:
            ValueError: on malformed JSON or fields.
        """
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"expected a JSON header, got invalid JSON ({e.msg})") from e
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object header, got {type(d).__name__}")
        try:
            return cls(
                tensorrt_version=str(d["tensorrt_version"]),
                gpu_name=str(d["gpu_name"]),
                compute_capability=(int(d["compute_capability"][0]), int(d["compute_capability"][1])),
                precision=Precision(d["precision"]),
                onnx_sha256=str(d["onnx_sha256"]),
                onnx_name=str(d["onnx_name"]),
                input_name=str(d["input_name"]),
                input_chw=(int(d["input_chw"][0]), int(d["input_chw"][1]), int(d["input_chw"][2])),
                batch=BatchProfile(int(d["batch"]["min"]), int(d["batch"]["opt"]), int(d["batch"]["max"])),
                output_names=tuple(str(n) for n in d["output_names"]),
                format=str(d.get("format", "")),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"expected header fields, got a header missing or mistyping {e}") from e


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file.

    Raises:
        OSError: if the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_engine_file(path: str | os.PathLike[str], header: EngineHeader, plan: bytes | memoryview) -> None:
    """Write header and plan atomically (a temporary name, then rename).

    Args:
        path: destination (``MODEL.engine``).
        header: the :class:`EngineHeader`.
        plan: the serialized TensorRT plan (``bytes(IHostMemory)`` or a memoryview of it).

    Raises:
        ValueError: if the plan is empty.
        OSError: if the file cannot be written (no file is left behind).
    """
    if len(memoryview(plan)) == 0:
        raise ValueError("expected a non-empty serialized plan, got 0 bytes")
    p = Path(path)
    meta = header.to_json().encode("utf-8")
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, len(meta)))
            f.write(meta)
            f.write(plan)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_prefix(f: Any, p: Path) -> EngineHeader:
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise EngineFileError(f"{p}: not a streamdet engine file (too short)")
    magic, n = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise EngineFileError(f"{p}: not a streamdet engine file (bad magic {magic!r}; build it with "
                              "python -m training.build_engine)")
    if n > MAX_HEADER_BYTES:
        raise EngineFileError(f"{p}: damaged engine file (header length {n})")
    raw = f.read(n)
    if len(raw) != n:
        raise EngineFileError(f"{p}: damaged engine file (header truncated)")
    try:
        return EngineHeader.from_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise EngineFileError(f"{p}: damaged engine header ({e})") from e


def read_engine_header(path: str | os.PathLike[str]) -> EngineHeader:
    """Read only the header of an engine file.

    Raises:
        EngineFileError: if the file is missing, not an engine file, or its header is damaged.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return _read_prefix(f, p)
    except FileNotFoundError as e:
        raise EngineFileError(f"{p}: engine file not found") from e
    except IsADirectoryError as e:
        raise EngineFileError(f"{p}: is a directory, not an engine file") from e


def read_engine_file(path: str | os.PathLike[str]) -> tuple[EngineHeader, bytes]:
    """Read the header and the plan.

    Returns:
        ``(header, plan bytes)``.

    Raises:
        EngineFileError: if the file is missing or damaged, or holds no plan.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            header = _read_prefix(f, p)
            plan = f.read()
    except FileNotFoundError as e:
        raise EngineFileError(f"{p}: engine file not found") from e
    except IsADirectoryError as e:
        raise EngineFileError(f"{p}: is a directory, not an engine file") from e
    if not plan:
        raise EngineFileError(f"{p}: damaged engine file (no plan after the header)")
    return header, plan


def runtime_mismatches(header: EngineHeader, runtime: RuntimeInfo) -> list[str]:
    """What differs between the runtime a plan was built for and the current one.

    TensorRT plans are tied to the exact TensorRT version and, unless built hardware-compatible,
    to the GPU's compute capability; the GPU name is compared too (a different SKU of the same
    capability runs the plan, but its tactics were timed elsewhere).

    Args:
        header: the engine's header.
        runtime: the current TensorRT version and GPU.

    Returns:
        Human-readable differences (``"TensorRT 10.13.0.35 (engine) vs 10.9.0.34 (here)"``), empty if none.
    """
    out = []
    if header.tensorrt_version != runtime.tensorrt_version:
        out.append(f"TensorRT {header.tensorrt_version} (engine) vs {runtime.tensorrt_version} (here)")
    if tuple(header.compute_capability) != tuple(runtime.compute_capability):
        cc_e = ".".join(map(str, header.compute_capability))
        cc_h = ".".join(map(str, runtime.compute_capability))
        out.append(f"compute capability {cc_e} (engine) vs {cc_h} (here)")
    if header.gpu_name != runtime.gpu_name:
        out.append(f"GPU {header.gpu_name!r} (engine) vs {runtime.gpu_name!r} (here)")
    return out
