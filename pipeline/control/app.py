"""The control API and the preview page: a FastAPI app over the runner's :class:`~pipeline.control.plane.ControlPlane`.

Endpoints (OpenAPI page at ``/docs``, schema at ``/openapi.json``):

* ``GET /sources``: every source with its figures; ``GET /sources/{id}``: one;
* ``POST /sources`` ``{"url", "id", "max_fps", "model"}``: start a source now (201);
* ``DELETE /sources/{id}``: stop it, its EOS published and its slots freed (204);
* ``GET /healthz``: the runner answers (always open); ``GET /readyz``: every stage ready (200) or
  503 with the reason (always open);
* ``GET /metrics``: the Prometheus exposition of the pipeline's registry;
* ``GET /``: the preview page; ``WS /sources/{id}/preview``: its annotated frames as JPEG
  messages; ``GET /sources/{id}/preview.mjpg``: the same as an MJPEG stream (``<img src>``, VLC).

With ``control.token`` set, every endpoint but ``/healthz``, ``/readyz``, ``/`` and the OpenAPI
pages wants ``Authorization: Bearer TOKEN`` (the preview streams also take ``?token=TOKEN``, as a
browser cannot set headers on a WebSocket or an ``<img>``): 401 otherwise. Errors are JSON
``{"error": "<one line>"}``. Modelled on DeepStream's ``nvmultiurisrcbin`` REST API (stream add
and remove) and Roboflow's ``/healthz`` / ``/readiness`` / ``/metrics``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.control.plane import ControlError, ControlPlane
from pipeline.control.server import LOOPBACK_NAMES

PREVIEW_POLL_S = 0.02
"""How often a preview stream looks for a newer frame, seconds."""

MJPEG_BOUNDARY = "streamdet-frame"

MAX_CLOSE_REASON_BYTES = 123
"""Longest WebSocket close reason in UTF-8 bytes: a close frame carries 125, 2 of them the code (RFC 6455 5.5)."""


def close_reason(template: str, value: str) -> str:
    """``template.format(value)`` as a WebSocket close reason, ``value`` cut (``…``) so that it fits.

    The values are what the client sent (a source id, an ``Origin``, a ``Host``), of any length; a
    reason over :data:`MAX_CLOSE_REASON_BYTES` of UTF-8 is a protocol error (uvicorn logs a traceback
    and drops the connection without a close code).
    """

    def encoded(shown: str) -> bytes:
        return template.format(shown).encode("utf-8", "replace")

    lo, hi = (len(value), len(value)) if len(encoded(value)) <= MAX_CLOSE_REASON_BYTES else (0, len(value) - 1)
    while lo < hi:  # the longest prefix that fits with its "…"
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(encoded(value[:mid] + "…")) <= MAX_CLOSE_REASON_BYTES else (lo, mid - 1)
    text = encoded(value if lo == len(value) else value[:lo] + "…")
    return text[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")


class AddSource(BaseModel):
    """Body of ``POST /sources``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, description="video file path or URL (rtsp://...); credentials are never shown")
    id: str | None = Field(default=None, description="source id, [A-Za-z0-9_-]{1,64} (default: from the URL)")
    max_fps: float | None = Field(default=None, gt=0.0, description="live sources: pass at most this many fps")
    model: str | None = Field(default=None, description="a loaded model, by card name or ONNX path (default: "
                                                        "the first)")


class SourceView(BaseModel):
    """One source as ``GET /sources`` shows it."""

    id: str
    url: str = Field(description="path or URL, credentials redacted")
    kind: str = Field(description="file or live")
    state: str = Field(description="starting, running, connected, reconnecting, ..., removing, ended")
    model: str
    fps: float | None = Field(description="frames published per second over the last 2 s")
    dropped: int = Field(description="live frames dropped because downstream was busy")
    latency_p50_ms: float | None = Field(description="capture-to-publish latency, last 2 s")
    latency_p99_ms: float | None
    frames: int = Field(description="frames published")
    restarts: int = Field(description="restarts of its decoder")
    reason: str | None = Field(default=None, description="how it ended (EOS reason), once ended")
    error: str | None = None


def _one_line(e: RequestValidationError) -> tuple[int, str]:
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        return 400, "body is not valid JSON"
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
    if first.get("type") == "model_attributes_type":
        return 400, "body is not a JSON object"
    if first.get("type") == "extra_forbidden":
        return 422, f"unknown field {loc!r} (expected url, id, max_fps, model)"
    return 422, f"{loc}: {first.get('msg', 'invalid')}"


