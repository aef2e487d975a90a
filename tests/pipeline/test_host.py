"""Fitting a run's shared-memory pools into a small /dev/shm (pipeline.host), and what a run does there.

The unit tests plan the real stage specs of a run against a given free room. The end-to-end tests
run ``run_pipeline.py`` with a tmpfs of docker's default size (64 MiB) and smaller mounted on
``/dev/shm`` in a private mount namespace (tests/helpers/small_shm.py): before the plan, three
720p sources there were killed by SIGBUS until the run failed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.chains import prepare_run, stage_specs
from pipeline.host import (
    CLAIMS_FILE,
    MIN_FRAME_SLOTS,
    SHM_SHARE,
    _capped,
    _decoders,
    fit_shared_memory,
    planned_bytes,
)
from pipeline.settings import DEFAULT_MODEL, DEFAULT_SOURCE
from pipeline.stages.base import StageSpec
from pipeline.stages.colocated import ColocatedSpec
from pipeline.stages.decode import DecodeSpec
from pipeline.summary import PipelineError
from pipeline.transport import ipc_endpoints, tcp_endpoints
from tests.helpers.cgroup import cgroup_unavailable, limited_cgroup
from tests.helpers.cli import run
from tests.helpers.settings import settings_with
from tests.helpers.small_shm import small_shm_prefix, small_shm_unavailable
from tests.helpers.standin import bikes_path

MIB = 2**20
BBB = bikes_path().parent / "bigbuckbunny.mp4"  # 1280x720: 2.6 MiB a frame slot


def _specs(tmp_path: Path, sources: list[str], placement: str = "with_preprocess", **over: object) -> list[StageSpec]:
    s = settings_with({"sources": sources, "model": str(DEFAULT_MODEL)}, decode__placement=placement, **over)
    pools = [f"p{i}" for i in range(len(sources))]
    return stage_specs(s, prepare_run(s), ipc_endpoints(tmp_path, pools), pools, ["t"])


def _frame_slots(specs: list[StageSpec]) -> list[int]:
    return [d.num_slots for sp in specs for d in _decoders(sp)]


def _planned(specs: list[StageSpec]) -> int:
    return planned_bytes(specs)


def test_a_run_that_fits_is_left_as_it_is(tmp_path):
    specs = _specs(tmp_path, [str(BBB)] * 3)
    assert _frame_slots(specs) == [12, 12, 12]
    for free in (None, 10**12, int(_planned(specs) / SHM_SHARE) + 1):
        out, note = fit_shared_memory(specs, free)
        assert out is specs and note == ""


@pytest.mark.parametrize("placement", ["separate", "with_preprocess"])
@pytest.mark.parametrize("free_mib", [56, 64, 96, 120])
def test_frame_slots_are_capped_alike_at_the_most_that_fits(tmp_path, placement, free_mib):
    specs = _specs(tmp_path, [str(BBB), str(bikes_path()), str(BBB)], placement)
    free = free_mib * MIB
    out, note = fit_shared_memory(specs, free)
    slots = _frame_slots(out)
    cap = max(slots)
    assert all(n == cap for n in slots), slots  # one cap for all: the small bikes frames are not favoured
    assert MIN_FRAME_SLOTS <= cap < 12
    assert _planned(out) <= free * SHM_SHARE
    assert _planned([_capped(sp, cap + 1) for sp in specs]) > free * SHM_SHARE  # one more slot each does not fit
    assert f"has {free_mib}.0 MiB free" in note and f"at most {cap} each" in note
    assert re.search(r"docker run --shm-size=(\d+)m gives them all", note)
    size = int(re.search(r"--shm-size=(\d+)m", note).group(1)) * MIB  # type: ignore[union-attr]
    assert fit_shared_memory(specs, size)[1] == ""  # the size it advises is enough
    assert [type(sp) for sp in out] == [type(sp) for sp in specs]
    assert [sp.source_id for sp in out] == [sp.source_id for sp in specs]


def test_tensor_slots_go_down_too_when_two_frame_slots_each_are_too_many(tmp_path):
    specs = _specs(tmp_path, [str(DEFAULT_SOURCE)], engine__intra_op_threads=1)  # one run of batch 4
    pre = [sp.preprocess for sp in specs if isinstance(sp, ColocatedSpec)]
    assert [(p.max_batch, p.tensor_slots) for p in pre] == [(4, 3)]  # 3 x 18.3 MiB
    out, note = fit_shared_memory(specs, 128 * MIB)
    assert _frame_slots(out) == [8]
    assert [sp.preprocess.tensor_slots for sp in out if isinstance(sp, ColocatedSpec)] == [2]
    assert ("at most 8 each and 2 tensor slots (at most 1 engine run at a time), which may cost throughput "
            "(docker run --shm-size=192m") in note
    assert _planned(out) <= 128 * MIB * SHM_SHARE < _planned([_capped(sp, 2) for sp in specs])


@pytest.mark.parametrize("free_mib", [0, 4, 16, 20])
def test_too_little_room_for_two_slots_each_is_one_error(tmp_path, free_mib):
    specs = _specs(tmp_path, [str(BBB)] * 3)
    with pytest.raises(PipelineError) as e:
        fit_shared_memory(specs, free_mib * MIB)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"shared memory: /dev/shm has {free_mib}.0 MiB free, and this run's frame and tensor pools "
                           "with the room of a restart need 34.1 MiB at least (122.3 MiB as configured")
    assert "docker run --shm-size=192m" in text


def test_a_source_added_at_runtime_gets_what_the_run_left_of_the_memory_limit(tmp_path):
    """The run's own pools count towards the limit: a source added later gets the rest of its quarter."""
    spec = next(sp for sp in _specs(tmp_path, [str(BBB)], placement="separate") if isinstance(sp, DecodeSpec))
    assert fit_shared_memory([spec], 10**12, 500 * MIB)[0] == [spec]  # (12 slots: 62 MiB with a restart's room)
    out, note = fit_shared_memory([spec], 10**12, 500 * MIB, held_bytes=100 * MIB)
    assert note.startswith("shared memory: the memory limit (500 MiB, cgroup) leaves 125.0 MiB for shared memory, "
                           "of which this run holds 100.0 MiB already, too little for 12 frame slots")
    assert _planned(out) <= 25 * MIB * SHM_SHARE < _planned([_capped(spec, _frame_slots(out)[0] + 1)])
    advised = int(re.search(r"--memory=(\d+)m", note).group(1)) * MIB  # type: ignore[union-attr]
    assert fit_shared_memory([spec], 10**12, advised, held_bytes=100 * MIB)[1] == ""
    with pytest.raises(PipelineError, match=r"leaves 125\.0 MiB for shared memory, of which this run holds 122\.0"):
        fit_shared_memory([spec], 10**12, 500 * MIB, held_bytes=122 * MIB)


