"""Serve the control app with uvicorn in a thread of the runner, on a socket bound before the stages start.

Binding first makes a port in use one error line at start-up (exit 1) instead of a failure in a
thread. uvicorn's access log is off (a preview URL may carry ``?token=``); its own errors go to
stderr at warning level.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from pipeline.summary import PipelineError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
"""Host names of this machine only (an API on one of them is not reachable from elsewhere)."""

STOP_TIMEOUT_S = 3.0
"""Longest wait for the server thread to finish when the run ends."""


def bind_control_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (IPv4 or IPv6).

    Raises:
        PipelineError: ``control port PORT on HOST: cannot listen (<reason>)``.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise PipelineError(f"control port {port} on {host}: cannot listen ({e.strerror or e})") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise PipelineError(f"control port {port} on {host}: cannot listen ({e.strerror or e})") from e
    sock.set_inheritable(False)
    return sock


class ControlServer:
    """uvicorn serving an ASGI app on an already bound socket, in a daemon thread.

    Args:
        app: the ASGI application.
        sock: the bound, listening socket (:func:`bind_control_socket`); closed by :meth:`stop`.
    """

    def __init__(self, *, app: Any, sock: socket.socket) -> None:
        import uvicorn

        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="websockets-sansio",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="streamdet-control", daemon=True)

    def _serve(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (open streams are closed) and close the socket."""
        self.server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(1.0)
        self.sock.close()
