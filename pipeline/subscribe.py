"""Watch a pipeline's detections: ``python -m pipeline.subscribe tcp://127.0.0.1:5556``.

Prints one line per message (``--json``: the message itself, one JSON object per line with its
``topic`` added). ``--count N`` stops after N messages, ``--until-eos`` after the end of stream of
every source seen (``--sources N``: of N sources), ``--timeout S`` after S seconds without a
message (exit status 1; ``inf``, the default, waits forever). Subscribing to a PUB socket is
asynchronous: start the subscriber first and run the pipeline with ``--wait-subscribers 1`` to
receive every message (see docs/schema.md). The endpoint is checked as the run checks its
``--publish`` (``tcp://HOST:PORT`` with a port in 1..65535, or ``ipc://PATH``), and a TCP host name
must resolve: anything else is one ``error:`` line, exit status 2, not a silent wait.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from pipeline.settings_sections import SinkSettings
from pipeline.stages.payloads import DETECTIONS_SCHEMA, EOS_SCHEMA, EOS_TOPIC
from streamdet.cli import OneLineErrorParser, invoked_as
from streamdet.constants import EXIT_USAGE

POLL_CHUNK_MS = 60_000
"""Longest single wait on the socket: longer timeouts are waited in chunks (``zmq_poll`` takes a C ``long``)."""

RESOLVE_TIMEOUT_S = 5.0
"""Longest wait for the command line's look-up of the endpoint's host name."""


class SubscribeTimeout(TimeoutError):
    """No message arrived within the timeout."""


@dataclass(frozen=True)
class Published:
    """One message received from the pipeline.

    Attributes:
        topic: ``detections.<source_id>`` or ``eos.<source_id>``.
        payload: the decoded JSON object (see docs/schema.md).
    """

    topic: str
    payload: dict[str, Any]

    @property
    def is_eos(self) -> bool:
        """Whether this is an end-of-stream message."""
        return self.topic.startswith(EOS_TOPIC + ".")

    @property
    def source_id(self) -> str:
        """The source the message is about ("" for a topic of no source: ``stats``)."""
        return self.topic.split(".", 1)[1] if "." in self.topic else ""


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if a pipeline can publish there: what the run accepts for its ``--publish``.

    Raises:
        ValueError: naming the endpoint and what is expected (a port out of 1..65535, no port,
            another transport, ``none``).
    """
    try:
        published = SinkSettings._publish(endpoint)  # (the run's own check)
    except ValueError as e:
        raise ValueError(str(e).replace(" (or none)", "")) from None  # (none: publishing nowhere)
    if published is None:
        raise ValueError(f"expected tcp://HOST:PORT or ipc://PATH, got {endpoint!r}")
    return endpoint


def resolve_endpoint_host(endpoint: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
    """Check that a ``tcp://`` endpoint's host name resolves (ZeroMQ would retry it silently forever).

    Raises:
        ValueError: naming the endpoint, if the look-up fails or takes longer than ``timeout_s``.
    """
    if not endpoint.startswith("tcp://"):
        return
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    failed: list[str] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError
            failed.append(str(e.strerror or e) if isinstance(e, OSError) else str(e))

    t = threading.Thread(target=look_up, daemon=True)  # (a stuck resolver is not waited for)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        failed.append(f"no answer within {timeout_s:g} s")
    if failed:
        raise ValueError(f"expected a host name that resolves, got {endpoint!r} ({host}: {failed[0]})")


class Subscriber:
    """A SUB socket connected to a pipeline's PUB endpoint.

    Args:
        endpoint: e.g. ``tcp://127.0.0.1:5556`` (see :func:`check_endpoint`; a host name need not
            resolve yet: ZeroMQ connects once it does).
        topics: topic prefixes to subscribe to (default: everything).
        ctx: a ZeroMQ context (default: the process's shared one).

    Raises:
        ValueError: if the endpoint is not one a pipeline can publish on, or ZeroMQ refuses it.
    """

    def __init__(self, endpoint: str, *, topics: Sequence[str] = ("",), ctx: zmq.Context[Any] | None = None) -> None:
        self.endpoint = check_endpoint(endpoint)
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket[Any] = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)  # never drop on our side
        for t in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as e:
            self._sock.close()
            raise ValueError(f"{endpoint}: cannot connect ({zmq.strerror(e.errno or 0)})") from e

    def recv(self, timeout_s: float | None = None) -> Published:
        """The next message.

        Args:
            timeout_s: longest wait in seconds (None or ``inf``: forever; 0 or less: only what has arrived).

        Raises:
            SubscribeTimeout: if nothing arrives in time.
            ValueError: if ``timeout_s`` is NaN, or a message is not ``[topic, JSON object]``.
        """
        if timeout_s is not None and math.isnan(timeout_s):
            raise ValueError(f"{self.endpoint}: expected a timeout in seconds, got {timeout_s}")
        if not self._wait(timeout_s):
            raise SubscribeTimeout(f"{self.endpoint}: no message within {timeout_s} s")
        parts = self._sock.recv_multipart()
        if len(parts) != 2:
            raise ValueError(f"{self.endpoint}: expected [topic, payload], got {len(parts)} parts")
        payload = json.loads(parts[1])
        if not isinstance(payload, dict):
            raise ValueError(f"{self.endpoint}: expected a JSON object, got {type(payload).__name__}")
        return Published(parts[0].decode(), payload)

    def _wait(self, timeout_s: float | None) -> bool:
        """Whether a message arrives within ``timeout_s`` (None or ``inf``: wait for one), polling in chunks."""
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left_ms = max(0.0, (deadline - time.monotonic()) * 1000)  # inf when waiting forever
            if self._sock.poll(math.ceil(min(POLL_CHUNK_MS, left_ms)), zmq.POLLIN):
                return True
            if time.monotonic() >= deadline:
                return False

    def messages(self, *, count: int | None = None, until_eos: bool = False, sources: int | None = None,
                 timeout_s: float | None = None) -> Iterator[Published]:
        """Iterate over messages.

        Args:
            count: stop after this many messages.
            until_eos: stop after the EOS of every source seen (a message of a source: its
                ``detections``, ``status`` or ``eos``; ``stats`` is of none), or of ``sources`` sources.
            sources: with ``until_eos``, the number of EOS messages to wait for.
            timeout_s: longest wait for each message.

        Raises:
            SubscribeTimeout: if a message does not arrive in time.
        """
        seen: set[str] = set()
        ended: set[str] = set()
        n = 0
        while count is None or n < count:
            msg = self.recv(timeout_s)
            n += 1
            if msg.source_id:  # (stats: of no source, it never ends)
                seen.add(msg.source_id)
            if msg.is_eos:
                ended.add(msg.source_id)
            yield msg
            if until_eos and msg.is_eos and (len(ended) >= sources if sources else ended >= seen):
                return

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_line(msg: Published) -> str:
    """One human-readable line for a message."""
    p = msg.payload
    if p.get("schema") == EOS_SCHEMA:
        err = f" error={p['error']}" if p.get("error") else ""
        return f"{msg.topic} frames={p.get('frames')} reason={p.get('reason')}{err}"
    if p.get("schema") == DETECTIONS_SCHEMA:
        dets = p.get("detections", [])
        top = ", ".join(f"{d['label']} {d['score']:.2f}" for d in dets[:5])
        more = f", +{len(dets) - 5}" if len(dets) > 5 else ""
        e2e = p.get("timing_ms", {}).get("end_to_end")
        return (f"{msg.topic} frame={p.get('frame_index')} pts={p.get('pts_s', 0):.3f}s dets={len(dets)}"
                f"{' [' + top + more + ']' if dets else ''} e2e={e2e}ms")
    return f"{msg.topic} {json.dumps(p)}"


