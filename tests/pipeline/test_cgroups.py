"""This process's cgroup limits (pipeline.cgroups): the CPU quota, the memory limit, the OOM killer's kills.

Fake /proc and cgroup trees for each layout (v1, v2, a pod's limit on a parent, a namespaced
container), then real cgroups made by the test where the machine allows (tests/helpers/cgroup.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.helpers.cgroup import cgroup_unavailable, limited_cgroup


def _fake_proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> str:
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(f"{k + 30} 23 0:{k} {m}\n" for k, m in enumerate(mounts)))
    return str(proc)


def _files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _pod_tree(tmp_path: Path, version: str, files: dict[str, str], *, v1_controllers: str) -> str:
    """A process in cgroup /pod/ctr of one hierarchy (v2, or v1 with these controllers) holding ``files``."""
    top = tmp_path / "cgroup"
    top.mkdir()
    _files(top, files)
    if version == "v2":
        return _fake_proc(tmp_path, "0::/pod/ctr\n", [f"/ {top} rw,nosuid - cgroup2 cgroup2 rw"])
    return _fake_proc(tmp_path, f"5:pids:/pod/ctr\n4:{v1_controllers}:/pod/ctr\n0::/\n",
                      [f"/ {tmp_path} rw - tmpfs tmpfs rw", f"/ {top} rw,nosuid - cgroup cgroup rw,{v1_controllers}"])


@pytest.mark.parametrize(("version", "files", "expected"), [
    ("v2", {}, None),  # no limit anywhere
    ("v2", {"pod/ctr/cpu.max": "max 100000"}, None),
    ("v2", {"pod/ctr/cpu.max": "250000 100000"}, 2.5),  # docker run --cpus=2.5
    ("v2", {"pod/cpu.max": "150000 100000", "pod/ctr/cpu.max": "max 100000"}, 1.5),  # a Kubernetes pod's limit
    ("v2", {"pod/cpu.max": "400000 100000", "pod/ctr/cpu.max": "50000 100000"}, 0.5),  # the tightest
    ("v1", {"pod/ctr/cpu.cfs_quota_us": "-1", "pod/ctr/cpu.cfs_period_us": "100000"}, None),
    ("v1", {"pod/ctr/cpu.cfs_quota_us": "200000", "pod/ctr/cpu.cfs_period_us": "100000"}, 2.0),
    ("v1", {"pod/cpu.cfs_quota_us": "300000", "pod/cpu.cfs_period_us": "100000"}, 3.0),
])
def test_cpu_quota_from_cgroup_files(tmp_path, version, files, expected):
    from pipeline.cgroups import cpu_quota

    proc = _pod_tree(tmp_path, version, files, v1_controllers="cpu,cpuacct")
    assert cpu_quota(proc) == expected


def test_cpu_quota_in_a_namespaced_container(tmp_path):
    # inside the container: its cgroup is "/", mounted from the host's /kubepods/pod/ctr
    from pipeline.cgroups import cpu_quota

    top = tmp_path / "cgroup"
    _files(top, {"cpu.max": "100000 100000"})
    proc = _fake_proc(tmp_path, "0::/\n", [f"/ {top} rw - cgroup2 cgroup2 rw"])
    assert cpu_quota(proc) == 1.0
    assert cpu_quota(str(tmp_path / "no-such-proc")) is None


def test_cpu_quota_is_never_read_outside_the_mount(tmp_path):
    # mount root /docker/abc, own cgroup /docker/abc1: a name prefix, not a child. Read as relative to
    # the root by string prefix it was "../abc1", outside the mount.
    from pipeline.cgroups import cpu_quota

    top = tmp_path / "cgroup"
    _files(tmp_path, {"abc1/cpu.max": "25000 100000", "cgroup/cpu.max": "200000 100000"})
    proc = _fake_proc(tmp_path, "0::/docker/abc1\n", [f"/docker/abc {top} rw - cgroup2 cgroup2 rw"])
    assert cpu_quota(proc) == 2.0  # (not below the mount's root: the mount's own cgroup, as the JDK reads it)


def test_cpu_quota_under_a_mount_point_with_a_space(tmp_path):
    from pipeline.cgroups import cpu_quota

    top = tmp_path / "my cgroup"
    _files(top, {"ctr/cpu.max": "300000 100000"})
    mount = str(top).replace(" ", "\\040")
    proc = _fake_proc(tmp_path, "0::/ctr\n", [f"/ {mount} rw - cgroup2 cgroup2 rw"])
    assert cpu_quota(proc) == 3.0


QUOTA_PROBE = """
import os
from pipeline.cgroups import cpu_quota, machine_cores
from pipeline.sources.options import decoder_thread_count
print(cpu_quota(), machine_cores(), len(os.sched_getaffinity(0)), decoder_thread_count())
"""


@pytest.mark.skipif(bool(cgroup_unavailable("cpu")), reason=cgroup_unavailable("cpu") or "")
@pytest.mark.parametrize("cores", [1.0, 1.5])
def test_a_real_cpu_quota_sets_the_cores_a_run_uses(cores):
    import math
    import subprocess
    import sys

    from pipeline.cgroups import cpu_quota
    from tests.helpers.cli import ROOT

    above = cpu_quota()  # (a CI job may run under a tighter quota already)
    with limited_cgroup(cores=cores) as prefix:
        out = subprocess.run([*prefix, sys.executable, "-c", QUOTA_PROBE], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    quota, counted, affinity, decoder_threads = out.stdout.split()
    effective = min(cores, above) if above is not None else cores
    assert float(quota) == effective
    assert int(counted) == min(int(affinity), math.ceil(effective))  # 1.5 rounds up
    assert int(decoder_threads) == (int(counted) if int(counted) < (os.cpu_count() or 1) else 0)


@pytest.mark.parametrize(("cores", "host", "expected"), [
    (64, 64, 0),  # no quota: FFmpeg's own count
    (2, 64, 2),  # docker run --cpus=2 on 64 cores: not 16 threads a decoder
    (1, 2, 1),
    (32, 64, 16),  # FFmpeg's cap
])
def test_decoder_threads_follow_a_cpu_quota(monkeypatch, cores, host, expected):
    import pipeline.sources.options as options

    monkeypatch.setattr(options, "machine_cores", lambda: cores)
    monkeypatch.setattr(options.os, "cpu_count", lambda: host)
    assert options.decoder_thread_count() == expected


@pytest.mark.parametrize(("version", "files", "limit", "kills"), [
    ("v2", {}, None, None),
    ("v2", {"pod/ctr/memory.max": "max\n", "pod/ctr/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n"},
     None, 2),
    ("v2", {"pod/memory.max": "268435456\n", "pod/ctr/memory.max": "max\n",
            "pod/ctr/memory.events": "oom 0\noom_kill 0\n"}, 256 << 20, 0),
    ("v1", {"pod/ctr/memory.limit_in_bytes": "9223372036854771712\n",
            "pod/ctr/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"}, None, 5),
    ("v1", {"pod/ctr/memory.limit_in_bytes": "209715200\n", "pod/memory.limit_in_bytes": "524288000\n"},
     200 << 20, None),
])
def test_memory_limit_and_oom_kills_from_cgroup_files(tmp_path, version, files, limit, kills):
    from pipeline.cgroups import memory_limit, oom_kills

    proc = _pod_tree(tmp_path, version, files, v1_controllers="memory")
    assert memory_limit(proc) == limit
    assert oom_kills(proc) == kills


def test_a_sigkill_names_the_oom_killer_only_when_it_struck(tmp_path):
    import signal

    from pipeline.cgroups import OomWatch
    from pipeline.restarts import exit_reason

    top = tmp_path / "cgroup"
    _files(top, {"ctr/memory.max": "262144000\n", "ctr/memory.events": "oom 0\noom_kill 3\n"})
    proc = _fake_proc(tmp_path, "0::/ctr\n", [f"/ {top} rw - cgroup2 cgroup2 rw"])
    watch = OomWatch(proc)
    assert watch.note() == "" and exit_reason(-signal.SIGKILL, watch) == "killed by SIGKILL"  # kills before the run
    _files(top, {"ctr/memory.events": "oom 1\noom_kill 4\n"})
    assert exit_reason(-signal.SIGKILL, watch) == (
        "killed by SIGKILL (the OOM killer: the cgroup's memory limit is 250 MiB, 1 kill since the run started)")
    assert exit_reason(1, watch) == "exit code 1" and exit_reason(-signal.SIGTERM, watch) == "killed by SIGTERM"
    assert OomWatch(str(tmp_path / "none")).note() == ""  # no cgroup to read


@pytest.mark.skipif(bool(cgroup_unavailable("memory")), reason=cgroup_unavailable("memory") or "")
def test_a_run_out_of_memory_says_so_and_the_runner_survives_to_say_it(tmp_path):
    # 190 MiB: the engine cannot load beside the runner. Before, a stage died "killed by SIGKILL"
    # with no word of memory, and under 200 MiB the OOM killer took the runner itself: exit 137, nothing said.
    from tests.helpers.cli import run

    with limited_cgroup(memory_mib=190) as prefix:
        code, _, err = run(["--publish", "none", "--max-frames", "30", "--jsonl", str(tmp_path / "o.jsonl")],
                           prefix=prefix)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: the \w+ stage (exited unexpectedly|died \d+ times within .*) .*killed by SIGKILL "
                        r"\(the OOM killer: the cgroup's memory limit is 190 MiB, \d+ kills? since the run "
                        r"started\)\)?", last), last


def test_stage_processes_are_preferred_by_the_oom_killer():
    import subprocess
    import sys

    from pipeline.cgroups import STAGE_OOM_SCORE_ADJ

    probe = ("from pipeline.cgroups import prefer_for_oom_kill\n"
             "print(prefer_for_oom_kill(), open('/proc/self/oom_score_adj').read().strip())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", str(STAGE_OOM_SCORE_ADJ)]
