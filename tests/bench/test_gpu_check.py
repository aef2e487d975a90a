"""The GPU check (bench/gpu_check.sh) end to end on the CPU (--dry-run), and its bad-input lines.

The dry run uses the detect stand-in at 160x96 so that it stays well under a minute on 2 cores;
``bench/gpu_check_model.py`` is checked on the bundled detector's architecture (the tiny detector)
separately.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.standin import build_standin

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _pins() -> dict[str, str]:
    """``bench/gpu_packages.txt``: package -> pinned version."""
    text = (ROOT / "bench" / "gpu_packages.txt").read_text()
    return dict(p.split("==") for p in text.split() if "==" in p)


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def test_dry_run_writes_every_phase(tmp_path: Path) -> None:
    model = build_standin(tmp_path / "standin.onnx", input_wh=(160, 96))
    out = tmp_path / "out"
    r = _run("--dry-run", "--out", str(out), "--", "--model", str(model))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] is True and res["schema"] == "streamdet.gpu_check/1"
    phases = res["phases"]
    assert list(phases) == ["setup", "engine", "decode", "pipeline_vs_engine", "streams", "pytest"]
    assert all(p["status"] == "ok" for p in phases.values()), {k: p.get("error") for k, p in phases.items()}
    assert {"fp32", "fp16"} <= set(phases["engine"]) and phases["engine"]["fp32"]["b2_fps"] > 0
    assert phases["decode"]["sw_yuv"]["frames"] > 0 and "cpu_ms_per_frame" in phases["decode"]["sw_rgb"]
    pv = phases["pipeline_vs_engine"]
    assert pv["batch"] == 2 and pv["no_decode_fps"] > 0 and pv["with_decode"]["frames"] > 0
    trial = phases["streams"]["trials"][0]
    assert trial["frames"] > 0 and {"latency_p50_ms", "latency_p99_ms", "latency_growth_ms", "ok"} <= set(trial)
    assert phases["pytest"]["mode"].startswith("skipped") and "-m" in phases["pytest"]["command"]
    assert set(res["goals"]) == {"streams_1080p30", "pipeline_vs_engine_b32"}
    md = (out / "results.md").read_text()
    assert "## Engine only" in md and "## Streams at real-time pace" in md
    assert "progress" not in r.stderr and "phase streams: ok" in r.stdout
    assert (out / "gpu_check.log").is_file()


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_no_gpu_without_dry_run_is_one_line(tmp_path: Path) -> None:
    r = _run("--out", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no NVIDIA GPU here") and "--dry-run" in lines[0]


def test_missing_wheel_folder_names_the_download(tmp_path: Path) -> None:
    r = _run("--dry-run", "--wheels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "wheel folder" in lines[0]
    assert "bash bench/gpu_wheels.sh" in lines[0]
    assert "pydantic==" in lines[0] and "pydantic-core==" in lines[0] and "av==" in lines[0]


def test_packed_site_is_unpacked_onto_the_path(tmp_path: Path) -> None:
    """``--wheels DIR`` with ``DIR/site.tar.xz`` (bench/gpu_wheels.sh): unpacked and first on PYTHONPATH."""
    import tarfile

    site = tmp_path / "site"
    (site / "streamdet_probe_pkg").mkdir(parents=True)
    (site / "streamdet_probe_pkg" / "__init__.py").write_text("")
    (tmp_path / "w").mkdir()
    with tarfile.open(tmp_path / "w" / "site.tar.xz", "w:xz") as tar:
        tar.add(site, arcname=".")
    r = _run("--dry-run", "--install-only", "--wheels", str(tmp_path / "w"), timeout=60,
             env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "unpacking" in r.stdout and "installed" in r.stdout
    assert (tmp_path / "streamdet-gpu-check-site" / "streamdet_probe_pkg" / "__init__.py").is_file()


def test_wheel_list_pins_the_pydantic_core_pydantic_needs() -> None:
    from importlib.metadata import requires, version

    pins = _pins()
    need = [r for r in requires("pydantic") or [] if r.startswith("pydantic-core") and "extra" not in r]
    assert need and need[0].replace(" ", "") == f"pydantic-core=={pins['pydantic-core']}"
    assert pins["pydantic"] == version("pydantic")
    # every runtime dependency the GPU machine lacks is in the list
    for dep in ("av", "pyzmq", "pycocotools", "pydantic-settings", "paho-mqtt", "fastapi", "uvicorn", "websockets"):
        assert dep in pins, dep


def test_the_carried_packages_need_nothing_the_gpu_machine_lacks() -> None:
    """Each carried package (installed here at its pinned version) needs only the image's or carried packages.

    fastapi 0.165 needs opentelemetry-api, which the image lacks: without it in the list, ``import
    fastapi`` failed there (seen on a Python 3.12 copy of the image's stack).
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins()
    image = [line.strip() for line in (ROOT / "bench" / "gpu_image_packages.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    have = {canonicalize_name(n) for n in [*image, *pins]}
    target = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
    checked, missing = 0, []
    for name, pin in pins.items():
        try:
            if version(name) != pin:
                continue
        except PackageNotFoundError:
            continue
        checked += 1
        for line in requires(name) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(target):
                continue
            if canonicalize_name(req.name) not in have:
                missing.append(f"{name}: {line}")
    assert checked >= 10  # the dev install has most of them at the pinned versions
    assert not missing


def test_pt2_builder_matches_onnxruntime_on_the_detector_architecture(tiny_detector_onnx: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check_model import build_pt2

    onnx_path = build_pt2(tiny_detector_onnx, tmp_path / "pt2")  # raises if it differs from ONNX Runtime
    assert onnx_path.with_suffix(".pt2").is_file() and onnx_path.with_suffix(".json").is_file()