@pytest.mark.parametrize(("free_mib", "limit_mib", "binding"), [
    (64, None, "/dev/shm has 64.0 MiB free"),
    (64, 4096, "/dev/shm has 64.0 MiB free"),  # a quarter of the limit is more than /dev/shm has
    (1024, 500, "the memory limit (500 MiB, cgroup) leaves 125.0 MiB for shared memory"),
])
def test_a_memory_limit_bounds_the_pools_too(tmp_path, free_mib, limit_mib, binding):
    specs = _specs(tmp_path, [str(BBB)] * 3)
    out, note = fit_shared_memory(specs, free_mib * MIB, None if limit_mib is None else limit_mib * MIB)
    assert note.startswith(f"shared memory: {binding}, too little for 12 frame slots")
    room = min(free_mib, limit_mib / 4 if limit_mib else free_mib) * MIB
    assert _planned(out) <= room * SHM_SHARE < _planned([_capped(sp, max(_frame_slots(out)) + 1) for sp in specs])
    assert ("--memory=" in note) == binding.startswith("the memory limit")
    assert fit_shared_memory(specs, 10**12, 10**12)[0] is specs


def test_live_sources_and_tcp_are_not_planned(tmp_path):
    live = _specs(tmp_path, ["rtsp://127.0.0.1:9/cam"])  # its pool is made at its first frame
    assert [d.pool_bytes for sp in live for d in _decoders(sp)] == [0]
    out, note = fit_shared_memory(live, 40 * MIB)
    assert out is live and note == ""
    s = settings_with({"sources": [str(BBB)], "model": str(DEFAULT_MODEL)}, transport__mode="tcp")
    tcp = stage_specs(s, prepare_run(s), tcp_endpoints("127.0.0.1", 5700, ["p0"], 1), ["p0"], ["t"])
    assert _planned(tcp) == 0 and fit_shared_memory(tcp, 0) == (tcp, "")  # pixels travel in the messages


needs_small_shm = pytest.mark.skipif(bool(small_shm_unavailable()), reason=small_shm_unavailable())


