"""The control API against a real pipeline (``run_pipeline.py --control-port``): add, remove, health, bad input.

One pipeline serves the module (a looped file source, a bearer token, a JSONL sink); its output is
checked when it stops. The RTSP and browser tests are in ``test_control_live.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.cli import ROOT, comm_pids, processes_with
from tests.helpers.control import DEMO, ControlRun, control_pipeline, start_pipeline, wait_until
from tests.helpers.standin import bikes_path

pytestmark = pytest.mark.slow

TOKEN = "tok-" + uuid.uuid4().hex


class Api:
    """Requests to the module's pipeline, with its token unless told otherwise."""

    def __init__(self, run: ControlRun, jsonl: Path) -> None:
        self.run = run
        self.url = run.url
        self.jsonl = jsonl

    def get(self, path: str, token: str | None = TOKEN, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers=_auth(token), timeout=30, **kw)

    def post(self, body=None, token: str | None = TOKEN) -> httpx.Response:
        return httpx.post(self.url + "/sources", json=body, headers=_auth(token), timeout=30)

    def delete(self, source_id: str, token: str | None = TOKEN) -> httpx.Response:
        return httpx.delete(f"{self.url}/sources/{source_id}", headers=_auth(token), timeout=30)

    def ids(self) -> list[str]:
        return [s["id"] for s in self.get("/sources").json() if s["state"] != "ended"]


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def api(standin_model, tmp_path_factory) -> Iterator[Api]:
    jsonl = tmp_path_factory.mktemp("control") / "out.jsonl"
    with control_pipeline(standin_model, "--loop", "10000", "--jsonl", str(jsonl), token=TOKEN) as run:
        yield Api(run, jsonl)
    # what the whole module did, checked once the pipeline stopped
    assert run.returncode == 130, run.err
    assert TOKEN not in run.out + run.err and "hunter2" not in run.out + run.err
    assert processes_with(run.marker) == []
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    eos = [x for x in lines if x["schema"] == "streamdet.eos/1"]
    by_source: dict[str, list[int]] = {}
    for x in lines:
        if x["schema"].startswith("streamdet.detections"):
            by_source.setdefault(x["source_id"], []).append(x["frame_index"])
    assert by_source["bikes"] == list(range(len(by_source["bikes"]))) and by_source["bikes"]
    assert by_source["demo"] == list(range(len(by_source["demo"])))
    reasons = {x["source_id"]: x["reason"] for x in eos}
    assert reasons["bikes"] == "removed" and reasons["demo"] == "interrupted"
    assert [x["source_id"] for x in eos].count("bikes") == 1


def test_readyz_is_503_while_starting_then_200(api):
    codes = api.run.ready_codes
    assert codes[0] == 503 and codes[-1] == 200, codes
    r = api.get("/readyz", token=None)
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_healthz_needs_no_token_and_answers_while_the_engine_runs(api):
    for _ in range(10):
        t0 = time.monotonic()
        r = api.get("/healthz", token=None)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert time.monotonic() - t0 < 1.0  # liveness, not a speed figure (bench/control_bench.py has that)


@pytest.mark.parametrize("token", [None, "wrong"], ids=["missing", "wrong"])
@pytest.mark.parametrize("path", ["/sources", "/metrics", "/sources/demo"])
def test_token_is_required(api, path, token):
    r = api.get(path, token=token)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "token" in r.json()["error"]


def test_list_shows_the_running_source(api):
    def listed():  # its first frames (and their stats) arrive within a second on an idle machine, later under load
        (d,) = [s for s in api.get("/sources").json() if s["id"] == "demo"]
        return d if d["frames"] > 0 and d["fps"] is not None and d["latency_p50_ms"] is not None else None

    demo = wait_until(listed, 30, "the demo source's first published frames in GET /sources")
    assert demo["kind"] == "file" and demo["model"] and demo["url"].endswith("demo.mp4")
    assert demo["state"] == "running" and demo["frames"] > 0 and demo["restarts"] == 0
    assert demo["fps"] is not None and demo["latency_p99_ms"] >= demo["latency_p50_ms"] >= 0


