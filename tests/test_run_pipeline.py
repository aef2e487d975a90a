"""The command line: exit codes, one error line per failure, signals, no orphan processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.select import cuda_available, tensorrt_available
from pipeline.slotpool import reap_orphan_pools
from tests.helpers.cli import ROOT, SCRIPT, assert_no_orphans, free_port, hang_up, processes_with, run, start
from tests.helpers.standin import bikes_path
from tests.helpers.standin_seg import build_segment_standin, build_semantic_standin, segment_card


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """bikes.mp4 remuxed with the index first (faststart), then cut in half: about 114 frames decode."""
    import av

    d = tmp_path_factory.mktemp("v")
    full = d / "faststart.mp4"
    with av.open(str(bikes_path())) as inp, av.open(str(full), "w", options={"movflags": "faststart"}) as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        for pk in inp.demux(s):
            if pk.dts is not None:
                pk.stream = o
                out.mux(pk)
    data = full.read_bytes()
    cut = d / "truncated.mp4"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def base(model, *extra):
    return ["--model", str(model), "--quiet", "--publish", "none", *extra]


def test_help_documents_every_setting():
    code, out, _ = run(["--help"])
    assert code == 0
    for text in ("--source", "--video-out", "--max-frames", "STREAMDET_ENGINE__INTRA_OP_THREADS",
                 "sinks.publish_wait_subscribers", "exit status"):
        assert text in out


def test_runs_and_reports_outputs(standin_model, tmp_path):
    port = free_port()
    code, out, err = run(base(standin_model, "--source", str(bikes_path()), "--max-frames", "8", "--publish",
                              f"tcp://127.0.0.1:{port}", "--jsonl", str(tmp_path / "o.jsonl"),
                              "--video-out", str(tmp_path / "o.mp4")))
    assert code == 0, err
    assert err == ""
    first = out.splitlines()[0]
    assert first.startswith("frames=8 fps=") and "detections=" in first
    assert f"tcp://127.0.0.1:{port}" in out and str(tmp_path / "o.jsonl") in out and str(tmp_path / "o.mp4") in out
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 9


@pytest.mark.parametrize(
    "case,code,needle",
    [
        ("missing", 1, "no such file"),
        ("not_video", 1, "not a readable video"),
        ("bad_model", 1, "not a readable ONNX model"),
        ("missing_model", 1, "model file not found"),
        ("card_contradicts", 1, "contradicts"),
        ("bad_setting", 2, "engine.intra_op_threads"),
        ("bad_flag", 2, "--frobnicate"),
        ("bad_yaml", 2, "not a readable YAML"),
        ("port_in_use", 1, "Address already in use"),
        ("video_suffix", 2, "expected a video file ending in .mp4, .mkv, .mov or .avi"),  # was: 3 restarts, exit 0
        ("video_unwritable", 1, "cannot create output"),  # was: a restart, exit 0, no video
        ("jsonl_directory", 1, "cannot create output (Is a directory)"),  # was: 6 restarts after the whole run
    ],
)
def test_bad_input_one_error_line(standin_model, tmp_path, case, code, needle):
    src = str(bikes_path())
    args = base(standin_model, "--source", src, "--max-frames", "3")
    named = src
    if case == "missing":
        named = str(tmp_path / "nope.mp4")
        args = base(standin_model, "--source", named)
    elif case == "not_video":
        named = str(tmp_path / "text.mp4")
        Path(named).write_text("not a video\n" * 50)
        args = base(standin_model, "--source", named)
    elif case == "bad_model":
        named = str(tmp_path / "bad.onnx")
        Path(named).write_bytes(b"\x00garbage" * 100)
        args = base(named, "--source", src)
    elif case == "missing_model":
        named = str(tmp_path / "none.onnx")
        args = base(named, "--source", src)
    elif case == "card_contradicts":
        card = json.loads(Path(standin_model).with_suffix(".json").read_text())
        card["input"]["height"] = 640
        named = str(tmp_path / "card.json")
        Path(named).write_text(json.dumps(card))
        args = [*args, "--card", named]
    elif case == "bad_setting":
        named = "engine.intra_op_threads"
        args = [*args, "--set", "engine.intra_op_threads=-2"]
    elif case == "bad_flag":
        named = "--frobnicate"
        args = [*args, "--frobnicate"]
    elif case == "bad_yaml":
        named = str(tmp_path / "c.yaml")
        Path(named).write_text("engine: [1,\n")
        args = [*args, "--config", named]
    elif case == "video_suffix":
        named = str(tmp_path / "out.txt")
        args = [*args, "--video-out", named]
    elif case == "video_unwritable":
        named = "/proc/streamdet-test.mp4"  # (the directory exists; no file can be made there, even by root)
        args = [*args, "--video-out", named]
    elif case == "jsonl_directory":
        named = str(tmp_path)
        args = [*args, "--jsonl", named]
    s = None
    if case == "port_in_use":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        named = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        args = [*args, "--publish", named]
    try:
        rc, out, err = run(args)
    finally:
        if s is not None:
            s.close()
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0] and named in lines[0]
    assert "Traceback" not in out + err


@pytest.mark.parametrize("flags, env, needle, applies", [
    (["--device", "cuda"], {}, "--device cuda needs a CUDA GPU", lambda: not cuda_available()),
    ([], {"STREAMDET_ENGINE__DEVICE": "cuda"}, "--device cuda needs a CUDA GPU", lambda: not cuda_available()),
    (["--backend", "tensorrt", "--device", "cuda:1"], {}, "--device cuda:1 needs a CUDA GPU",
     lambda: not cuda_available()),
    (["--backend", "tensorrt"], {}, "--backend tensorrt runs on --device cuda only", lambda: True),
    (["--backend", "tensorrt", "--device", "cuda"], {}, "--backend tensorrt needs TensorRT",
     lambda: cuda_available() and not tensorrt_available()),
], ids=["device-cuda", "device-cuda-env", "tensorrt-cuda1", "tensorrt-cpu", "tensorrt-missing"])
def test_gpu_request_that_cannot_run_fails_without_fallback(standin_model, tmp_path, flags, env, needle, applies):
    """One error line, exit 1, nothing decoded or written: never a silent run on a slower path."""
    if not applies():
        pytest.skip("this machine can run the request")
    out_path = tmp_path / "o.jsonl"
    rc, out, err = run(base(standin_model, "--source", str(bikes_path()), "--max-frames", "3", "--jsonl", str(out_path),
                            *flags), extra_env=env)
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert out == "" and not out_path.exists()
    assert "Traceback" not in err


def test_gpu_fallback_only_when_a_setting_asks(standin_model, tmp_path):
    if cuda_available():
        pytest.skip("this machine has a CUDA GPU: nothing to fall back from")
    rc, out, err = run(base(standin_model, "--source", str(bikes_path()), "--max-frames", "3", "--device", "cuda",
                            "--set", "engine.allow_fallback=true"))
    assert rc == 0, err
    assert out.startswith("frames=3 ")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --device cuda needs a CUDA GPU"), err
    assert lines[0].endswith("falling back to --backend onnxruntime --device cpu")


def test_truncated_file_keeps_every_decoded_frame(standin_model, tmp_path, truncated):
    rc, out, err = run(base(standin_model, "--source", str(truncated), "--jsonl", str(tmp_path / "o.jsonl")))
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {truncated}: truncated or corrupt")
    records = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    n = len(records) - 1
    assert n >= 100  # half the file's frames
    assert [r["frame_index"] for r in records[:-1]] == list(range(n))
    assert records[-1]["reason"] == "error" and records[-1]["frames"] == n and "truncated" in records[-1]["error"]
    assert f"kept {n} frames" in lines[0]


@pytest.mark.parametrize("sig,code,group", [
    (signal.SIGINT, 130, False), (signal.SIGTERM, 143, False),
    (signal.SIGINT, 130, True),  # Ctrl-C in a terminal
    (signal.SIGTERM, 143, True),  # systemctl stop (KillMode=control-group), kill -TERM -PGID
], ids=["SIGINT", "SIGTERM", "SIGINT-to-the-group", "SIGTERM-to-the-group"])
def test_signal_stops_cleanly(standin_model, tmp_path, sig, code, group):
    """The first signal drains the run, whether it reaches the runner alone or every process of the group."""
    out_path = tmp_path / "o.jsonl"
    proc, marker = start(base(standin_model, "--source", str(bikes_path()), "--loop", "100", "--jsonl", str(out_path)),
                         start_new_session=group)
    deadline = time.monotonic() + 60
    partial = out_path.with_name(".o.partial.jsonl")
    while time.monotonic() < deadline:  # wait until frames flow
        if partial.exists() and partial.stat().st_size > 0:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert_no_orphans(marker)
    assert "Traceback" not in err and "restarted" not in err and "error" not in err, err
    records = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert records[-1]["schema"] == "streamdet.eos/1" and records[-1]["reason"] == "interrupted"
    assert records[-1]["frames"] == len(records) - 1 > 0
    assert "(interrupted)" in out


def test_killed_runner_takes_its_stages_along(standin_model):
    """SIGKILL leaves no chance to clean up: the stages notice their parent is gone and exit."""
    proc, marker = start(base(standin_model, "--source", str(bikes_path()), "--loop", "100"))
    deadline = time.monotonic() + 60
    while len(processes_with(marker)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.communicate(timeout=30)
    assert_no_orphans(marker)


def _semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")} if Path("/dev/shm").is_dir() else set()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_a_run_killed_with_its_process_group_leaves_no_semaphores(standin_model):
    """``kill -9`` to the whole group (a container's or a service's stop) kills the resource tracker too.

    Whatever named POSIX semaphores the run had made would stay in /dev/shm for good (the run's
    flags were three ``multiprocessing.Event`` before, 15 ``sem.mp-*`` per killed run); its
    shared-memory blocks are removed by the next run's reaper.
    """
    before = _semaphores()
    proc, marker = start(base(standin_model, "--source", str(bikes_path()), "--loop", "100"), start_new_session=True)
    deadline = time.monotonic() + 60
    while len(processes_with(marker)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert_no_orphans(marker)
    assert _semaphores() - before == set()
    reap_orphan_pools(min_age_s=0.0)  # its blocks now, not with a note line in a later test's run


def test_a_closed_terminal_stops_the_run_as_sigterm_does(standin_model, tmp_path):
    """The terminal the run was started in goes away (window closed, ssh dropped): SIGHUP to the group.

    Before: every process died of it at once (exit -1), the JSONL stayed ``.partial`` and the run's
    shared memory stayed until the next run removed it. Now the inputs close, the rest drains.
    """
    out = tmp_path / "out.jsonl"
    partial = tmp_path / ".out.partial.jsonl"

    def ready(marker: str) -> bool:  # (the stages run and lines are written)
        return partial.exists() and partial.stat().st_size > 2000 and len(processes_with(marker)) >= 4

    code, marker = hang_up(base(standin_model, "--source", str(bikes_path()), "--loop", "100", "--jsonl", str(out)),
                           ready)
    assert code == 129
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[-1]["schema"] == "streamdet.eos/1" and records[-1]["reason"] == "interrupted"
    assert records[-1]["frames"] == len(records) - 1 > 0
    assert not partial.exists()
    assert_no_orphans(marker)


def test_a_closed_standard_output_leaves_the_run_and_its_exit_status_alone(standin_model, tmp_path):
    """``run_pipeline.py ... | head -c 0``: before, a BrokenPipeError traceback and exit 1 after a whole run."""
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *base(standin_model, "--source", str(bikes_path()),
                                                                "--max-frames", "20", "--jsonl", str(out))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.close()  # (nobody reads the summary)
    err = proc.stderr.read() if proc.stderr is not None else ""
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and len(out.read_text().splitlines()) == 21


def test_the_stages_cpu_time_counts_in_the_commands_own(standin_model):
    """``time run_pipeline.py ...`` (``os.wait4``) includes the stages' CPU time, forked or spawned.

    Stages forked from the fork server are its children, not the command's: the command waits for
    the server when its run ends, so their time reaches it.
    """
    cpu = {}
    for fork_server in ("true", "false"):
        env = {**os.environ, "STREAMDET_SUPERVISE__FORK_SERVER": fork_server}
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *base(standin_model, "--source", str(bikes_path()),
                                                                    "--max-frames", "60")],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        cpu[fork_server] = usage.ru_utime + usage.ru_stime
    # the forked run skips the stages' own imports, not their work
    assert cpu["true"] > 0.5 * cpu["false"], cpu  # measured 0.70 (1.5 s against 2.2 s); unwaited 0.30


@pytest.mark.skipif(not (ROOT / "engines" / "models" / "detector.onnx").exists(), reason="bundled detector not built")
def test_default_model_and_demo_video(tmp_path):
    rc, out, err = run(["--quiet", "--max-frames", "4", "--publish", f"tcp://127.0.0.1:{free_port()}"], timeout=300)
    assert rc == 0, err
    assert out.startswith("frames=4 ") and "demo.mp4" in out


# ----------------------------------------------------------------- segmentation models at start-up


@pytest.mark.parametrize(("case", "problem"), [
    ("proto_size", "expected output1 prototype size 48x80 (HxW), got 96x160"),
    ("class_count", "expected output0 with 4+5+4=13 rows, got 11"),
    ("mask_coeffs", "expected output0 with 4+3+6=13 rows, got 11"),
    ("semantic_3d", "expected output0 of rank 4 (B, C, H, W), got shape"),
])
@pytest.mark.parametrize("per_source", [False, True])
def test_segmentation_model_contradicting_its_card_fails_at_startup(standin_model, tmp_path, case, problem, per_source):
    """One error line naming the model and the mismatch, exit 1, before any frame is read."""
    if case == "semantic_3d":
        bad = build_semantic_standin(tmp_path / "bad.onnx", flat_output=True)
    else:
        card = {"proto_size": segment_card(mask_hw=(48, 80)), "class_count": segment_card(num_classes=5),
                "mask_coeffs": segment_card(num_mask_coeffs=6)}[case]
        bad = build_segment_standin(tmp_path / "bad.onnx", card=card)
    if per_source:  # the global model is fine; the second source's own model is not
        cfg = tmp_path / "two.yaml"
        cfg.write_text(json.dumps({"sources": [str(bikes_path()), {"url": str(bikes_path()), "model": str(bad)}]}))
        args = ["--config", str(cfg), "--model", str(standin_model)]
    else:
        args = ["--source", str(bikes_path()), "--model", str(bad)]
    code, out, err = run([*args, "--publish", "none", "--quiet", "--jsonl", str(tmp_path / "o.jsonl")])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and str(bad) in lines[0] and problem in lines[0], lines[0]
    assert out == "" and not (tmp_path / "o.jsonl").exists()