def _detections(path: Path) -> list[tuple[str, int, list[tuple[list[float], int, float]]]]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return sorted((r["source_id"], r["frame_index"],
                   [(d["box_xyxy"], d["class_id"], d["score"]) for d in r["detections"]])
                  for r in rows if r["schema"].startswith("streamdet.detections"))


@needs_small_shm
def test_three_720p_sources_run_in_dockers_default_shm(tmp_path):
    args = ["--source", str(BBB), "--source", str(BBB), "--source", str(BBB), "--max-frames", "40",
            "--publish", "none"]
    code, _, err = run([*args, "--jsonl", str(tmp_path / "small.jsonl")], prefix=small_shm_prefix(64))
    assert code == 0, err
    warnings = [x for x in err.splitlines() if "shared memory" in x]
    assert len(warnings) == 1, err
    assert re.fullmatch(r"warning: shared memory: /dev/shm has 64\.0 MiB free, too little for 12 frame slots per file "
                        r"source \(\d+\.\d MiB with the tensor pools and the room of a restart\): at most \d each, "
                        r"which may cost throughput \(docker run --shm-size=\d+m gives them all\)", warnings[0])
    assert "SIGBUS" not in err and "restarted" not in err
    code, _, err = run([*args, "--jsonl", str(tmp_path / "big.jsonl")])
    assert code == 0, err
    small, big = _detections(tmp_path / "small.jsonl"), _detections(tmp_path / "big.jsonl")
    assert len(small) == 120 and small == big


@pytest.mark.skipif(bool(cgroup_unavailable("memory")), reason=cgroup_unavailable("memory") or "")
def test_eight_720p_sources_run_in_a_500_mib_container(tmp_path):
    # before the memory limit bounded the pools: 12 frame slots each, stages killed by the OOM killer
    # until the run failed
    out = tmp_path / "out.jsonl"
    args = [a for _ in range(8) for a in ("--source", str(BBB))]
    with limited_cgroup(memory_mib=500) as prefix:
        code, _, err = run([*args, "--max-frames", "20", "--publish", "none", "--jsonl", str(out)], prefix=prefix)
    assert code == 0, err[-3000:]
    assert "OOM" not in err and "restarted" not in err
    assert [x for x in err.splitlines() if "shared memory" in x][0].startswith(
        "warning: shared memory: the memory limit (500 MiB, cgroup) leaves 125.0 MiB for shared memory")
    assert len(_detections(out)) == 160


@needs_small_shm
def test_room_another_run_planned_is_not_free(tmp_path):
    """A run that is starting beside it (its claim of 30 MiB, its ledger there) leaves 34 of the 64 MiB.

    Before the claims, runs starting at once each planned against the whole free room, and the
    later one failed making its pools (``needs 13.7 MiB but /dev/shm has 1.9 MiB free``).
    """
    other = "sd-0000beef-"
    prefix = small_shm_prefix(64)
    prefix[-2] = prefix[-2].replace(" && exec", f" && echo '{other} {30 * MIB}' > /dev/shm/{CLAIMS_FILE} && "
                                              f": > /dev/shm/{other}ledger && exec")
    code, _, err = run(["--source", str(BBB), "--max-frames", "10", "--publish", "none"], prefix=prefix)
    assert code == 0, err
    assert re.fullmatch(r"warning: shared memory: /dev/shm has 64\.0 MiB free, 30\.0 MiB of it planned by other "
                        r"runs, too little for 12 frame slots per file source \(.*\): at most 2 each and 2 tensor "
                        r"slots .*",
                        err.strip()), err
    code, _, err = run(["--source", str(BBB), "--max-frames", "10", "--publish", "none"], prefix=small_shm_prefix(64))
    assert code == 0 and "at most 7 each" in err, err  # alone