def test_metrics_are_the_pipeline_registry(api):
    wait_until(lambda: 'streamdet_frames_total{source="demo"}' in api.get("/metrics").text, 10, "metrics")
    assert api.get("/metrics").headers["content-type"].startswith("text/plain")


def test_openapi_page(api):
    assert api.get("/docs", token=None).status_code == 200
    assert "/sources" in api.get("/openapi.json", token=None).json()["paths"]


BAD_POSTS = [
    ("not-json", b"{url: x", 400, "not valid JSON"),
    ("json-array", b"[1, 2]", 400, "JSON object"),
    ("no-url", {"id": "x1"}, 422, "url"),
    ("unknown-field", {"url": str(DEMO), "fps": 3}, 422, "unknown field"),
    ("malformed-url", {"url": "rtsp://"}, 422, "malformed"),
    ("url-with-space", {"url": "rtsp://cam one/x"}, 422, "without spaces"),
    ("missing-file", {"url": "/no/such/clip.mp4"}, 422, "no such file"),
    ("not-a-video", {"url": str(ROOT / "pyproject.toml")}, 422, "no video stream"),
    ("id-in-use", {"url": str(DEMO), "id": "demo"}, 409, "already in use"),
    ("bad-id", {"url": str(DEMO), "id": "a b"}, 422, "id"),
    ("unknown-model", {"url": str(DEMO), "model": "yolo-nope"}, 422, "not loaded"),
    ("negative-max-fps", {"url": "rtsp://127.0.0.1:9/x", "max_fps": -1}, 422, "max_fps"),
    ("name-too-long", {"url": "/tmp/" + "y" * 256 + ".mp4"}, 422, "…: not a readable path (File name too long)"),
    ("space-in-password", {"url": "rtsp://admin:hunter2 x@127.0.0.1:9/x"}, 422, "'rtsp://***@127.0.0.1:9/x'"),
    ("body-too-large", b'{"url": "' + b"x" * 70_000 + b'"}', 413, "body is larger than 64 KiB"),
]


@pytest.mark.parametrize(("body", "status", "reason"), [b[1:] for b in BAD_POSTS], ids=[b[0] for b in BAD_POSTS])
def test_bad_post_starts_nothing(api, body, status, reason):
    before = api.ids()
    if isinstance(body, bytes):
        r = httpx.post(api.url + "/sources", content=body, timeout=30,
                       headers={**_auth(TOKEN), "content-type": "application/json"})
    else:
        r = api.post(body)
    assert r.status_code == status, r.text
    line = r.json()["error"]
    assert reason in line and "\n" not in line and "hunter2" not in line and len(line) < 300
    assert api.ids() == before
    assert api.get("/readyz").status_code == 200


def test_delete_unknown_is_404(api):
    r = api.delete("no-such-source")
    assert r.status_code == 404 and "no running source" in r.json()["error"]