def _positive_int(text: str) -> int:
    """An argparse ``type=`` for a count: an integer of at least 1.

    Raises:
        argparse.ArgumentTypeError: otherwise (argparse names the option: one line, exit status 2).
    """
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _endpoint(text: str) -> str:
    """An argparse ``type=`` for the endpoint: :func:`check_endpoint`, and a TCP host name must resolve.

    Raises:
        argparse.ArgumentTypeError: otherwise (argparse names the argument: one line, exit status 2).
    """
    try:
        resolve_endpoint_host(check_endpoint(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _timeout_seconds(text: str) -> float | None:
    """An argparse ``type=`` for ``--timeout``: seconds above 0, or ``inf`` (returned as None: wait forever).

    Raises:
        argparse.ArgumentTypeError: for anything else (NaN, 0, negative, not a number).
    """
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not s > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, or inf, got {text!r}")
    return None if math.isinf(s) else s


def main(argv: list[str] | None = None) -> int:
    """Command line: print the messages of a pipeline's PUB endpoint.

    Returns:
        0 when done, 1 on timeout or a bad message, 2 for a bad argument or an unusable endpoint,
        130 on Ctrl-C.
    """
    p = OneLineErrorParser(prog=invoked_as("python -m pipeline.subscribe"),
                           description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("endpoint", nargs="?", type=_endpoint, default="tcp://127.0.0.1:5556",
                   help="PUB endpoint: tcp://HOST:PORT or ipc://PATH (default %(default)s)")
    p.add_argument("--topic", action="append", help="topic prefix, e.g. detections.bikes (repeatable; default all)")
    p.add_argument("--count", type=_positive_int, metavar="N", help="stop after N messages (N >= 1)")
    p.add_argument("--until-eos", action="store_true", help="stop after the EOS of every source seen")
    p.add_argument("--sources", type=_positive_int, metavar="N",
                   help="with --until-eos: wait for the EOS of N sources (N >= 1)")
    p.add_argument("--timeout", type=_timeout_seconds, metavar="S",
                   help="give up after S seconds without a message (exit 1); S > 0, or inf: wait forever "
                        "(the default)")
    p.add_argument("--json", action="store_true", help="print each message as JSON (with its topic)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        subscriber = Subscriber(args.endpoint, topics=args.topic or ("",))
    except ValueError as e:  # (ZeroMQ refused the endpoint: as unusable as a bad argument)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with subscriber as sub:
            for msg in sub.messages(count=args.count, until_eos=args.until_eos, sources=args.sources,
                                    timeout_s=args.timeout):
                if args.json:
                    print(json.dumps({"topic": msg.topic, **msg.payload}, separators=(",", ":")), flush=True)
                else:
                    print(format_line(msg), flush=True)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (SubscribeTimeout, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