def test_claims_are_kept_while_their_run_lives(tmp_path, monkeypatch):
    import pipeline.host as host
    import pipeline.slotpool

    monkeypatch.setattr(host, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(pipeline.slotpool, "SHM_DIR", str(tmp_path))
    (tmp_path / "sd-aaaaaaaa-ledger").touch()
    (tmp_path / "sd-aaaaaaaa-f0.0").write_bytes(b"x" * 8192)  # 8 KiB made of its 100 KiB
    (tmp_path / CLAIMS_FILE).write_text(f"sd-aaaaaaaa- {100 * 1024}\nsd-bbbbbbbb- 5000\ngarbage\n")
    with host._claims() as claims:
        assert claims == {"sd-aaaaaaaa-": 100 * 1024}  # (bbbbbbbb's ledger is gone: it ended)
        made = pipeline.slotpool.shm_bytes_by_run()
        assert made == {"sd-aaaaaaaa-": 8192}  # (its empty ledger takes no page; sd-claims is no run's)
        assert host._pending(claims, "sd-cccccccc-", made) == 92 * 1024
        assert host._pending(claims, "sd-aaaaaaaa-", made) == 0
        claims["sd-cccccccc-"] = 7
    assert (tmp_path / CLAIMS_FILE).read_text() == f"sd-aaaaaaaa- {100 * 1024}\nsd-cccccccc- 7\n"


@needs_small_shm
def test_no_room_at_all_is_one_line_and_exit_1(tmp_path):
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(["--source", str(BBB), "--source", str(BBB), "--publish", "none", "--jsonl", str(out)],
                            prefix=small_shm_prefix(16))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: shared memory: /dev/shm has 16.0 MiB free"), err
    assert "Traceback" not in err + stdout


def _clip_4k(path: Path, frames: int = 3) -> Path:
    """A 3840x2160 MPEG-4 clip: 23.7 MiB a frame slot."""
    import cv2
    import numpy as np

    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (3840, 2160))
    assert out.isOpened()
    for k in range(frames):
        out.write(np.full((2160, 3840, 3), 40 * k, np.uint8))
    out.release()
    return path


@needs_small_shm
def test_a_source_added_at_runtime_gets_507_when_its_frames_do_not_fit(tmp_path):
    import httpx

    from tests.helpers.control import control_pipeline, wait_until

    big = _clip_4k(tmp_path / "4k.mp4")
    with control_pipeline(DEFAULT_MODEL, "--loop", "10000", "--batch", "1", prefix=small_shm_prefix(64)) as run:
        r = httpx.post(run.url + "/sources", json={"url": str(big), "id": "big"}, timeout=30)
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith("source big: shared memory: /dev/shm has "), r.text
        assert "docker run --shm-size=" in r.json()["error"]
        r = httpx.post(run.url + "/sources", json={"url": str(BBB), "id": "bbb"}, timeout=30)
        assert r.status_code == 201, r.text
        wait_until(lambda: (httpx.get(run.url + "/sources/bbb").json().get("frames") or 0) >= 5, 30, "bbb frames")
        assert [s["id"] for s in httpx.get(run.url + "/sources").json()] == ["demo", "bbb"]
    assert run.returncode == 130, run.err
    assert "SIGBUS" not in run.err and "restarted" not in run.err


@pytest.mark.skipif(bool(cgroup_unavailable("memory")), reason=cgroup_unavailable("memory") or "")
def test_a_source_added_at_runtime_in_a_500_mib_container_gets_507_not_the_oom_killer(tmp_path):
    # before: fitted against the free /dev/shm only, the 4K clip got 12 slots (284 MiB) in a 500 MiB limit
    import httpx

    from tests.helpers.control import control_pipeline, wait_until

    big = _clip_4k(tmp_path / "4k.mp4")
    with limited_cgroup(memory_mib=500) as prefix, control_pipeline(
            DEFAULT_MODEL, "--loop", "10000", "--batch", "1", prefix=prefix) as run:
        r = httpx.post(run.url + "/sources", json={"url": str(big), "id": "big"}, timeout=30)
        assert r.status_code == 507, r.text
        assert re.match(r"source big: shared memory: the memory limit \(500 MiB, cgroup\) leaves 125\.0 MiB for "
                        r"shared memory, of which this run holds \d+\.\d MiB already", r.json()["error"]), r.text
        assert "docker run --memory=" in r.json()["error"]
        r = httpx.post(run.url + "/sources", json={"url": str(bikes_path()), "id": "bikes"}, timeout=30)
        assert r.status_code == 201, r.text
        wait_until(lambda: (httpx.get(run.url + "/sources/bikes").json().get("frames") or 0) >= 5, 30, "bikes frames")
    assert run.returncode == 130, run.err
    assert "OOM" not in run.err and "restarted" not in run.err


def _ulimit(soft: int, hard: int | None = None) -> list[str]:
    """A command prefix: run the rest with these open-files limits (``ulimit -S`` / ``-H``)."""
    limits = f"ulimit -Sn {soft}" if hard is None else f"ulimit -n {hard} && ulimit -Sn {soft}"
    return ["sh", "-c", f'{limits} && exec "$@"', "sh"]


def _hard_open_files() -> int:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 30 if hard == resource.RLIM_INFINITY else hard


