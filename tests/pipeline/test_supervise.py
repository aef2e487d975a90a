"""Self-healing stages on file sources: a SIGKILLed stage comes back, every frame is published once, in order.

The end-to-end runs use the bundled detector on the bundled demo video (first 90 frames): one
undisturbed run is the reference; each stage kind is then SIGKILLed once mid-run and the JSONL
must equal the reference line for line (timing fields aside).
"""

import contextlib
import gc
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pipeline.runner
import pipeline.slotpool
import pipeline.supervise
from pipeline.restarts import exit_reason, start_fork_server
from pipeline.runner import Pipeline
from pipeline.settings import DEFAULT_MODEL, DEFAULT_SOURCE
from pipeline.slotpool import PoolCache, SlotPool, StalePoolError, pool_name, split_pool_name
from pipeline.stages.base import runner_stdio
from pipeline.stages.ordering import PublishOrder, Verdict, catch_up_with_last_line
from pipeline.supervise import Ledger, RestartPolicy
from streamdet.messages import EndOfStream, EosReason
from tests.helpers.cli import ROOT, assert_no_orphans, comm_pids, parent_pid, start
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path

FRAMES = 90
TIMING_FIELDS = {"latency_ms", "timing_ms", "capture_time", "time"}


def settings(tmp_path, name, **over):
    tree = {"sources": [str(DEFAULT_SOURCE)], "model": str(DEFAULT_MODEL), "quiet": True, "max_frames": FRAMES,
            "sinks": {"publish": None, "jsonl": str(tmp_path / f"{name}.jsonl")}}
    return settings_with(tree, **over)


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


@pytest.fixture(autouse=True)
def _frequent_monitor(monkeypatch):
    """Monitors that kill a stage at a frame count run every 0.05 s, not every RSS_SAMPLE_S (0.5 s).

    Progress arrives every 0.1 s, and 30 frames take about 0.5 s on a fast machine: a kill checked
    twice a second could come after the victim's last frame.
    """
    monkeypatch.setattr(pipeline.runner, "RSS_SAMPLE_S", 0.05)


def run_and_kill(s, victim: str | None, at_frame: int = 40):
    """Run the pipeline; SIGKILL the stage labelled ``victim`` once ``at_frame`` frames are published."""
    killed: list[int] = []
    seen_pids: set[int] = set()

    def monitor(p: Pipeline) -> None:
        seen_pids.update(p.child_pids())
        if victim and not killed and p.frames_done >= at_frame:
            pid = p.stage_pids()[victim]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = Pipeline(settings=s, monitor=monitor).run(handle_signals=False)
    if victim:
        assert killed, f"the run ended before {victim} could be killed"
    return summary, seen_pids


def run_and_stop(s, victim: str, at_frame: int = 40):
    """Run the pipeline; SIGSTOP (hang) the stage labelled ``victim`` once ``at_frame`` frames are published."""
    stopped: list[int] = []

    def monitor(p: Pipeline) -> None:
        if not stopped and p.frames_done >= at_frame:
            pid = p.stage_pids()[victim]
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    try:
        summary = Pipeline(settings=s, monitor=monitor).run(handle_signals=False)
    finally:
        for pid in stopped:  # (the watchdog killed it; a stopped process left behind would hang the suite)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert stopped, f"the run ended before {victim} could be stopped"
    return summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    summary, _ = run_and_kill(settings(tmp, "ref"), None)
    assert summary.exit_code == 0, summary.errors
    return [json.loads(line) for line in (tmp / "ref.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("victim", "placement"), [
    ("decode:demo", "separate"),
    ("preprocess", "separate"),
    ("engine", "separate"),
    ("postprocess", "separate"),
    ("preprocess", "with_preprocess"),  # the decoder and the preprocess stage die and come back together
])
def test_sigkill_of_any_stage_loses_and_repeats_nothing(tmp_path, reference, victim, placement):
    summary, pids = run_and_kill(settings(tmp_path, "out", decode__placement=placement), victim)
    assert summary.exit_code == 0, summary.errors
    assert summary.restarts == {victim: 1}
    label, attempt, reason, down_s = summary.restart_log[0]
    assert (label, attempt, reason) == (victim, 1, "killed by SIGKILL")
    assert down_s < 10
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    frames = [m["frame_index"] for m in got if "frame_index" in m]
    assert frames == list(range(FRAMES))  # every frame once, in order
    assert sum(1 for m in got if m.get("schema", "").startswith("streamdet.eos")) == 1  # EOS once, last
    assert "frame_index" not in got[-1]
    assert strip_timing(got) == strip_timing(reference)  # the same detections as an undisturbed run
    assert summary.frames == FRAMES
    assert any(o.endswith(f": {FRAMES + 1} lines") for o in summary.outputs), summary.outputs  # the file's lines
    time.sleep(0.2)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]


