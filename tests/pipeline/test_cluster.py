"""The cluster's pieces that need no Ray: the relay (exactly once, in order), unit settings, a unit run.

The runs over a real Ray cluster are in ``test_cluster_ray.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import SecretStr

from pipeline.cluster.relay import Relay, placement_status
from pipeline.cluster.worker import KIND_PLACED, KIND_SUMMARY, UnitRun, UnitSpec, unit_settings
from pipeline.settings import SourceEntry
from pipeline.stages.forward_sink import KIND_DETECTIONS, KIND_EOS, KIND_STATUS
from pipeline.stages.sink_base import FrameResult, Sink
from streamdet.messages import EndOfStream
from tests.helpers.settings import settings_with


class Recorder(Sink):
    """Records what it is given, as ``(what, source_id, payload)``."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, Any]] = []

    def describe(self) -> str:
        return "recorder"

    def open(self) -> None:
        pass

    def write(self, result: FrameResult) -> None:
        raise AssertionError("the relay passes encoded payloads")

    def write_json(self, source_id: str, payload_json: bytes) -> None:
        self.got.append(("detections", source_id, json.loads(payload_json)["frame_index"]))

    def end_of_stream(self, eos: EndOfStream) -> None:
        self.got.append(("eos", eos.source_id, (eos.frames, eos.reason.value)))

    def status(self, payload: Any) -> None:
        self.got.append(("status", str(payload["source_id"]), payload["state"]))

    def close(self) -> None:
        pass


def det(sid: str, i: int) -> tuple[bytes, str, bytes, int]:
    payload = {"source_id": sid, "frame_index": i, "detections": [{"box_xyxy": [0, 0, 1, 1]}]}
    return (KIND_DETECTIONS, sid, json.dumps(payload).encode(), i)


def eos(sid: str, frames: int) -> tuple[bytes, str, bytes, int]:
    body = {"schema": "streamdet.eos/1", "source_id": sid, "frames": frames, "reason": "finished", "error": None}
    return (KIND_EOS, sid, json.dumps(body).encode(), -1)


def test_a_retried_file_is_published_exactly_once_in_order():
    sink = Recorder()
    relay = Relay(sinks=[sink], sources=[("a", False), ("b", False)])
    relay.feed([det("a", 0), det("a", 1), det("b", 0), det("a", 2)])  # attempt 1 dies after frame 2 of a
    relay.feed([det("a", 0), det("a", 1), det("a", 2), det("a", 3), eos("a", 4)])  # attempt 2 from the start
    relay.feed([det("b", 1), eos("b", 2), eos("b", 2)])  # a repeated EOS
    frames = {sid: [x for what, s, x in sink.got if what == "detections" and s == sid] for sid in "ab"}
    assert frames == {"a": [0, 1, 2, 3], "b": [0, 1]}
    assert [g for g in sink.got if g[0] == "eos"] == [("eos", "a", (4, "finished")), ("eos", "b", (2, "finished"))]
    assert relay.tally["a"].duplicates == 3 and relay.tally["a"].frames == 4 and relay.tally["a"].detections == 4
    assert relay.ended(["a", "b"])


def test_a_gap_in_a_file_is_refused():
    relay = Relay(sinks=[Recorder()], sources=[("a", False)])
    relay.feed([det("a", 0)])
    with pytest.raises(ValueError, match="source a: frame 2 arrived before frame 1"):
        relay.feed([det("a", 2)])


def test_cameras_skip_the_sinks_their_workers_publish_to_but_get_their_placement():
    driver, mqtt = Recorder(), Recorder()
    relay = Relay(sinks=[driver, mqtt], worker_published=[mqtt], sources=[("cam", True), ("file", False)])
    status = {"schema": "streamdet.status/1", "source_id": "cam", "state": "connected"}
    relay.feed([det("cam", 5), (KIND_STATUS, "cam", json.dumps(status).encode(), -1), det("file", 0)])
    relay.place(["cam"], {"node_id": "n1", "node_ip": "10.0.0.1", "attempt": 0})
    relay.place(["cam"], {"node_id": "n2", "node_ip": "10.0.0.2", "attempt": 1})
    relay.feed([det("cam", 0)])  # a moved camera counts from 0 again: published, not a duplicate
    assert driver.got == [("detections", "cam", 5), ("status", "cam", "connected"), ("detections", "file", 0),
                          ("status", "cam", "placed"), ("status", "cam", "moved"), ("detections", "cam", 0)]
    assert mqtt.got == [("detections", "file", 0), ("status", "cam", "placed"), ("status", "cam", "moved")]


def test_placement_status_names_the_node():
    moved = placement_status("cam", {"node_id": "abc" * 10, "node_ip": "10.0.0.2", "attempt": 2}, moved=True,
                             previous="old")
    assert moved["state"] == "moved" and moved["node"] == "abc" * 10 and moved["previous_node"] == "old"
    assert moved["node_ip"] == "10.0.0.2" and moved["schema"] == "streamdet.status/1"
    assert moved["message"] == "moved to 10.0.0.2 (node abcabcabcabc)"
    assert placement_status("cam", {"node_id": "n"}, moved=False)["previous_node"] is None


