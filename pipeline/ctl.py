"""Control a running pipeline through its control API (``--control-port``): list, add and remove sources.

Usage::

    python -m pipeline.ctl list                       # every source, its state and figures
    python -m pipeline.ctl add rtsp://cam2/stream --id cam2 [--max-fps 10] [--model detector]
    python -m pipeline.ctl remove cam2                # its EOS is published before this returns
    python -m pipeline.ctl health                     # /healthz and /readyz

``--url`` (default ``$STREAMDET_CONTROL_URL``, else ``http://127.0.0.1:8090``) names the API;
``--token`` (default ``$STREAMDET_CONTROL__TOKEN``) its bearer token. Also ``streamdet ctl ...``.
Exit status: 0 done (a 2xx answer), 1 refused by the API (any other status), unreachable or not a
streamdet control API (one line naming the reason), 2 bad arguments (checked before any request:
an ID that is not a source id, a token that is not printable ASCII, a malformed ``--url``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any
from urllib.parse import quote

from streamdet.cli import OneLineErrorParser, invoked_as
from streamdet.constants import EXIT_FAILURE, EXIT_OK

DEFAULT_URL = "http://127.0.0.1:8090"
URL_ENV = "STREAMDET_CONTROL_URL"
TOKEN_ENV = "STREAMDET_CONTROL__TOKEN"
TIMEOUT_S = 30.0
"""Longest wait for an answer (a removal waits for the source's EOS to be published)."""

_COLUMNS = ("id", "kind", "state", "model", "fps", "frames", "dropped", "latency_p50_ms", "latency_p99_ms",
            "restarts", "url")


class CtlError(Exception):
    """The API refused a request, could not be reached, or is not a streamdet control API (one line)."""


REASON_CHARS = 300
"""Longest reason of a refusal an error line shows."""


def _shown(text: str, limit: int = 80) -> str:
    """``text`` for an error line: credentials redacted, whitespace collapsed, cut to ``limit`` characters."""
    from pipeline.transport import redact_url

    text = " ".join(redact_url(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _reason(r: Any) -> str:
    """The reason of a non-2xx answer in one line: the API's ``error``, else a short text, else the status phrase."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "reason", "detail"):
            if isinstance(body.get(key), str) and body[key].strip():
                return _shown(body[key], REASON_CHARS)
    phrase = r.reason_phrase or "error"
    if 300 <= r.status_code < 400 and "location" in r.headers:
        return f"{phrase} (to {_shown(r.headers['location'])})"
    text = " ".join(r.text.split())
    if body is None and text and len(text) <= 120 and "<" not in text:  # a short plain-text reason
        return _shown(text, REASON_CHARS)
    kind = r.headers.get("content-type", "").split(";")[0].strip() or "no content type"
    return f"{phrase} (the answer is not from a streamdet control API: {kind})"


def _request(method: str, url: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    """Send one request; its JSON answer (None if empty).

    Raises:
        CtlError: the API is unreachable, answered a status that is not 2xx, or answered something that is not JSON.
    """
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=TIMEOUT_S)
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:
        raise CtlError(f"{_shown(url)}: cannot reach the control API ({_shown(str(e), REASON_CHARS)})") from e
    if not 200 <= r.status_code < 300:
        raise CtlError(f"{method} {_shown(path)}: {r.status_code} {_reason(r)}")
    if not r.content:
        return None
    try:
        return r.json()
    except ValueError as e:
        raise CtlError(f"{_shown(url)}: not a streamdet control API (the answer is not JSON)") from e


def _unexpected(url: str, what: str) -> CtlError:
    return CtlError(f"{_shown(url)}: not a streamdet control API (unexpected answer to {what})")


def _argument_problems(args: Any, token_from_env: bool) -> list[str]:
    """What is wrong with the arguments, checked before any request (each one line for ``error:``)."""
    import httpx

    problems = []
    try:
        parsed = httpx.URL(args.url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise httpx.InvalidURL("expected http://HOST[:PORT] or https://HOST[:PORT]")
    except (httpx.InvalidURL, UnicodeError) as e:
        problems.append(f"--url {_shown(args.url)!r}: {_shown(str(e), REASON_CHARS)}")
    if args.token and not all(" " <= c <= "~" for c in args.token):  # (a header value is ASCII; never shown)
        name = f"${TOKEN_ENV}" if token_from_env else "--token"
        problems.append(f"{name}: expected printable ASCII characters")
    if args.command == "remove":
        from streamdet.messages import check_source_id

        try:
            check_source_id(args.source_id)
        except ValueError:
            problems.append(f"ID {_shown(args.source_id)!r}: expected a source id, 1-64 characters of "
                            "[A-Za-z0-9_-]")
    return problems


def format_table(sources: list[dict[str, Any]]) -> list[str]:
    """Sources as aligned text rows (a header first)."""
    rows = [list(_COLUMNS)]
    for s in sources:
        rows.append(["-" if s.get(c) is None else (f"{s[c]:.1f}" if isinstance(s[c], float) else str(s[c]))
                     for c in _COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring).

    Returns:
        0 done, 1 refused or unreachable, 2 bad arguments.
    """
    p = OneLineErrorParser(prog=invoked_as("python -m pipeline.ctl"),
                           description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                   help=f"the control API (default ${URL_ENV}, else {DEFAULT_URL})")
    p.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV})")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every source with its state and figures")
    ls.add_argument("--json", action="store_true", help="print the JSON array")
    add = sub.add_parser("add", help="start a source now")
    add.add_argument("source_url", metavar="URL", help="video file path or URL (rtsp://...)")
    add.add_argument("--id", help="source id (default: from the URL)")
    add.add_argument("--max-fps", type=float, help="live sources: pass at most this many frames per second")
    add.add_argument("--model", help="a loaded model, by card name or ONNX path (default: the first)")
    rm = sub.add_parser("remove", help="stop a source (returns once its EOS is published)")
    rm.add_argument("source_id", metavar="ID")
    sub.add_parser("health", help="liveness and readiness")
    args = p.parse_args(argv)
    token_from_env = args.token is None
    if token_from_env:
        args.token = os.environ.get(TOKEN_ENV)
    problems = _argument_problems(args, token_from_env)
    if problems:
        p.error("; ".join(problems))
    try:
        if args.command == "list":
            sources = _request("GET", args.url, "/sources", args.token)
            if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
                raise _unexpected(args.url, "GET /sources")
            lines = [json.dumps(sources)] if args.json else format_table(sources)
            print("\n".join(lines))
        elif args.command == "add":
            body = {"url": args.source_url, "id": args.id, "max_fps": args.max_fps, "model": args.model}
            s = _request("POST", args.url, "/sources", args.token, {k: v for k, v in body.items() if v is not None})
            if not isinstance(s, dict) or not {"id", "kind", "model", "url"} <= set(s):
                raise _unexpected(args.url, "POST /sources")
            print(f"added {s['id']} ({s['kind']}, model {s['model']}): {s['url']}")
        elif args.command == "remove":
            _request("DELETE", args.url, f"/sources/{quote(args.source_id, safe='')}", args.token)
            print(f"removed {args.source_id}")
        else:
            _request("GET", args.url, "/healthz", None)
            try:
                _request("GET", args.url, "/readyz", None)
                print("alive, ready")
            except CtlError as e:
                print(f"alive, not ready ({e})")
                return EXIT_FAILURE
    except CtlError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