def test_postprocess_restart_keeps_the_annotated_video_as_playable_segments(tmp_path):
    """The dead sink's fragmented MP4 becomes ``out-seg1.mp4`` (whole fragments), a new file continues."""
    import av

    n = 150  # killed at 75: past the first fragment (frames 0-49) and the encoder delay, far from the end
    s = settings(tmp_path, "out", max_frames=n, sinks__video_out=str(tmp_path / "out.mp4"))
    summary, _ = run_and_kill(s, "postprocess", at_frame=75)
    assert summary.exit_code == 0, summary.errors
    counts = {}
    for name in ("out.mp4", "out-seg1.mp4"):
        with av.open(str(tmp_path / name)) as c:
            counts[name] = sum(1 for _ in c.decode(video=0))
    assert counts["out-seg1.mp4"] >= 50, counts  # at least the first fragment (2 s at 25 fps)
    lost = n - sum(counts.values())  # frames of the dead sink's unfinished fragment
    assert 0 <= lost <= 50, counts
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == n + 1  # the JSONL loses nothing
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize(("victim", "placement"), [
    ("engine", "with_preprocess"),
    ("postprocess", "with_preprocess"),
    ("preprocess", "with_preprocess"),  # its decoder threads with it
    ("decode:demo", "separate"),
])
def test_a_hung_stage_is_killed_and_restarted_and_loses_and_repeats_nothing(tmp_path, reference, victim, placement):
    """A stage that stops showing life (SIGSTOP: as a deadlock or a call that never returns) is taken as dead.

    Before the heartbeat the run stalled silently for ever (a SIGINT then waited out the drain timeout).
    """
    summary = run_and_stop(settings(tmp_path, "out", decode__placement=placement, supervise__hang_timeout_s=1.5),
                           victim)
    assert summary.exit_code == 0, summary.errors
    assert summary.restarts == {victim: 1}
    label, attempt, reason, _ = summary.restart_log[0]
    assert (label, attempt) == (victim, 1)
    assert reason.startswith("made no progress for ") and reason.endswith(
        " s (hung; supervise.hang_timeout_s=1.5), killed")
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [m["frame_index"] for m in got if "frame_index" in m] == list(range(FRAMES))
    assert strip_timing(got) == strip_timing(reference)


def test_a_stage_that_waits_is_not_taken_as_hung(tmp_path, reference):
    """Stages beat while they wait (every poll), start up and finish unwatched: a short limit kills nothing."""
    summary, _ = run_and_kill(settings(tmp_path, "out", supervise__hang_timeout_s=1.0, preprocess__max_wait_ms=500),
                              None)
    assert summary.exit_code == 0, summary.errors
    assert summary.restarts == {}


def test_stages_and_their_restarts_fork_from_the_fork_server_and_lose_nothing(tmp_path, reference):
    """Every stage process, restarted ones too, is forked from the run's fork server (not the runner)."""
    s = settings(tmp_path, "out", supervise__backoff_initial_s=0.0)
    kills: list[int] = []
    parents: dict[int, int] = {}

    def monitor(p: Pipeline) -> None:
        for pid in p.stage_pids().values():
            if pid not in parents and pid not in kills:
                with contextlib.suppress(OSError):  # it may have just exited
                    parents[pid] = parent_pid(pid)
        if len(kills) < 2 and p.frames_done >= 25 + 15 * len(kills) and not p.restarting:
            pid = p.stage_pids()["engine"]
            if pid not in kills:
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)

    summary = Pipeline(settings=s, monitor=monitor).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    assert len(kills) == 2 and summary.restarts == {"engine": 2}
    assert len(parents) >= 5  # decoder+preprocess, engine, postprocess, then two more engines
    assert len(set(parents.values())) == 1 and os.getpid() not in parents.values(), parents
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert strip_timing(got) == strip_timing(reference)