def test_a_file_failed_for_good_gets_an_error_eos_once():
    sink = Recorder()
    relay = Relay(sinks=[sink], sources=[("a", False)])
    relay.feed([det("a", 0)])
    relay.fail("a", "a.mp4: failed on the cluster after 4 attempts (NodeDiedError)")
    relay.fail("a", "again")
    assert [g for g in sink.got if g[0] == "eos"] == [("eos", "a", (1, "error"))]
    assert relay.errors[0].startswith("a.mp4: failed on the cluster after 4 attempts")


def test_the_cluster_line_counts_every_node_a_unit_ran_on():
    """A file retried on another node ran on both: before, only its last placement counted ("on 1 nodes")."""
    from pipeline.cluster.driver import ClusterRun, _Unit

    run = ClusterRun(settings=settings_with({"sinks": {"publish": None}}, cluster__ray_address="127.0.0.1:1"))
    run.relay = Relay(sinks=[Recorder()], sources=[("a", False), ("b", False)])
    a, b = (_Unit(spec=UnitSpec(settings={}, source_ids=(sid,)), display=f"{sid}.mp4") for sid in "ab")
    run.units = [a, b]

    def placed(node: str) -> list[tuple[bytes, str, bytes, int]]:
        return [(KIND_PLACED, "", json.dumps({"node_id": node, "node_ip": "127.0.0.1", "pid": 1}).encode(), -1)]

    run._receive(a, placed("n1"))
    run._receive(b, placed("n2"))
    run._receive(a, [det("a", 0)])
    a.attempt = 1  # n1 died: a runs again, on n2 (where b runs)
    run._receive(a, placed("n2"))
    assert run._cluster_line() == "cluster: 2 units on 2 nodes, 1 file retries, 0 shard moves"


def test_unit_settings_keep_only_the_unit_and_make_paths_absolute(monkeypatch, tmp_path):
    s = settings_with({"sources": ["x.mp4", "rtsp://cam/1"], "sinks": {"jsonl": "o.jsonl"}},
                      sinks__mqtt="mqtt://127.0.0.1:1883", sinks__mqtt_password="pw", model="m.onnx",
                      cluster__ray_address="127.0.0.1:1")
    monkeypatch.chdir(tmp_path)
    data = unit_settings(s, [SourceEntry(url="x.mp4", id="x")], keep_mqtt=False)
    assert data["sources"] == [{"url": str(tmp_path / "x.mp4"), "id": "x"}]
    assert data["model"] == str(tmp_path / "m.onnx") and data["cluster"]["ray_address"] is None
    assert data["sinks"]["jsonl"] is None and data["sinks"]["publish"] is None and data["sinks"]["mqtt"] is None
    cams = unit_settings(s, [SourceEntry(url="rtsp://cam/1", id="c")], keep_mqtt=True)
    assert cams["sources"] == [{"url": "rtsp://cam/1", "id": "c"}]
    assert cams["sinks"]["mqtt"] == "mqtt://127.0.0.1:1883" and cams["sinks"]["mqtt_password"] == "pw"
    assert isinstance(s.sinks.mqtt_password, SecretStr)


def test_a_unit_yields_its_frames_in_order_then_its_summary(standin_model):
    s = settings_with({"model": str(standin_model), "sinks": {"publish": None}}, max_frames=12)
    entry = SourceEntry(url=str(s.sources[0]), id="demo")
    spec = UnitSpec(settings=unit_settings(s, [entry], keep_mqtt=False), source_ids=("demo",))
    messages = [m for batch in UnitRun(spec).batches() for m in batch]
    kinds = [m[0] for m in messages]
    assert kinds == [KIND_DETECTIONS] * 12 + [KIND_EOS, KIND_SUMMARY]
    assert [m[3] for m in messages[:12]] == list(range(12))
    summary = json.loads(messages[-1][2])
    assert summary["exit_code"] == 0 and summary["frames"] == 12


def test_the_annotated_video_is_refused_on_a_cluster_before_connecting(tmp_path):
    from pipeline.cluster.driver import ClusterRun
    from pipeline.summary import PipelineError

    s = settings_with({"sinks": {"publish": None}}, sinks__video_out=str(tmp_path / "o.mp4"),
                      cluster__ray_address="127.0.0.1:1")
    with pytest.raises(PipelineError, match=r"^sinks.video_out: the annotated video is not available on a cluster"):
        ClusterRun(settings=s).run(handle_signals=False)


def test_a_single_host_run_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys; from pipeline.cli import run_main; "
            "code = run_main(['--max-frames', '2', '--publish', 'none', '--quiet']); "
            "assert code == 0 and 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
