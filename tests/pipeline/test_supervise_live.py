"""Self-healing on live RTSP sources: a stage process killed mid-run is restarted, the run goes on.

Same RTSP test server and run harness as ``test_live.py`` (skipped, naming the missing Debian
packages, where the server cannot run). Stage processes are found by their OS names
(``/proc/<pid>/comm``: ``sd-engine``, ``sd-dec:<source_id>``...) among the runner's children.
"""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.cli import processes_with
from tests.pipeline.test_live import _MISSING, Run, servers  # noqa: F401  (servers: the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_MISSING), reason=_MISSING)]


def stage_processes(runner_pid: int) -> dict[int, str]:
    """``{pid: comm}`` of the runner's stage processes (descendants named ``sd-*``), via ``/proc``.

    Descendants, not only children: a restarted stage is forked from the runner's fork server.
    """
    procs: dict[int, tuple[int, str, str]] = {}  # pid -> (ppid, state, comm)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        procs[int(d.name)] = (int(fields[1]), fields[0], comm)
    found, frontier = {}, {runner_pid}
    while frontier:
        kids = {pid for pid, (ppid, _, _) in procs.items() if ppid in frontier}
        for pid in kids:
            _, state, comm = procs[pid]
            if state != "Z" and comm.startswith("sd-"):
                found[pid] = comm
        frontier = kids
    return found


def wait_stage(run: Run, name: str, timeout: float = 20.0, exclude: frozenset[int] = frozenset()) -> int:
    """The pid of the runner's child named ``name`` (not one of ``exclude``), waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p, c in stage_processes(run.proc.pid).items() if c == name and p not in exclude]
        if pids:
            return pids[0]
        assert run.proc.poll() is None, f"the run ended ({run.proc.returncode}) while waiting for {name}"
        time.sleep(0.05)
    raise AssertionError(f"no {name} process after {timeout} s: {stage_processes(run.proc.pid)}")


def detections(run: Run, source_id: str, since: float = 0.0) -> list[tuple[float, str, dict]]:
    return run.sub.of(f"detections.{source_id}", since)


def restarts(run: Run, source_id: str) -> list[dict]:
    """The ``stage_restarted`` status payloads published for ``source_id``."""
    return [p for _, _, p in run.sub.of(f"status.{source_id}") if p["state"] == "stage_restarted"]


def sd_left(marker: str, seen: set[int]) -> list[str]:
    """Processes of the run still alive, and stage processes seen during the run still named ``sd-*``."""
    left = [f"{p} (run)" for p in processes_with(marker)]
    for p in seen:
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm.startswith("sd-") and state != "Z":
            left.append(f"{p} ({comm})")
    return left


def stop_and_list_left(run: Run, seen: set[int]) -> tuple[int, str, list[str]]:
    """SIGINT the run; its exit code, stderr and what is left of it (see :func:`sd_left`)."""
    seen |= set(stage_processes(run.proc.pid))
    code, _, err, _ = run.stop(signal.SIGINT)
    return code, err, sd_left(run.marker, seen)


def test_killed_engine_is_restarted_and_detections_resume(standin_model, servers):  # noqa: F811
    srv = servers()
    run = Run(standin_model, [srv.url()])
    seen: set[int] = set()
    try:
        assert run.sub.wait(lambda: len(detections(run, "clip")) >= 10, 30), run.sub.items[:5]
        seen |= set(stage_processes(run.proc.pid))
        engine = wait_stage(run, "sd-engine")
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        new_engine = wait_stage(run, "sd-engine", 10, exclude=frozenset({engine}))
        up = time.monotonic()  # frames in flight at the kill may still be published: count from the new engine
        seen.add(new_engine)
        assert run.sub.wait(lambda: len(detections(run, "clip", since=up)) >= 1, 10), run.states("clip")
        resumed = detections(run, "clip", since=up)[0][0] - killed
        assert run.sub.wait(lambda: restarts(run, "clip"), 10), run.sub.of("status.clip")
        restarted_at = next(t for t, _, p in run.sub.of("status.clip") if p["state"] == "stage_restarted")
        # detections keep coming from the new engine
        assert run.sub.wait(lambda: len(detections(run, "clip", since=restarted_at)) >= 10, 10)
        code, err, left = stop_and_list_left(run, seen)
    finally:
        run.kill()
    assert code == 130, err
    assert resumed < 3.0, f"detections resumed {resumed:.2f} s after the kill"
    assert left == [], left
    (r,) = restarts(run, "clip")
    assert r["schema"] == "streamdet.status/1" and r["source_id"] == "clip"
    assert r["stage"] == "engine" and r["attempt"] == 1 and "SIGKILL" in r["message"], r
    assert r["down_s"] >= 0 and r["restarts"] == 1, r
    indices = [p["frame_index"] for _, _, p in detections(run, "clip")]
    assert all(b > a for a, b in zip(indices, indices[1:], strict=False)), indices  # never out of order
    assert "restarted the engine stage" in err


def test_killed_decoder_restarts_alone(standin_model, servers):  # noqa: F811
    srv = servers()  # two cameras on one shared mount: one encoder, so the 2-core test box keeps up
    # source ids clip and clip-2, each decoded in its own process (the placement auto picks on 2 cores shares one)
    run = Run(standin_model, [srv.url(), srv.url()], "--set", "decode.placement=separate")
    seen: set[int] = set()
    try:
        assert run.sub.wait(lambda: len(detections(run, "clip")) >= 10 and len(detections(run, "clip-2")) >= 10, 30)
        time.sleep(2.0)  # the gap check starts 2 s before the kill
        seen |= set(stage_processes(run.proc.pid))
        decoder = wait_stage(run, "sd-dec:clip")
        os.kill(decoder, signal.SIGKILL)
        killed = time.monotonic()
        seen.add(wait_stage(run, "sd-dec:clip", 10, exclude=frozenset({decoder})))
        up = time.monotonic()  # frames in flight at the kill may still be published: count from the new decoder
        assert run.sub.wait(lambda: len(detections(run, "clip", since=up)) >= 1, 10), run.states("clip")
        resumed = detections(run, "clip", since=up)[0][0] - killed
        time.sleep(max(0.0, killed + 6.0 - time.monotonic()))  # one more message after the window
        assert run.sub.wait(lambda: restarts(run, "clip"), 5), run.sub.of("status.clip")
        code, err, left = stop_and_list_left(run, seen)
    finally:
        run.kill()
    assert code == 130, err
    assert left == [], left
    assert resumed < 5.0, f"clip resumed {resumed:.2f} s after its decoder was killed"
    times = [t for t, _, _ in detections(run, "clip-2")]
    before = [t for t in times if t < killed - 2.0]
    after = [t for t in times if t > killed + 5.0]
    assert before and after, "clip-2 was not publishing across the whole window"
    window = [before[-1], *[t for t in times if killed - 2.0 <= t <= killed + 5.0], after[0]]
    gaps = [t1 - t0 for t0, t1 in zip(window, window[1:], strict=False)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[worst] < 1.0, (f"clip-2 gap of {gaps[worst]:.2f} s ending {window[worst + 1] - killed:+.2f} s "
                               "from the kill")
    (r,) = restarts(run, "clip")
    assert r["stage"] == "decode" and r["source_id"] == "clip" and "SIGKILL" in r["message"], r
    assert restarts(run, "clip-2") == [], restarts(run, "clip-2")
    assert "error" not in run.states("clip-2")