def test_without_the_fork_server_every_stage_is_spawned_by_the_runner(tmp_path):
    s = settings(tmp_path, "out", max_frames=6, supervise__fork_server=False)
    parents: dict[int, int] = {}

    def monitor(p: Pipeline) -> None:
        for pid in p.stage_pids().values():
            if pid not in parents:
                with contextlib.suppress(OSError):  # it may have just exited
                    parents[pid] = parent_pid(pid)

    summary = Pipeline(settings=s, monitor=monitor).run(handle_signals=False)
    assert summary.exit_code == 0 and summary.frames == 6, summary.errors
    assert parents and set(parents.values()) == {os.getpid()}, parents


def test_the_fork_server_imports_no_gpu_library():
    """Every stage forks from it, and a process must not fork with CUDA initialised: it imports no GPU library."""
    code = ("import sys; from pipeline.restarts import FORK_SERVER_PRELOAD as P; [__import__(m) for m in P]; "
            "print(sorted(m for m in ('torch', 'cupy', 'tensorrt', 'pycuda') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def _say_on_stderr(stdio) -> None:
    if stdio is not None:
        stdio.adopt()
    sys.stderr.write("from the stage\n")
    sys.stderr.flush()


@pytest.mark.parametrize("handed_over", [True, False])
def test_a_forked_stage_writes_to_the_runners_stderr_as_it_is_now(tmp_path, handed_over):
    """The fork server keeps the stderr it started with; a stage gets the runner's current one (RunnerStdio)."""
    assert start_fork_server({})  # before the redirection below: the server holds the stderr of before
    log = tmp_path / "stderr.txt"
    saved = os.dup(2)
    try:
        with open(log, "wb") as fh:
            os.dup2(fh.fileno(), 2)
        p = mp.get_context("forkserver").Process(target=_say_on_stderr,
                                                 args=(runner_stdio() if handed_over else None,))
        p.start()
        p.join(30)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert p.exitcode == 0
    assert log.read_text() == ("from the stage\n" if handed_over else "")


def test_a_stage_that_fails_at_every_start_ends_the_run_after_the_bound(tmp_path):
    """Swap the model for garbage after start-up, then kill the engine: bounded restarts, one error line."""
    model = tmp_path / "model.onnx"
    shutil.copy(DEFAULT_MODEL, model)
    shutil.copy(DEFAULT_MODEL.with_suffix(".json"), model.with_suffix(".json"))
    s = settings(tmp_path, "out", model=str(model), max_frames=None, decode__loop=50,
                 supervise__max_restarts=2, supervise__backoff_initial_s=0.2)
    killed: list[float] = []
    pids: set[int] = set()

    def monitor(p: Pipeline) -> None:
        pids.update(p.child_pids())
        if not killed and p.frames_done >= 8:
            model.write_bytes(b"this is not an ONNX model")
            os.kill(p.stage_pids()["engine"], signal.SIGKILL)
            killed.append(time.monotonic())

    t0 = time.monotonic()
    summary = Pipeline(settings=s, monitor=monitor).run(handle_signals=False)
    assert summary.exit_code == 1
    assert len(summary.errors) == 1, summary.errors
    err = summary.errors[0]
    assert "engine stage died 3 times" in err and "supervise.max_restarts=2" in err
    assert str(model) in err  # the last error names the model that cannot be loaded
    assert summary.restarts == {}  # none of the restarted engines ever became ready
    assert time.monotonic() - t0 < 60
    time.sleep(0.2)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]


def wait_new(marker: str, name: str, old: set[int], timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in comm_pids(marker, name) if p not in old]
        if new:
            return new[0]
        time.sleep(0.05)
    raise AssertionError(f"no new {name} within {timeout} s")