MAX_BODY_BYTES = 64 * 1024
"""Largest ``POST /sources`` body (413 beyond it): a URL, an id, a rate and a model name fit many times over."""


class _JsonBodies:
    """ASGI middleware for ``POST /sources``: the body is JSON whatever its Content-Type, and at most 64 KiB.

    ``curl -d`` sends a form Content-Type; a body larger than :data:`MAX_BODY_BYTES` is refused (413)
    before the app reads it.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/sources":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            body = await _read_body(scope, receive)
            if body is None:
                too_large = f"body is larger than {MAX_BODY_BYTES // 1024} KiB"
                await JSONResponse({"error": too_large}, status_code=413)(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


async def _read_body(scope: Any, receive: Any) -> bytes | None:
    """The request's whole body, or None if it is (or announces itself) larger than :data:`MAX_BODY_BYTES`."""
    length = dict(scope["headers"]).get(b"content-length", b"0")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        return None
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # (the client went away: an empty body, nobody reads the answer)
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI ``receive`` that gives ``body`` once, then waits on the real one (for the disconnect)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class _SameOrigin:
    """ASGI middleware refusing cross-site requests (403, or WebSocket close 4403).

    * an ``Origin`` header naming another site than the ``Host``: a script of some other web page
      the operator has open (cross-site request forgery, or a WebSocket opened from elsewhere);
    * with ``loopback_only``, a ``Host`` that is not a loopback name: a DNS-rebinding page.
    Clients that are not browsers (curl, ``pipeline.ctl``) send no ``Origin``.
    """

    def __init__(self, app: Any, loopback_only: bool = False) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
            problem = self._problem(headers.get(b"host", ""), headers.get(b"origin", ""))
            if problem:
                if scope["type"] == "http":
                    await JSONResponse({"error": problem[0].format(problem[1])}, status_code=403)(scope, receive, send)
                elif (await receive())["type"] == "websocket.connect":
                    # accepted, then closed: uvicorn answers a close before the accept with HTTP 403,
                    # which a browser reports as 1006, without the code
                    await send({"type": "websocket.accept"})
                    await send({"type": "websocket.close", "code": 4403, "reason": close_reason(*problem)})
                return
        await self.app(scope, receive, send)

    def _problem(self, host: str, origin: str) -> tuple[str, str] | None:
        """Why the request is refused, as a template and the value it names; None if it is not."""
        name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if self.loopback_only and host and name not in LOOPBACK_NAMES:
            return "Host {!r} refused: the API listens on a loopback address", host
        if origin and urlsplit(origin).netloc != host:
            return "cross-origin request from {!r} refused", origin
        return None


