"""Engine-file header (pure Python): round trip, damage, runtime mismatches, batch profiles."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from engines.engine_file import (
    MAGIC,
    BatchProfile,
    EngineFileError,
    EngineHeader,
    Precision,
    RuntimeInfo,
    file_sha256,
    read_engine_file,
    read_engine_header,
    runtime_mismatches,
    write_engine_file,
)

HEADER = EngineHeader(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                      precision=Precision.INT8, onnx_sha256="ab" * 32, onnx_name="detector.int8.onnx",
                      input_name="images", input_chw=(3, 384, 640), batch=BatchProfile(1, 8, 32),
                      output_names=("output0",), extra={"build_seconds": 12.5})


def test_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "m.engine"
    write_engine_file(p, HEADER, b"\x00plan\xff" * 10)
    assert read_engine_header(p) == HEADER
    header, plan = read_engine_file(p)
    assert header == HEADER and plan == b"\x00plan\xff" * 10
    assert header.input_wh == (640, 384)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("content, match", [
    (b"", "too short"),
    (b"NOTANENG" + b"\x00" * 20, "bad magic"),
    (MAGIC + (50).to_bytes(4, "little") + b"{}", "header truncated"),
    (MAGIC + (2).to_bytes(4, "little") + b"{}" + b"plan", "damaged engine header"),
    (MAGIC + (4).to_bytes(4, "little") + b"\xff\xfe{}" + b"plan", "damaged engine header"),
    (MAGIC + (1 << 30).to_bytes(4, "little"), "header length"),
])
def test_damaged_files(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "bad.engine"
    p.write_bytes(content)
    with pytest.raises(EngineFileError, match=match) as e:
        read_engine_file(p)
    assert str(p) in str(e.value)


def test_missing_plan_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "m.engine"
    meta = HEADER.to_json().encode()
    p.write_bytes(MAGIC + len(meta).to_bytes(4, "little") + meta)
    assert read_engine_header(p) == HEADER
    with pytest.raises(EngineFileError, match="no plan"):
        read_engine_file(p)
    with pytest.raises(EngineFileError, match="not found"):
        read_engine_header(tmp_path / "nope.engine")
    with pytest.raises(ValueError, match="non-empty"):
        write_engine_file(p, HEADER, b"")


@pytest.mark.parametrize("runtime, expected", [
    (RuntimeInfo("10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0)), []),
    (RuntimeInfo("10.9.0.34", "NVIDIA H100 80GB HBM3", (9, 0)), ["TensorRT 10.13.0.35 (engine) vs 10.9.0.34 (here)"]),
    (RuntimeInfo("10.13.0.35", "NVIDIA A100-SXM4-40GB", (8, 0)),
     ["compute capability 9.0 (engine) vs 8.0 (here)",
      "GPU 'NVIDIA H100 80GB HBM3' (engine) vs 'NVIDIA A100-SXM4-40GB' (here)"]),
    (RuntimeInfo("10.13.0.35", "NVIDIA H100 PCIe", (9, 0)),
     ["GPU 'NVIDIA H100 80GB HBM3' (engine) vs 'NVIDIA H100 PCIe' (here)"]),
])
def test_runtime_mismatches(runtime: RuntimeInfo, expected: list[str]) -> None:
    assert runtime_mismatches(HEADER, runtime) == expected


@pytest.mark.parametrize("text, expected", [
    ("1,8,32", BatchProfile(1, 8, 32)), (" 4 , 4 ,4", BatchProfile(4, 4, 4)), ("16", BatchProfile(16, 16, 16)),
])
def test_batch_profile_parse(text: str, expected: BatchProfile) -> None:
    assert BatchProfile.parse(text) == expected


@pytest.mark.parametrize("text", ["", "1,2", "a,b,c", "8,4,16", "0,1,2", "1,2,3,4"])
def test_batch_profile_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        BatchProfile.parse(text)


@pytest.mark.parametrize("change, match", [
    ({"onnx_sha256": "xyz"}, "onnx_sha256"),
    ({"input_chw": (3, 0, 640)}, "input_chw"),
    ({"output_names": ()}, "output name"),
    ({"format": "other/2"}, "format"),
])
def test_header_validation(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        replace(HEADER, **change)  # type: ignore[arg-type]


def test_file_sha256(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