def test_killed_runner_takes_restarted_stages_and_the_fork_server_along(standin_model):
    """Stages are forked from the fork server: they, their restarts and the server die with the runner too."""
    proc, marker = start(["--model", str(standin_model), "--quiet", "--publish", "none", "--source",
                          str(bikes_path()), "--loop", "100", "--set", "supervise.backoff_initial_s=0"])
    try:
        first = wait_new(marker, "sd-engine", set())
        time.sleep(1.0)
        os.kill(first, signal.SIGKILL)  # restart 1
        second = wait_new(marker, "sd-engine", {first})
        time.sleep(2.0)
        os.kill(second, signal.SIGKILL)  # restart 2
        third = wait_new(marker, "sd-engine", {first, second})
        time.sleep(0.5)
        assert parent_pid(third) != proc.pid  # a grandchild
        proc.kill()
        proc.communicate(timeout=30)
        assert_no_orphans(marker)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("setting", "value"), [
    ("supervise.max_restarts", "-1"),
    ("supervise.window_s", "0"),
    ("supervise.window_s", "-5"),
    ("supervise.backoff_max_s", "-1"),
])
def test_invalid_supervision_settings_are_rejected_at_startup(setting, value):
    r = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--set", f"{setting}={value}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2  # a usage error
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and setting in lines[0], r.stderr


# ------------------------------------------------------------------------------------- units
@pytest.mark.parametrize(("code", "reason"), [
    (1, "exit code 1"), (None, "exit code None"), (-signal.SIGKILL, "killed by SIGKILL"), (-99, "killed by signal 99"),
    (-signal.SIGBUS, "killed by SIGBUS (out of shared memory?; /dev/shm has "),
])
def test_exit_reasons(code, reason):
    assert exit_reason(code).startswith(reason)


def test_pool_names_carry_their_generation():
    assert pool_name("sd-ab-f0", 3) == "sd-ab-f0.3"
    assert split_pool_name("sd-ab-f0.3") == ("sd-ab-f0", 3)
    assert split_pool_name("sd-ab-f0") == ("sd-ab-f0", 0)
    assert split_pool_name("a.b") == ("a.b", 0)


def test_pool_cache_detaches_older_generations_and_refuses_stale_ones():
    base = f"sd-test-{os.getpid()}"
    a = SlotPool.create(name=pool_name(base, 0), num_slots=2, slot_bytes=8)
    b = SlotPool.create(name=pool_name(base, 1), num_slots=2, slot_bytes=8)
    try:
        cache = PoolCache()
        assert cache.get(a.name).name == a.name
        assert cache.get(b.name).name == b.name
        with pytest.raises(StalePoolError, match="generation 0 is stale"):
            cache.get(a.name)
        cache.close()
    finally:
        a.close()
        b.close()


def test_ledger_is_shared_by_name():
    name = f"sd-test-ledger-{os.getpid()}"
    ledger = Ledger.create(name=name, num_sources=2, num_chains=2)
    try:
        other = Ledger.attach(name)
        assert [other.published(i) for i in range(2)] == [-1, -1]
        ledger.set_published(1, 41)
        ledger.set_eos_done(0)
        assert other.bump_engine_gen(1) == 1
        other.set_preprocess_ack(1, 1)
        ledger.bump_replay_gen(0)
        ledger.set_subscribers(3)
        ledger.bump_postprocess_gen()
        ledger.set_finished()
        assert (other.published(1), other.eos_done(0), other.eos_done(1)) == (41, True, False)
        assert (other.subscribers, other.postprocess_gen) == (3, 1)
        assert (ledger.engine_gen(1), ledger.preprocess_ack(1)) == (1, 1)
        assert (other.replay_gen(0), other.replay_gen(1)) == (1, 0)
        assert other.finished
        with pytest.raises(IndexError):
            other.published(2)
        other.close()
    finally:
        ledger.close()


def _set_flag_later(flag, delay_s):  # (a spawned process: the flag arrives pickled, by the ledger's name)
    time.sleep(delay_s)
    flag.set()


