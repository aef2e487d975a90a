"""OpenCV threads of the light stages: one when the engine runs on the CPU, OpenCV's default otherwise."""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import zmq

from pipeline.chains import light_stage_opencv_threads, prepare_run, stage_specs
from pipeline.settings import DEFAULT_MODEL
from pipeline.stages.base import Stage, StageSpec, StatusReporter, stage_main
from pipeline.stages.engine import EngineSpec
from pipeline.transport import StageFlags, ipc_endpoints
from streamdet.messages import StageName
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path


class _ReportThreads(Stage):
    """Writes the process's OpenCV thread count to a file, then ends."""

    name = StageName.POSTPROCESS

    def __init__(self, out: str) -> None:
        self.out = out

    def start(self) -> None:
        import cv2

        Path(self.out).write_text(str(cv2.getNumThreads()))

    def run(self) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class _ReportSpec(StageSpec):
    out: str

    stage_name: ClassVar[StageName] = StageName.POSTPROCESS

    def build(self, *, ctx: zmq.Context[Any], flags: StageFlags, status: StatusReporter) -> Stage:
        return _ReportThreads(self.out)


def _threads_in_stage_process(tmp_path: Path, opencv_threads: int) -> int:
    ctx = zmq.Context()
    control = f"ipc://{tmp_path}/control"
    pull = ctx.socket(zmq.PULL)
    pull.bind(control)
    try:
        out = tmp_path / f"threads{opencv_threads}"
        spec = _ReportSpec(control=control, opencv_threads=opencv_threads, out=str(out))
        mpctx = mp.get_context("spawn")
        events = [mpctx.Event() for _ in range(3)]
        proc = mpctx.Process(target=stage_main, args=(spec, *events, os.getpid()))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        return int(out.read_text())
    finally:
        pull.close(0)
        ctx.term()


def test_stage_main_sets_the_opencv_threads_of_its_process(tmp_path):
    assert _threads_in_stage_process(tmp_path, 1) == 1
    assert _threads_in_stage_process(tmp_path, 0) == os.cpu_count()  # OpenCV's default: one per core


@pytest.mark.parametrize("placement", ["separate", "with_preprocess"])
def test_light_stages_get_one_opencv_thread_with_the_engine_on_the_cpu(tmp_path, placement):
    s = settings_with({"sources": [str(bikes_path())], "model": str(DEFAULT_MODEL)}, decode__placement=placement)
    specs = stage_specs(s, prepare_run(s), ipc_endpoints(tmp_path, ["pool"]), ["pool"], ["tensors"])
    light = [sp for sp in specs if not isinstance(sp, EngineSpec)]
    assert {type(sp).__name__ for sp in light} >= {"PostprocessSpec"}
    assert len(light) == (3 if placement == "separate" else 2)  # postprocess, preprocess (+ decode)
    assert [sp.opencv_threads for sp in light] == [1] * len(light)
    assert [sp.opencv_threads for sp in specs if isinstance(sp, EngineSpec)] == [0]


@pytest.mark.parametrize(("device", "expected"), [("cpu", 1), ("cuda", 0), ("cuda:1", 0)])
def test_opencv_threads_follow_the_engine_device(device, expected):
    assert light_stage_opencv_threads(settings_with({}, engine__device=device)) == expected
