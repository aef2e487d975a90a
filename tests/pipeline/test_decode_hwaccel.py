"""NVDEC decode through PyAV's hwaccel (``decode.hwaccel``): settings, start-up failure, fallback.

Without an NVIDIA driver (this machine) the CUDA device cannot open: the run must stop at the
start-up probe with one error line naming the source, never decode in software unless
``decode.hwaccel_fallback`` asks for it. The ``gpu``-marked test compares NVDEC with software
decode on a GPU machine.
"""


import numpy as np
import pytest

from pipeline.settings import SettingsError, load_settings
from pipeline.sources.ffmpeg import open_input
from pipeline.sources.hwaccel import hwaccel_problem
from pipeline.sources.options import HWAccelMode, HWAccelOptions
from pipeline.sources.probe import SourceError, probe_source
from tests.helpers.cli import run
from tests.helpers.standin import bikes_path

CUDA = HWAccelOptions(mode=HWAccelMode.CUDA)


def _nvdec_problem() -> str:
    return hwaccel_problem(None, CUDA)


needs_no_nvdec = pytest.mark.skipif(not _nvdec_problem(), reason="NVDEC works here: nothing fails")


def _base(model, *extra):
    return ["--model", str(model), "--quiet", "--publish", "none", *extra]


# ---------------------------------------------------------------- settings
def test_settings_default_flag_env_and_bad_value(monkeypatch):
    from run_pipeline import build_parser, overrides_from_args

    d = load_settings().decode
    assert (d.hwaccel, d.hwaccel_device, d.hwaccel_fallback) == (HWAccelMode.NONE, 0, False)
    assert not d.hwaccel_options().enabled
    flags = overrides_from_args(build_parser().parse_args(["--hwaccel", "cuda"]))
    assert flags == {"decode": {"hwaccel": "cuda"}}
    assert load_settings(overrides=flags).decode.hwaccel is HWAccelMode.CUDA
    monkeypatch.setenv("STREAMDET_DECODE__HWACCEL", "cuda")
    monkeypatch.setenv("STREAMDET_DECODE__HWACCEL_DEVICE", "1")
    monkeypatch.setenv("STREAMDET_DECODE__HWACCEL_FALLBACK", "true")
    d = load_settings().decode
    assert d.hwaccel_options() == HWAccelOptions(mode=HWAccelMode.CUDA, device=1, fallback=True)
    assert load_settings(overrides={"decode": {"hwaccel": "none"}}).decode.hwaccel is HWAccelMode.NONE  # flag > env
    with pytest.raises(SettingsError, match="decode.hwaccel") as e:
        load_settings(overrides={"decode": {"hwaccel": "nvdec"}})
    assert "\n" not in str(e.value)


def test_options():
    assert HWAccelOptions().av_hwaccel() is None
    assert CUDA.setting == "decode.hwaccel=cuda"
    assert HWAccelOptions(mode=HWAccelMode.CUDA, device=2).setting == "decode.hwaccel=cuda, decode.hwaccel_device=2"
    assert CUDA.software() == HWAccelOptions()
    with pytest.raises(ValueError, match="device"):
        HWAccelOptions(device=-1)


# ---------------------------------------------------------------- probe (in-process)
@needs_no_nvdec
def test_probe_fails_naming_the_source():
    src = str(bikes_path())
    with pytest.raises(SourceError) as e:
        probe_source(src, "bikes", hwaccel=CUDA)
    msg = str(e.value)
    assert msg.startswith(f"{src}: hardware decode (decode.hwaccel=cuda) unavailable: ")
    assert "decode.hwaccel_fallback=true" in msg and "\n" not in msg


@needs_no_nvdec
def test_probe_live_url_checks_the_device_and_redacts():
    with pytest.raises(SourceError, match="decode.hwaccel=cuda") as e:
        probe_source("rtsp://user:secret@127.0.0.1:1/stream", "cam", hwaccel=CUDA)
    assert str(e.value).startswith("rtsp://***@127.0.0.1:1/stream: ") and "secret" not in str(e.value)


