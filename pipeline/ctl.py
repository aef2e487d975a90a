"""Control a running pipeline through its control API (``--control-port``): list, add and remove sources.

Usage::

    python -m pipeline.ctl list                       # every source, its state and figures
    python -m pipeline.ctl add rtsp://cam2/stream --id cam2 [--max-fps 10] [--model detector]
    python -m pipeline.ctl remove cam2                # its EOS is published before this returns
    python -m pipeline.ctl health                     # /healthz and /readyz

``--url`` (default ``$STREAMDET_CONTROL_URL``, else ``http://127.0.0.1:8090``) names the API;
``--token`` (default ``$STREAMDET_CONTROL__TOKEN``) its bearer token. Also ``streamdet ctl ...``.
Exit status: 0 done, 1 refused by the API or unreachable (one line naming the reason), 2 bad arguments.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from streamdet.cli import OneLineErrorParser
from streamdet.constants import EXIT_FAILURE, EXIT_OK

DEFAULT_URL = "http://127.0.0.1:8090"
URL_ENV = "STREAMDET_CONTROL_URL"
TOKEN_ENV = "STREAMDET_CONTROL__TOKEN"
TIMEOUT_S = 30.0
"""Longest wait for an answer (a removal waits for the source's EOS to be published)."""

_COLUMNS = ("id", "kind", "state", "model", "fps", "frames", "dropped", "latency_p50_ms", "latency_p99_ms",
            "restarts", "url")


class CtlError(Exception):
    """The API refused a request, or could not be reached (one line)."""


def _request(method: str, url: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        raise CtlError(f"{url}: cannot reach the control API ({e})") from e
    if r.status_code >= 400:
        try:
            reason = r.json().get("error") or r.json().get("reason") or r.text
        except ValueError:
            reason = r.text.strip() or r.reason_phrase
        raise CtlError(f"{method} {path}: {r.status_code} {reason}")
    return r.json() if r.content else None


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
    p = OneLineErrorParser(prog="python -m pipeline.ctl", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                   help=f"the control API (default ${URL_ENV}, else {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token (default ${TOKEN_ENV})")
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
    try:
        if args.command == "list":
            sources = _request("GET", args.url, "/sources", args.token)
            lines = [json.dumps(sources)] if args.json else format_table(sources)
            print("\n".join(lines))
        elif args.command == "add":
            body = {"url": args.source_url, "id": args.id, "max_fps": args.max_fps, "model": args.model}
            s = _request("POST", args.url, "/sources", args.token, {k: v for k, v in body.items() if v is not None})
            print(f"added {s['id']} ({s['kind']}, model {s['model']}): {s['url']}")
        elif args.command == "remove":
            _request("DELETE", args.url, f"/sources/{args.source_id}", args.token)
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
