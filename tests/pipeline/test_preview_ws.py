"""The preview WebSocket under real uvicorn (the product's :class:`~pipeline.control.server.ControlServer`).

Starlette's ``TestClient`` (``test_control_units.py``) neither enforces the 123-byte limit of a close
reason nor turns a close before the accept into an HTTP 403, as uvicorn does; these tests serve the
app over a fake control plane on a real socket and speak to it with the ``websockets`` client:

* an unknown source id of any length (ASCII or not) is closed with 4404 and a reason cut to fit;
* a cross-origin or rebound-host WebSocket gets close code 4403 after a completed handshake, not HTTP 403;
* a wrong token gets 4401 and an unknown source 4404, after a completed handshake;
* messages from the viewer are ignored: the stream goes on, and ends with a close frame (1000).

No error is logged by uvicorn in any of them (a failed close used to log a traceback).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from pipeline.control.app import create_app
from pipeline.control.server import ControlServer, bind_control_socket
from tests.helpers.control import wait_until
from tests.pipeline.test_control_units import FakePlane

TOKEN = "preview-token"
MAX_REASON_BYTES = 123  # RFC 6455 5.5: a control frame's payload is at most 125 bytes, 2 of them the code


class PreviewPlane(FakePlane):
    """The fake control plane with states: a source listed as ``ended`` is not running.

    Ids in ``removed_on_connect`` are removed as a preview asks for them (a DELETE landing between the
    page's poll and its WebSocket): listed as ``ended`` from then on, and not running.
    """

    def __init__(self) -> None:
        super().__init__()
        self.removed_on_connect: set[str] = set()
        self.asked: list[str] = []

    def is_running(self, source_id: str) -> bool:
        self.asked.append(source_id)
        s = self.sources.get(source_id)
        if s is not None and source_id in self.removed_on_connect:
            s.update(state="ended", reason="removed", fps=None)
        return s is not None and s["state"] != "ended"


class _Errors(logging.Handler):
    """uvicorn's error records (its logger does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Served:
    """The app served by uvicorn on 127.0.0.1: its plane, base URLs and uvicorn's warnings and errors."""

    plane: PreviewPlane
    port: int
    errors: list[logging.LogRecord] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def problems(self) -> list[str]:
        return [r.getMessage() + (f" ({r.exc_info[1]!r})" if r.exc_info else "") for r in self.errors]


@contextmanager
def serve(plane: PreviewPlane, token: str | None = TOKEN) -> Iterator[Served]:
    """The app over ``plane`` under uvicorn as the runner serves it (loopback host checks on); stopped on exit."""
    sock = bind_control_socket("127.0.0.1", 0)
    server = ControlServer(app=create_app(plane, token=token, host="127.0.0.1"), sock=sock)  # type: ignore[arg-type]
    handler = _Errors()
    logger = logging.getLogger("uvicorn.error")  # (configured by uvicorn.Config, in ControlServer's constructor)
    logger.addHandler(handler)
    served = Served(plane, sock.getsockname()[1], handler.records)
    server.start()
    try:
        wait_until(lambda: server.server.started, 10, "uvicorn started")
        yield served
    finally:
        plane.preview.close()  # open streams end, as when the run stops
        server.stop()
        logger.removeHandler(handler)


@pytest.fixture
def served() -> Iterator[Served]:
    plane = PreviewPlane()
    with serve(plane) as s:
        yield s
    assert s.problems() == [], "uvicorn logged problems"


def _close_of(ws: ClientConnection) -> tuple[int | None, str]:
    """The close frame the server sent (code, reason) once it closes; no frame may come before."""
    with pytest.raises(ConnectionClosed) as info:
        got = ws.recv(timeout=10)
        pytest.fail(f"a message before the close: {got!r}")
    rcvd = info.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")


LONG_IDS = {
    "ascii-105": "a" * 105,  # the longest ASCII id whose reason fits whole
    "ascii-106": "a" * 106,
    "ascii-2000": "b" * 2000,
    "latin-60": "é" * 60,  # 2 bytes each
    "cjk-50": "日本" * 25,  # 3 bytes each
    "emoji-40": "a" + "🎥" * 40,  # 4 bytes each, off by one byte
}


@pytest.mark.parametrize("source_id", list(LONG_IDS.values()), ids=list(LONG_IDS))
def test_unknown_long_id_is_closed_4404_with_a_reason_that_fits(served, source_id):
    with connect(f"{served.ws}/sources/{source_id}/preview?token={TOKEN}") as ws:
        code, reason = _close_of(ws)
    whole = f"no running source {source_id}"
    assert code == 4404, served.problems()
    assert len(reason.encode()) <= MAX_REASON_BYTES
    if len(whole.encode()) <= MAX_REASON_BYTES:
        assert reason == whole
    else:
        assert reason.endswith("…") and whole.startswith(reason[:-1]) and len(reason.encode()) >= MAX_REASON_BYTES - 3


@pytest.mark.parametrize(("host", "origin"), [
    ("127.0.0.1", "https://evil.example"),
    ("127.0.0.1", "null"),
    ("127.0.0.1", "https://" + "e" * 300 + ".example"),  # the reason names it: cut to fit
    ("attacker.example", None),  # DNS rebinding
    ("a" * 300 + ".example", None),
], ids=["foreign-origin", "null-origin", "long-origin", "rebound-host", "long-rebound-host"])
def test_cross_site_preview_is_closed_4403_after_the_handshake(served, host, origin):
    served.plane.preview.put("cam", b"\xff\xd8jpeg")
    url = f"ws://{host}:{served.port}/sources/cam/preview?token={TOKEN}"  # (Host: what the URL names)
    try:
        ws = connect(url, origin=origin, sock=socket.create_connection(("127.0.0.1", served.port)))
    except InvalidStatus as e:  # (an HTTP refusal: a browser sees 1006, no code)
        pytest.fail(f"the handshake was refused: {e}")
    with ws:
        code, reason = _close_of(ws)
    assert code == 4403 and "refused" in reason and len(reason.encode()) <= MAX_REASON_BYTES
    assert served.plane.preview.viewers("cam") == 0 and "cam" not in served.plane.asked  # the app never ran


@pytest.mark.parametrize(("path", "expected"), [
    ("/sources/cam/preview", 4401),
    ("/sources/cam/preview?token=wrong", 4401),
    (f"/sources/ghost/preview?token={TOKEN}", 4404),
    (f"/sources/cam/preview?token={TOKEN}", None),  # accepted: a frame
], ids=["no-token", "wrong-token", "unknown", "ok"])
def test_refusals_come_after_a_completed_handshake(served, path, expected):
    served.plane.preview.put("cam", b"\xff\xd8jpeg")
    with connect(served.ws + path, origin=served.http) as ws:  # (a same-origin page)
        if expected is None:
            assert ws.recv(timeout=10) == b"\xff\xd8jpeg"
            return
        code, _ = _close_of(ws)
    assert code == expected


def test_messages_from_the_viewer_are_ignored(served):
    hub = served.plane.preview
    hub.put("cam", b"\xff\xd8one")
    with connect(f"{served.ws}/sources/cam/preview?token={TOKEN}") as ws:
        assert ws.recv(timeout=10) == b"\xff\xd8one"
        ws.send("hello")
        ws.send(b"\x00" * 1000)
        ws.ping()
        threading.Event().wait(0.3)  # (the server has read them by now)
        hub.put("cam", b"\xff\xd8two")
        assert ws.recv(timeout=10) == b"\xff\xd8two", "the stream ended when the viewer sent a message"
        assert hub.viewers("cam") == 1
        ws.send("more")
        hub.put("cam", b"\xff\xd8three")
        assert ws.recv(timeout=10) == b"\xff\xd8three"
        del served.plane.sources["cam"]  # the source ends: a close frame says so
        code, _ = _close_of(ws)
    assert code == 1000
    wait_until(lambda: hub.viewers("cam") == 0, 5, "the viewer uncounted")


def test_viewer_leaving_is_uncounted(served):
    hub = served.plane.preview
    hub.put("cam", b"\xff\xd8one")
    with connect(f"{served.ws}/sources/cam/preview?token={TOKEN}") as ws:
        assert ws.recv(timeout=10) == b"\xff\xd8one"
        assert hub.viewers("cam") == 1
    wait_until(lambda: hub.viewers("cam") == 0, 5, "the viewer uncounted once it left")
