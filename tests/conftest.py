"""Test-wide settings and the model fixtures every test folder shares.

Property-based tests are derandomized in CI, so a run is reproducible. The model fixtures are
session-scoped: each stand-in is built once per test run (helpers in :mod:`tests.helpers`).

The project's bytecode caches are written once before the tests (``compileall``): the tests start
a few hundred stage processes, and where ``PYTHONDONTWRITEBYTECODE`` is set (as on the development machine)
each of them would otherwise compile the project's modules from source again (measured: 0.5 s of
CPU per pipeline run of 4 frames, 8 % of it).
"""

from __future__ import annotations

import compileall
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline.slotpool import reap_orphan_pools
from tests.helpers.standin import build_standin

ROOT = Path(__file__).resolve().parents[1]
for _package in ("streamdet", "pipeline", "engines", "training", "tests"):
    compileall.compile_dir(ROOT / _package, quiet=1)

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="module")
def _no_orphan_blocks_across_modules() -> Iterator[None]:
    """Remove the shared memory of runs a test module killed whole (a SIGKILLed runner, a Ray node) when it ends.

    Otherwise the first run a later module starts 60 s on reaps it and says so in a ``note:`` line
    (:func:`~pipeline.slotpool.reap_orphan_pools`), which a test counting its own run's stderr
    lines takes for its own: ``test_cli_fallback_decodes_in_software_with_one_warning`` failed so
    once the suite had grown. Only blocks no live process maps are removed.
    """
    yield
    reap_orphan_pools(min_age_s=0.0)


@pytest.fixture(scope="session")
def standin_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The detect stand-in ONNX (ultralytics detect layout, 640x384, 3 classes) with its card."""
    return build_standin(tmp_path_factory.mktemp("standin") / "standin.onnx")


@pytest.fixture(scope="session")
def tiny_detector_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained-architecture detector exported to ONNX with its card (needs PyTorch)."""
    pytest.importorskip("torch")
    from tests.helpers.tiny_detector import tiny_detector

    path, _ = tiny_detector(tmp_path_factory.mktemp("tiny"))
    return path


@pytest.fixture(scope="session")
def tiny_detector_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny detector exported to ONNX and a ``.pt2`` program beside it (needs PyTorch)."""
    pytest.importorskip("torch")
    from tests.helpers.tiny_detector import tiny_detector

    path, _ = tiny_detector(tmp_path_factory.mktemp("tiny_pt2"), pt2=True)
    return path