def test_ledger_flags_cross_processes_and_wait():
    name = f"sd-test-flags-{os.getpid()}"
    ledger = Ledger.create(name=name, num_sources=1, num_chains=1)
    try:
        go, stop_input, abort = ledger.run_flags()
        assert not (go.is_set() or stop_input.is_set() or abort.is_set())
        started = time.monotonic()
        assert go.wait(0.05) is False and time.monotonic() - started >= 0.05
        proc = mp.get_context("spawn").Process(target=_set_flag_later, args=(stop_input, 0.2))
        proc.start()
        assert stop_input.wait(30) is True
        proc.join(30)
        assert proc.exitcode == 0 and not go.is_set() and not abort.is_set()
        abort.set()
        other = Ledger.attach(name)
        assert [f.is_set() for f in other.run_flags()] == [False, True, True]
        assert not other.finished and other.subscribers == 0 and other.postprocess_gen == 0  # (own fields)
        other.close()
    finally:
        ledger.close()
        pipeline.slotpool.unlink_pool(name)


def test_a_ledger_dropped_unclosed_unmaps_quietly(monkeypatch):
    """Before: ``Exception ignored ... BufferError: cannot close exported pointers exist`` on stderr."""
    name = f"sd-test-drop-{os.getpid()}"
    ledger = Ledger.create(name=name, num_sources=1, num_chains=1)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    try:
        other = Ledger.attach(name)
        del other
        gc.collect()
        assert unraisable == []
    finally:
        ledger.close()