def test_add_a_file_then_remove_it(api):
    r = api.post({"url": str(bikes_path()), "id": "bikes"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "bikes" and r.json()["kind"] == "file"
    wait_until(lambda: (api.get("/sources/bikes").json().get("frames") or 0) >= 5, 20, "bikes frames")
    demo_before = api.get("/sources/demo").json()["frames"]
    r = api.delete("bikes")
    assert r.status_code == 204 and r.content == b""
    bikes = api.get("/sources/bikes").json()
    assert bikes["state"] == "ended" and bikes["reason"] == "removed"
    assert api.ids() == ["demo"]
    wait_until(lambda: api.get("/sources/demo").json()["frames"] > demo_before, 10, "demo going on")
    assert api.delete("bikes").status_code == 404


def test_add_a_file_with_spaces_in_its_path(api, tmp_path):
    spaced = tmp_path / "cam 1.mp4"  # as --source takes it at start-up
    spaced.symlink_to(DEMO)
    r = api.post({"url": str(spaced), "id": "spaced"})
    assert r.status_code == 201, r.text
    assert (r.json()["kind"], r.json()["url"]) == ("file", str(spaced))
    assert api.delete("spaced").status_code == 204


def test_camera_credentials_never_shown(api):
    r = api.post({"url": "rtsp://admin:hunter2@127.0.0.1:9/stream", "id": "cam-x"})
    assert r.status_code == 201, r.text
    listed = api.get("/sources").text
    assert "hunter2" not in listed and "rtsp://***@127.0.0.1:9/stream" in listed
    assert api.delete("cam-x").status_code == 204


def test_preview_websocket_needs_the_token_and_streams_jpeg(api):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    base = api.url.replace("http", "ws") + "/sources"
    ws_url = base + "/demo/preview"
    for url, code in [(ws_url, 4401), (f"{ws_url}?token=wrong", 4401), (f"{base}/ghost/preview?token={TOKEN}", 4404)]:
        with connect(url) as ws, pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == code, url
    with connect(f"{ws_url}?token={TOKEN}") as ws:
        frames = [ws.recv(timeout=10) for _ in range(3)]
    assert all(isinstance(f, bytes) and f[:2] == b"\xff\xd8" for f in frames)


def test_ctl_client(api):
    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.ctl", "--url", api.url, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "STREAMDET_CONTROL__TOKEN": TOKEN})

    r = ctl("list")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:3] == ["id", "kind", "state"]
    assert any(line.startswith("demo ") for line in r.stdout.splitlines())
    r = ctl("add", "/no/such.mp4")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "422" in r.stderr and "no such file" in r.stderr
    r = ctl("remove", "ghost")
    assert r.returncode == 1 and "404" in r.stderr
    r = ctl("remove", "demo/")  # not a source id: refused before any request (was a 307 taken for "removed")
    assert (r.returncode, r.stdout) == (2, "") and r.stderr.startswith("error: ID 'demo/': ")
    assert "demo" in api.ids()
    assert ctl("health").stdout.strip() == "alive, ready"


def test_port_in_use_is_one_line_at_start_up(standin_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        run = start_pipeline(standin_model, port=port)
        out, err = run.proc.communicate(timeout=60)
    assert run.proc.returncode == 1
    assert err.strip() == f"error: control port {port} on 127.0.0.1: cannot listen (Address already in use)"
    assert processes_with(run.marker) == []


def test_control_needs_ipc_transport(standin_model, tmp_path):
    run = start_pipeline(standin_model, "--set", "transport.mode=tcp")
    out, err = run.proc.communicate(timeout=60)
    assert run.proc.returncode == 1 and err.strip().startswith("error: control.port needs transport.mode ipc")


def _frames_total(metrics: str, source: str) -> float:
    prefix = f'streamdet_frames_total{{source="{source}"}} '
    return next((float(x[len(prefix):]) for x in metrics.splitlines() if x.startswith(prefix)), 0.0)


def test_frame_counts_go_on_over_a_postprocess_restart(standin_model):
    """GET /sources and streamdet_frames_total count what was published, not what the restarted process did."""
    with control_pipeline(standin_model, "--loop", "10000") as run:

        def figures() -> tuple[int, float]:
            (demo,) = [s for s in httpx.get(run.url + "/sources", timeout=5).json() if s["id"] == "demo"]
            return demo["frames"], _frames_total(httpx.get(run.url + "/metrics", timeout=5).text, "demo")

        wait_until(lambda: figures()[1] >= 30, 60, "30 frames published")
        before = figures()
        (pid,) = comm_pids(run.marker, "sd-postprocess")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: comm_pids(run.marker, "sd-postprocess") not in ([], [pid]), 30, "the restarted stage")
        seen = [before]
        wait_until(lambda: seen.append(figures()) or seen[-1][1] >= before[1] + 20, 60, "20 frames more")
    frames, totals = [f for f, _ in seen], [t for _, t in seen]
    assert frames == sorted(frames) and totals == sorted(totals), seen  # never back to 0
    assert "restarted the postprocess stage" in run.err