@needs_no_nvdec
def test_probe_fallback_is_software_with_a_warning():
    info = probe_source(str(bikes_path()), "bikes", hwaccel=HWAccelOptions(mode=HWAccelMode.CUDA, fallback=True))
    assert not info.hwaccel.enabled and info.hwaccel.fallback
    assert info.warning.startswith(f"{bikes_path()}: hardware decode (decode.hwaccel=cuda) unavailable")
    assert info.warning.endswith("decoding in software (decode.hwaccel_fallback=true)")
    assert (info.frame_hw, info.frames) == ((272, 640), 250)


def test_software_probe_unchanged():
    info = probe_source(str(bikes_path()), "bikes")
    assert info.hwaccel == HWAccelOptions() and info.warning == ""


# ---------------------------------------------------------------- the command line
@needs_no_nvdec
@pytest.mark.parametrize("flags, env", [(["--hwaccel", "cuda"], {}), ([], {"STREAMDET_DECODE__HWACCEL": "cuda"})],
                         ids=["flag", "env"])
def test_cli_fails_with_one_line_before_any_frame(standin_model, tmp_path, flags, env):
    src = str(bikes_path())
    out_path = tmp_path / "o.jsonl"
    rc, out, err = run(_base(standin_model, "--source", src, "--max-frames", "3", "--jsonl", str(out_path), *flags),
                        extra_env=env)
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: hardware decode (decode.hwaccel=cuda)"), err
    assert out == "" and not out_path.exists()  # nothing decoded, nothing written
    assert "Traceback" not in err


@needs_no_nvdec
def test_cli_live_source_fails_redacted(standin_model):
    rc, out, err = run(_base(standin_model, "--source", "rtsp://user:secret@127.0.0.1:1/stream", "--hwaccel", "cuda"))
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: rtsp://***@127.0.0.1:1/stream: hardware decode"), err
    assert "secret" not in out + err


@needs_no_nvdec
def test_cli_fallback_decodes_in_software_with_one_warning(standin_model, tmp_path):
    out_path = tmp_path / "o.jsonl"
    rc, out, err = run(_base(standin_model, "--source", str(bikes_path()), "--max-frames", "3", "--hwaccel", "cuda",
                              "--set", "decode.hwaccel_fallback=true", "--jsonl", str(out_path)))
    assert rc == 0, err
    assert out.startswith("frames=3 ")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {bikes_path()}: hardware decode"), err
    assert lines[0].endswith("decoding in software (decode.hwaccel_fallback=true)")
    assert len(out_path.read_text().splitlines()) == 4  # 3 frames + EOS


# ---------------------------------------------------------------- on a GPU
def _frames(hwaccel: HWAccelOptions, n: int) -> list[np.ndarray]:
    with open_input(str(bikes_path()), hwaccel=hwaccel, timeout=10.0) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.is_hwaccel is hwaccel.enabled
        out = []
        for frame in container.decode(stream):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return out


@pytest.mark.gpu
@pytest.mark.skipif(bool(_nvdec_problem()), reason="no NVDEC here (no NVIDIA driver / GPU)")
def test_nvdec_matches_software_decode(standin_model):
    info = probe_source(str(bikes_path()), "bikes", hwaccel=CUDA)
    assert info.hwaccel == CUDA and info.warning == ""
    hw, sw = _frames(CUDA, 8), _frames(HWAccelOptions(), 8)
    assert len(hw) == len(sw) == 8
    for a, b in zip(hw, sw, strict=True):
        assert a.shape == b.shape == (272, 640, 3) and a.dtype == np.uint8
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 1.0  # H.264 decode is exact; NV12 vs I420
    rc, out, err = run(_base(standin_model, "--source", str(bikes_path()), "--max-frames", "8", "--hwaccel", "cuda"))
    assert rc == 0 and err == "", err
    assert out.startswith("frames=8 ")