def test_the_decoder_threads_of_one_process_share_one_mapping_of_the_flags(monkeypatch):
    name = f"sd-test-threads-{os.getpid()}"
    ledger = Ledger.create(name=name, num_sources=1, num_chains=1)
    attached = []
    real_attach = Ledger.attach

    def slow_attach(n):
        time.sleep(0.05)  # (widens the window two threads could both attach in)
        attached.append(n)
        return real_attach(n)

    monkeypatch.setattr(Ledger, "attach", staticmethod(slow_attach))
    try:
        go = pickle.loads(pickle.dumps(ledger.run_flags()[0]))
        flags = [go, *(pickle.loads(pickle.dumps(f)) for f in ledger.run_flags())]
        threads = [threading.Thread(target=f.is_set) for f in flags for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert attached == [name]
    finally:
        pipeline.supervise._ATTACHED.pop(name).close()
        ledger.close()


def test_a_ledger_flag_whose_run_is_gone_reads_as_set():
    """A stage that outlived its runner (the ledger unlinked) stops: every flag reads set."""
    name = f"sd-test-gone-{os.getpid()}"
    ledger = Ledger.create(name=name, num_sources=1, num_chains=1)
    _, _, abort = ledger.run_flags()
    ledger.close()
    pipeline.slotpool.unlink_pool(name)
    orphan = pickle.loads(pickle.dumps(abort))  # as a stage process gets it
    assert orphan.is_set() and orphan.wait(0)
    orphan.set()  # (nothing to set: no error)


def test_restart_policy_bounds_restarts_in_a_sliding_window_with_backoff():
    p = RestartPolicy(max_restarts=2, window_s=10.0, backoff_initial_s=1.0, backoff_max_s=3.0)
    assert p.record("engine", 0.0) == 1
    assert p.record("engine", 1.0) == 2
    assert p.record("decode:a", 1.5) == 1  # per stage
    assert p.record("engine", 2.0) is None  # a third death within 10 s
    assert p.record("engine", 30.0) == 1  # the window slid past them
    assert p.delay(1) == 0.0
    rng = np.random.default_rng(0)
    assert 0.8 <= p.delay(2, rng) <= 1.2
    assert 2.4 <= p.delay(5, rng) <= 3.6  # capped at backoff_max_s (with +-20 % jitter)


def _det_line(sid: str, index: int, n: int = 1) -> bytes:
    return json.dumps({"schema": "streamdet.detections/2", "source_id": sid, "frame_index": index,
                       "detections": [{"score": 0.5}] * n}).encode()


# the ledger says frames 0-4 of "cam" (a file) are published; the dead stage's last JSONL line was ...
CATCH_UP_CASES = [
    ("the next frame: caught up", _det_line("cam", 5, 2), "cam frame 5", 6, False),
    ("a frame the ledger has", _det_line("cam", 4), None, 5, False),
    ("the eos", json.dumps({"schema": "streamdet.eos/1", "source_id": "cam", "frames": 5}).encode(), "cam eos", 5,
     True),
    ("another run's source", _det_line("other", 5), None, 5, False),
    ("a status line", json.dumps({"schema": "streamdet.status/1", "source_id": "cam"}).encode(), None, 5, False),
    ("not JSON", b'{"schema":"streamdet.det', None, 5, False),
    ("not an object", b"[1, 2]", None, 5, False),
]


@pytest.mark.parametrize(("line", "caught", "next_index", "ended"), [c[1:] for c in CATCH_UP_CASES],
                         ids=[c[0] for c in CATCH_UP_CASES])
def test_a_restarted_stage_catches_up_with_the_last_jsonl_line(line, caught, next_index, ended):
    """A SIGKILL between the JSONL line and the ledger update: the replayed frame is a duplicate, not a second line."""
    order = PublishOrder(sources=(("cam", False),))
    for i in range(5):
        order.published("cam", i)
    assert catch_up_with_last_line(order, line) == caught
    assert order.next_index("cam") == next_index and order.ended("cam") == ended
    if caught == "cam frame 5":
        assert order.frame("cam", 5, "replayed")[0] is Verdict.DUPLICATE
        assert order.frame("cam", 6, "next")[0] is Verdict.PUBLISH


# (source is live, arrivals as (frame_index, ...) or "eos:N", expected published order, lost)
ORDER_CASES = [
    ("in order", False, [0, 1, 2, "eos:3"], [0, 1, 2, "eos"], 0),
    ("replayed copies are dropped", False, [0, 1, 0, 1, 2, "eos:3", "eos:3"], [0, 1, 2, "eos"], 0),
    ("ahead of a gap waits", False, [0, 2, 3, 1, "eos:4"], [0, 1, 2, 3, "eos"], 0),
    ("eos waits for the gap", False, [0, "eos:3", 2, 1], [0, 1, 2, "eos"], 0),
    ("live skips the gap, counts it", True, [0, 3, 1, 4, "eos:6"], [0, 3, 4, "eos"], 3),
]


@pytest.mark.parametrize(("live", "arrivals", "expected", "lost"), [c[1:] for c in ORDER_CASES],
                         ids=[c[0] for c in ORDER_CASES])
def test_publish_order(live, arrivals, expected, lost):
    order = PublishOrder(sources=(("cam", live),))
    out: list[object] = []
    lost_total = 0
    for a in arrivals:
        if isinstance(a, str):
            now, n = order.eos(EndOfStream("cam", int(a.split(":")[1]), EosReason.FINISHED))
            lost_total += n
        else:
            verdict, n = order.frame("cam", a, a)
            lost_total += n
            now = False
            if verdict is Verdict.PUBLISH:
                out.append(a)
                order.published("cam", a)
                while (held := order.ready("cam")) is not None:
                    out.append(held)
                    order.published("cam", held)
                now = order.ready_eos("cam") is not None
        if now:
            out.append("eos")
            order.eos_published("cam")
    assert out == expected
    assert lost_total == lost
    assert order.all_ended


def test_a_long_video_remux_shows_life(tmp_path, monkeypatch):
    """Finishing a source's annotated video at its EOS is one long step of the postprocess stage: it beats meanwhile.

    Without it a long video's remux (gigabytes) outlasted ``supervise.hang_timeout_s`` and the stage was killed
    as hung (seen at 0.5 s with two short clips and ``--video-out``).
    """
    import pipeline.stages.base as base
    from pipeline.stages.video_sink import _remux
    from tests.helpers.clips import write_h264

    frames = [np.full((48, 64, 3), i % 250, np.uint8) for i in range(1100)]
    src = write_h264(tmp_path / "frag.mp4", frames, container_options={"movflags": "frag_keyframe+empty_moov"})
    beats: list[int] = []

    class Flags:
        def beat(self) -> None:
            beats.append(1)

    monkeypatch.setattr(base, "_RUNNING", Flags())
    assert _remux(src, tmp_path / "regular.mp4") == 1100
    assert len(beats) >= 4  # every 512 packets, while copying and while reading the copy back
