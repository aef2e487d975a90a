"""The pipeline benchmarks run end to end to their documented last line (a stand-in model: seconds, not figures)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.standin import bikes_path, build_standin

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script,args,last_line", [
    ("pipeline_bench.py", ["--frames", "40", "--rounds", "1", "--profile"],
     r"pipeline_vs_engine_only=\d+\.\d\d pipeline_vs_naive=\d+\.\d\d"),
    ("overhead_bench.py", ["--frames", "3000", "--rounds", "1"],  # >= 2 profile samples (0.5 s apart)
     r"overhead_ms_per_frame=\d+\.\d\d engine_ms_per_frame=\d+\.\d\d bound_vs_engine_only=\d\.\d\d"),
])
def test_bench_runs_to_its_last_line(tmp_path: Path, script: str, args: list[str], last_line: str) -> None:
    model = build_standin(tmp_path / "det.onnx", input_wh=(160, 96))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--video", str(bikes_path()),
                        "--model", str(model), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.fullmatch(last_line, r.stdout.strip().splitlines()[-1])


def test_overhead_bench_bad_setting_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead_bench.py"), "--video", str(bikes_path()),
                        "--set", "engine.bogus=1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == "error: unknown setting 'engine.bogus'\n"