def create_app(plane: ControlPlane, *, token: str | None = None, host: str | None = None) -> FastAPI:
    """Build the app.

    Args:
        plane: the run's control plane.
        token: the bearer token requests must carry (None: none).
        host: the address it listens on; a loopback address makes it refuse other ``Host`` names
            (DNS rebinding). Cross-origin browser requests are refused in any case. None: no Host check.

    Returns:
        The FastAPI application (serve it with uvicorn, :mod:`pipeline.control.server`).
    """
    app = FastAPI(title="streamdet control API", version="1",
                  description="Add and remove sources while the pipeline runs, check its health, watch it.")
    app.add_middleware(_JsonBodies)
    app.add_middleware(_SameOrigin, loopback_only=host in LOOPBACK_NAMES)
    page = resources.files("pipeline.control").joinpath("static/index.html").read_text(encoding="utf-8")

    def authorized(header: str | None, query: str | None = None) -> bool:
        if token is None:
            return True
        given = ""
        if header and header.lower().startswith("bearer "):
            given = header[7:].strip()
        elif query:
            given = query
        return bool(given) and secrets.compare_digest(given.encode(), token.encode())

    def require_token(request: Request) -> None:
        if not authorized(request.headers.get("authorization")):
            raise StarletteHTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    auth = [Depends(require_token)]

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, line = _one_line(exc)
        return JSONResponse({"error": line}, status_code=status)

    @app.exception_handler(ControlError)
    async def _refused(request: Request, exc: ControlError) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The runner is alive (answered by its own thread, whatever the stages are doing)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "a stage is not ready; the reason"}})
    async def readyz() -> JSONResponse:
        """Every stage is ready (200), else 503 with the reason (starting, a stage restarting, stopping)."""
        reason = plane.readiness()
        if reason is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics (the registry ``--metrics-port`` serves)."""
        return Response(plane.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/sources", dependencies=auth)
    async def list_sources() -> list[SourceView]:
        """Every source with id, URL (redacted), kind, state, model, fps, drops, latency, frames, restarts."""
        return [SourceView(**s) for s in plane.list_sources()]

    @app.get("/sources/{source_id}", dependencies=auth, responses={404: {"description": "no such source"}})
    async def get_source(source_id: str) -> SourceView:
        """One source."""
        s = plane.source(source_id)
        if s is None:
            raise ControlError(404, f"no source {source_id!r}")
        return SourceView(**s)

    @app.post("/sources", dependencies=auth, status_code=201,
              responses={400: {"description": "not JSON"}, 409: {"description": "id in use, or no room"},
                         413: {"description": f"body larger than {MAX_BODY_BYTES // 1024} KiB"},
                         422: {"description": "malformed URL, source that cannot be opened, unknown model"},
                         507: {"description": "its frame pool does not fit in the free shared memory (/dev/shm)"}})
    def add_source(body: AddSource) -> SourceView:
        """Start decoding a source now, served by an already loaded model (others are refused)."""
        return SourceView(**plane.add_source(url=body.url, source_id=body.id, max_fps=body.max_fps,
                                             model=body.model))

    @app.delete("/sources/{source_id}", dependencies=auth, status_code=204,
                responses={404: {"description": "no running source with that id"}})
    def remove_source(source_id: str) -> Response:
        """Stop a source: its EOS is published (reason ``removed``) and its slots freed before this returns."""
        plane.remove_source(source_id)
        return Response(status_code=204)

    @app.websocket("/sources/{source_id}/preview")
    async def preview_ws(websocket: WebSocket, source_id: str) -> None:
        await websocket.accept()  # then refused with a close code a browser can read (4401, 4404)
        if not authorized(websocket.headers.get("authorization"), websocket.query_params.get("token")):
            await websocket.close(code=4401, reason="missing or wrong token")
            return
        if not plane.is_running(source_id):
            await websocket.close(code=4404, reason=close_reason("no running source {}", source_id))
            return
        receiving = asyncio.ensure_future(_until_disconnect(websocket))  # done when the viewer leaves
        try:
            async for jpeg in _frames(plane, source_id, lambda: receiving.done()):
                await websocket.send_bytes(jpeg)
            if not receiving.done():  # the source ended or the run is over: say so
                await websocket.close(code=1000)
        except Exception:  # the viewer went away mid-send
            pass
        finally:
            receiving.cancel()

    @app.get("/sources/{source_id}/preview.mjpg", responses={404: {"description": "no running source"}})
    async def preview_mjpeg(request: Request, source_id: str) -> StreamingResponse:
        """The source's annotated frames as an MJPEG stream (``multipart/x-mixed-replace``)."""
        if not authorized(request.headers.get("authorization"), request.query_params.get("token")):
            raise StarletteHTTPException(401, "missing or wrong token (Authorization: Bearer TOKEN or ?token=)")
        if not plane.is_running(source_id):
            raise ControlError(404, f"no running source {source_id!r}")

        async def parts() -> AsyncIterator[bytes]:
            async for jpeg in _frames(plane, source_id, lambda: False):
                yield (f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                       .encode() + jpeg + b"\r\n")

        return StreamingResponse(parts(), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})

    return app


async def _until_disconnect(websocket: WebSocket) -> None:
    """Return once the viewer leaves (or its connection breaks); what it sends is ignored: a viewer only watches."""
    try:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    except Exception:  # (the connection broke: gone too)
        pass


async def _frames(plane: ControlPlane, source_id: str, gone: Any) -> AsyncIterator[bytes]:
    """Each newer preview frame of a source while it runs and the viewer is there (counted as a viewer)."""
    hub = plane.preview
    seq = 0
    with hub.watching(source_id):
        while not hub.closed and not gone():
            item = hub.latest(source_id, seq)
            if item is None:
                if not plane.is_running(source_id):
                    return
                await asyncio.sleep(PREVIEW_POLL_S)
                continue
            seq, jpeg = item
            yield jpeg

