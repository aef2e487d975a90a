"""The ``pipeline.ctl`` client against scripted answers (no server, no socket): what it prints for each.

Every answer that is not 2xx is an error, as is one that is not JSON or not shaped like the control
API's (a metrics port, a proxy's HTML page); bad arguments are refused before any request, exit 2.
Each case is one ``error:`` line, never a traceback. The client against the real app is in
``test_control_units.py``, against a running pipeline in ``test_control.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pipeline import ctl

URL = "http://ctl.test"
JSON = "application/json"
HTML_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
            b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n" + b"<!-- padding -->\r\n" * 6)
METRICS = b'# HELP streamdet_frames_total Frames published\nstreamdet_frames_total{source="demo"} 12.0\n'
SOURCE = {"id": "cam2", "url": "rtsp://***@cam2/x", "kind": "live", "state": "starting", "model": "detector",
          "fps": None, "dropped": 0, "latency_p50_ms": None, "latency_p99_ms": None, "frames": 0, "restarts": 0,
          "reason": None, "error": None}


class Server:
    """Stands in for ``httpx.request``: records each request and gives the scripted answer (or raises it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.answer: Callable[[httpx.Request], httpx.Response] = lambda req: httpx.Response(204, request=req)

    def request(self, method: str, url: str, *, json: Any = None, headers: Any = None, timeout: Any = None) -> Any:
        self.calls.append((method, url))
        self.headers.append(dict(headers or {}))
        return self.answer(httpx.Request(method, url))


@pytest.fixture
def server(monkeypatch) -> Server:
    s = Server()
    monkeypatch.setattr(httpx, "request", s.request)
    monkeypatch.delenv(ctl.TOKEN_ENV, raising=False)
    return s


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = ctl.main(["--url", URL, *argv])
    except SystemExit as e:  # argparse's usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _answer(status: int, body: bytes | Any = b"", content_type: str | None = None,
            **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    if not isinstance(body, bytes):
        body, content_type = json.dumps(body).encode(), JSON
    if content_type:
        headers["content-type"] = content_type
    return lambda req: httpx.Response(status, content=body, headers=headers, request=req)


ANSWERS = [
    # (id, argv, answer, exit status, stdout, stderr)
    ("list-metrics-port", ["list"], _answer(200, METRICS, "text/plain; version=0.0.4"), 1, "",
     f"error: {URL}: not a streamdet control API (the answer is not JSON)\n"),
    ("health-html-page", ["health"], _answer(200, b"<html>hello</html>", "text/html"), 1, "",
     f"error: {URL}: not a streamdet control API (the answer is not JSON)\n"),
    ("list-json-object", ["list"], _answer(200, {"detail": "hi"}), 1, "",
     f"error: {URL}: not a streamdet control API (unexpected answer to GET /sources)\n"),
    ("list-json-numbers", ["list", "--json"], _answer(200, [1, 2]), 1, "",
     f"error: {URL}: not a streamdet control API (unexpected answer to GET /sources)\n"),
    ("add-json-not-a-source", ["add", "rtsp://cam2/x"], _answer(201, {"ok": True}), 1, "",
     f"error: {URL}: not a streamdet control API (unexpected answer to POST /sources)\n"),
    ("remove-redirect", ["remove", "k1"], _answer(307, location=f"{URL}/sources/k1/"), 1, "",
     f"error: DELETE /sources/k1: 307 Temporary Redirect (to {URL}/sources/k1/)\n"),
    ("list-moved", ["list"], _answer(301, b"", "text/html", location="https://other.test/sources"), 1, "",
     "error: GET /sources: 301 Moved Permanently (to https://other.test/sources)\n"),
    ("list-not-modified", ["list"], _answer(304), 1, "",
     "error: GET /sources: 304 Not Modified (the answer is not from a streamdet control API: no content type)\n"),
    ("list-proxy-html", ["list"], _answer(502, HTML_502, "text/html"), 1, "",
     "error: GET /sources: 502 Bad Gateway (the answer is not from a streamdet control API: text/html)\n"),
    ("remove-plain-500", ["remove", "k1"], _answer(500, b"Internal Server Error", "text/plain; charset=utf-8"), 1,
     "", "error: DELETE /sources/k1: 500 Internal Server Error\n"),
    ("list-empty-503", ["list"], _answer(503), 1, "",
     "error: GET /sources: 503 Service Unavailable (the answer is not from a streamdet control API: "
     "no content type)\n"),
    ("add-api-error", ["add", "/no/such.mp4"], _answer(422, {"error": "/no/such.mp4: no such file"}), 1, "",
     "error: POST /sources: 422 /no/such.mp4: no such file\n"),
    ("add-multiline-error", ["add", "x.mp4"], _answer(500, {"error": "first\n  second"}), 1, "",
     "error: POST /sources: 500 first second\n"),
    ("list-fastapi-detail", ["list"], _answer(404, {"detail": "Not Found"}), 1, "",
     "error: GET /sources: 404 Not Found\n"),
    ("remove-204", ["remove", "k1"], _answer(204), 0, "removed k1\n", ""),
    ("add-201", ["add", "rtsp://cam2/x", "--id", "cam2"], _answer(201, SOURCE), 0,
     "added cam2 (live, model detector): rtsp://***@cam2/x\n", ""),
    ("list-json-200", ["list", "--json"], _answer(200, [SOURCE]), 0, json.dumps([SOURCE]) + "\n", ""),
    ("health-ready", ["health"], _answer(200, {"status": "ok"}), 0, "alive, ready\n", ""),
]


@pytest.mark.parametrize(("argv", "answer", "rc", "out", "err"), [c[1:] for c in ANSWERS], ids=[c[0] for c in ANSWERS])
def test_ctl_answers(server, capsys, argv, answer, rc, out, err):
    server.answer = answer
    assert _run(capsys, *argv) == (rc, out, err)
    assert len(server.calls) >= 1


def _raises(e: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def answer(req: httpx.Request) -> httpx.Response:
        raise e

    return answer


@pytest.mark.parametrize("error", [
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ReadTimeout("timed out"),
    httpx.InvalidURL("Invalid non-printable ASCII character in URL"),
    UnicodeEncodeError("ascii", "naïve", 2, 3, "ordinal not in range(128)"),
], ids=["refused", "timeout", "invalid-url", "unicode"])
def test_ctl_request_failures_are_one_line(server, capsys, error):
    server.answer = _raises(error)
    rc, out, err = _run(capsys, "list")
    assert (rc, out) == (1, "")
    assert err.startswith(f"error: {URL}: cannot reach the control API (") and err.count("\n") == 1


ID_PROBLEM = "expected a source id, 1-64 characters of [A-Za-z0-9_-] (see --help)"
BAD_ARGS = [
    # (id, argv, env token, stderr line): refused before any request, exit 2
    ("remove-trailing-slash", ["remove", "k1/"], None, f"error: ID 'k1/': {ID_PROBLEM}"),
    ("remove-empty", ["remove", ""], None, f"error: ID '': {ID_PROBLEM}"),
    ("remove-fragment", ["remove", "k1#x"], None, f"error: ID 'k1#x': {ID_PROBLEM}"),
    ("remove-query", ["remove", "k1?a=1"], None, f"error: ID 'k1?a=1': {ID_PROBLEM}"),
    ("remove-dot-dot", ["remove", ".."], None, f"error: ID '..': {ID_PROBLEM}"),
    ("remove-space", ["remove", "k 1"], None, f"error: ID 'k 1': {ID_PROBLEM}"),
    ("remove-65-chars", ["remove", "a" * 65], None, f"error: ID '{'a' * 65}': {ID_PROBLEM}"),
    ("token-non-ascii", ["--token", "naïve", "list"], None,
     "error: --token: expected printable ASCII characters (see --help)"),
    ("token-newline", ["--token", "a\nb", "list"], None,
     "error: --token: expected printable ASCII characters (see --help)"),
    ("env-token-non-ascii", ["list"], "naïve",
     f"error: ${ctl.TOKEN_ENV}: expected printable ASCII characters (see --help)"),
    ("url-scheme", ["--url", "ftp://x", "list"], None,
     "error: --url 'ftp://x': expected http://HOST[:PORT] or https://HOST[:PORT] (see --help)"),
    ("url-no-scheme", ["--url", "127.0.0.1:8090", "list"], None,
     "error: --url '127.0.0.1:8090': expected http://HOST[:PORT] or https://HOST[:PORT] (see --help)"),
    ("url-no-host", ["--url", "http:///x", "health"], None,
     "error: --url 'http:///x': expected http://HOST[:PORT] or https://HOST[:PORT] (see --help)"),
    ("url-credentials-redacted", ["--url", "ftp://u:secret@x", "list"], None,
     "error: --url 'ftp://***@x': expected http://HOST[:PORT] or https://HOST[:PORT] (see --help)"),
    ("two-problems", ["--url", "ftp://x", "--token", "naïve", "remove", "k1/"], None,
     "error: --url 'ftp://x': expected http://HOST[:PORT] or https://HOST[:PORT]; --token: expected printable "
     f"ASCII characters; ID 'k1/': {ID_PROBLEM}"),
]


@pytest.mark.parametrize(("argv", "env_token", "line"), [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_ctl_bad_arguments_send_nothing(server, capsys, monkeypatch, argv, env_token, line):
    if env_token is not None:
        monkeypatch.setenv(ctl.TOKEN_ENV, env_token)
    rc, out, err = _run(capsys, *argv)
    assert (rc, out, err) == (2, "", line + "\n")
    assert server.calls == []


def test_ctl_bad_url_port_is_one_line(server, capsys):
    rc, out, err = _run(capsys, "--url", "http://[::1", "list")
    assert (rc, out) == (2, "") and err.startswith("error: --url 'http://[::1': ") and err.count("\n") == 1
    assert server.calls == []


def test_ctl_remove_quotes_the_id_and_answers_any_valid_one(server, capsys):
    assert _run(capsys, "remove", "Cam_2-b") == (0, "removed Cam_2-b\n", "")
    assert server.calls == [("DELETE", f"{URL}/sources/Cam_2-b")]


def test_ctl_empty_token_means_none(server, capsys, monkeypatch):
    monkeypatch.setenv(ctl.TOKEN_ENV, "")
    assert _run(capsys, "remove", "k1") == (0, "removed k1\n", "")
    assert server.headers == [{}]


def test_ctl_token_flag_wins_over_the_environment(server, capsys, monkeypatch):
    monkeypatch.setenv(ctl.TOKEN_ENV, "naïve")  # not used, so not checked
    assert _run(capsys, "--token", "t-1 x", "remove", "k1") == (0, "removed k1\n", "")
    assert server.headers == [{"Authorization": "Bearer t-1 x"}]