@pytest.mark.skipif(_hard_open_files() < 4096, reason="needs a hard open-files limit of 4096 or more")
def test_many_sources_run_past_a_soft_open_files_limit_of_1024(tmp_path):
    # 260 sources: about 3400 descriptors and 1050 ZeroMQ sockets in the preprocess process. Before
    # the run raised its soft limit, ZeroMQ there failed with "Too many open files" from 64 sources
    # on; before the stages' contexts allowed more than libzmq's default 1023 sockets, from about 250.
    n = 260
    out = tmp_path / "out.jsonl"
    args = [a for _ in range(n) for a in ("--source", str(bikes_path()))]
    code, _, err = run([*args, "--max-frames", "1", "--publish", "none", "--jsonl", str(out)], prefix=_ulimit(1024))
    assert code == 0, err[-2000:]
    frames = [json.loads(x) for x in out.read_text().splitlines()]
    assert sum(1 for x in frames if x["schema"].startswith("streamdet.detections")) == n


def test_a_stage_context_holds_as_many_sockets_as_the_process_may_open_files():
    import resource

    import zmq

    from pipeline.transport import new_context

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    ctx = new_context()
    try:
        limit = ctx.get(zmq.SOCKET_LIMIT)
        want = limit if soft == resource.RLIM_INFINITY else min(limit, soft)
        assert ctx.get(zmq.MAX_SOCKETS) == max(want, 1023)  # (libzmq's default: 1023)
    finally:
        ctx.term()


def test_too_low_a_hard_open_files_limit_is_one_line_and_exit_1(tmp_path):
    args = [a for _ in range(30) for a in ("--source", str(bikes_path()))]
    code, stdout, err = run([*args, "--publish", "none", "--jsonl", str(tmp_path / "out.jsonl")],
                            prefix=_ulimit(300, 300))
    assert code == 1
    assert err.strip().splitlines() == [
        "error: open files: limited to 300 (ulimit -n, hard limit 300) and 30 sources need about 484: raise the hard "
        "limit (docker run --ulimit nofile=484, LimitNOFILE= in a systemd unit) or run fewer sources"], err
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_running_out_of_descriptors_in_a_stage_is_said_so():
    import errno

    import zmq

    from pipeline.stages.base import describe_error
    from streamdet.messages import StageName

    for e in (zmq.ZMQError(errno.EMFILE), OSError(errno.EMFILE, "Too many open files")):
        text = describe_error(e, StageName.PREPROCESS)
        assert text.startswith("the preprocess stage ran out of file descriptors (")
        assert "the open-files limit is " in text and text.endswith(": ulimit -n)")
    assert describe_error(ValueError("x"), StageName.ENGINE) == "internal error in the engine stage: ValueError: x"


def test_too_few_open_files_for_control_max_sources_is_a_warning_not_an_error():
    import subprocess
    import sys

    from tests.helpers.cli import ROOT

    probe = "from pipeline.host import prepare_host; prepare_host(1, 32); print('ran')"
    out = subprocess.run([*_ulimit(300, 300), sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout == "ran\n", out.stderr
    assert [x for x in out.stderr.splitlines() if x.startswith("warning")] == [
        "warning: open files: limited to 300 (ulimit -n), enough for about 16 sources, not control.max_sources=32: "
        "raise the hard limit (docker run --ulimit nofile=512, LimitNOFILE= in a systemd unit)"]


@pytest.mark.parametrize(("soft", "hard", "kernel_cap", "expected"), [
    (1024, 524288, None, 524288),  # systemd, docker 25+
    (256, "inf", 10240, 10240),  # macOS: unlimited hard limit, kern.maxfilesperproc 10240
    (256, "inf", 24576, 24576),
    (256, "inf", 1000, 256),  # nothing above the soft limit is allowed: kept
    (4096, 4096, None, 4096),
    ("inf", "inf", None, "inf"),
])
def test_open_files_limit_is_raised_as_far_as_the_system_lets_it(monkeypatch, soft, hard, kernel_cap, expected):
    import resource

    from pipeline.host import raise_open_files_limit

    inf = resource.RLIM_INFINITY
    soft, hard, expected = (inf if v == "inf" else v for v in (soft, hard, expected))
    state = {"soft": soft}

    def setrlimit(kind: int, limits: tuple[int, int]) -> None:
        assert kind == resource.RLIMIT_NOFILE and limits[1] == hard
        if kernel_cap is not None and limits[0] > kernel_cap:
            raise ValueError("not allowed to raise maximum limit")
        state["soft"] = limits[0]

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (state["soft"], hard))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert raise_open_files_limit() == (None if expected == inf else (expected, hard))
    assert state["soft"] == expected
