"""A real Mosquitto broker for the MQTT sink tests (Debian's ``mosquitto`` package, 127.0.0.1 only).

Usage::

    broker = Mosquitto(tmp_path)            # a free port; anonymous clients allowed
    broker.start()                          # returns once it accepts TCP connections
    broker.stop(); broker.start()           # restart on the same port
    broker.close()                          # always (the fixture does it)

``Mosquitto(tmp_path, users={"bob": "pw"})`` requires a login (a ``password_file`` made with
``mosquitto_passwd``); ``persistent=True`` keeps sessions (persistent subscribers and the
messages queued for them) across a restart; ``conf=["max_packet_size 360"]`` adds configuration
lines. Without the broker binary the tests are skipped, except as root with ``apt-get`` at hand,
where Debian's package is installed once.

:class:`Mqtt311Broker` stands in for a broker that speaks MQTT 3.1.1 only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
SKIP_REASON = "needs Debian's mosquitto package (apt-get install mosquitto)"

_install_tried = False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_mosquitto() -> None:
    """Make sure the broker binary exists (install Debian's package once as root), else skip the test."""
    global _install_tried
    if Path(MOSQUITTO).exists():
        return
    if not _install_tried and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_tried = True
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], env=env, capture_output=True,
                          timeout=300).returncode:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], env=env, capture_output=True,
                           timeout=300)
    if not Path(MOSQUITTO).exists():
        pytest.skip(SKIP_REASON)


class Mosquitto:
    """One ``mosquitto -c CONF`` process listening on ``127.0.0.1:port`` (restartable on that port).

    Args:
        workdir: where the config, password file and persistence files go.
        users: ``{user: password}`` to require a login; None: anonymous clients allowed.
        persistent: keep sessions and queued messages across a restart (``persistence true``).
        port: the port (default: a free one).
        conf: more lines for ``mosquitto.conf`` (``max_packet_size 360``, ``acl_file PATH``...).
    """

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None, persistent: bool = False,
                 port: int | None = None, conf: Sequence[str] = ()) -> None:
        ensure_mosquitto()
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # as root mosquitto would switch to the user "mosquitto", who cannot read or write here
        lines = [f"listener {self.port} 127.0.0.1", f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                 f"persistence {'true' if persistent else 'false'}", "log_dest none"]
        if persistent:
            lines += [f"persistence_location {self.dir}/", "autosave_interval 0"]
        if users:
            if not Path(MOSQUITTO_PASSWD).exists():
                pytest.skip(SKIP_REASON)
            pw = self.dir / "passwd"
            for i, (user, password) in enumerate(users.items()):
                subprocess.run([MOSQUITTO_PASSWD, "-b", *(["-c"] if i == 0 else []), str(pw), user, password],
                               check=True, capture_output=True, timeout=30)
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        lines += conf
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the broker; return once it accepts TCP connections.

        Raises:
            RuntimeError: if it exits or does not listen within ``timeout_s``.
        """
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start: {err.strip()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout_s} s")

    def stop(self) -> None:
        """Stop the broker (SIGTERM: it saves its persistence file; SIGKILL after 5 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()

    def close(self) -> None:
        """Stop the broker if it runs (idempotent)."""
        self.stop()


class Subscriber:
    """A paho client subscribed (QoS 1) to ``topic`` on a persistent session; collects every message."""

    def __init__(self, port: int, topic: str = "streamdet/#") -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.topic = topic
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                                  clean_session=False)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(5), "the test subscriber could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def wait(self, n: int, timeout_s: float = 10.0) -> list[mqtt.MQTTMessage]:
        """The messages once at least ``n`` arrived (or the timeout passed)."""
        return self.wait_for(lambda got: len(got) >= n, timeout_s)

    def wait_distinct(self, n: int, timeout_s: float = 10.0) -> list[mqtt.MQTTMessage]:
        """The messages once ``n`` distinct payloads arrived (QoS 1 may deliver one twice), or the timeout passed."""
        return self.wait_for(lambda got: len({m.payload for m in got}) >= n, timeout_s)

    def wait_for(self, done: Callable[[list[mqtt.MQTTMessage]], bool], timeout_s: float) -> list[mqtt.MQTTMessage]:
        """The messages once ``done(messages)`` holds (or the timeout passed)."""
        with self.cond:
            self.cond.wait_for(lambda: done(self.messages), timeout_s)
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Mqtt311Broker:
    """A stand-in broker on 127.0.0.1 that speaks MQTT 3.1.1 only, as one that predates MQTT v5.

    It answers an MQTT v5 CONNECT with the 3.1.1 refusal "unacceptable protocol version" (CONNACK
    return code 1) and closes; a 3.1.1 CONNECT is accepted, and every PUBLISH is acknowledged (QoS 1)
    and its topic recorded in :attr:`topics`. One client at a time.
    """

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.levels: list[int] = []  # the protocol level of each CONNECT: 5, 4 (3.1.1)
        self.topics: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            with conn, conn.makefile("rb") as f:
                while (packet := _read_packet(f)) is not None:
                    kind, body = packet
                    if kind >> 4 == 1:  # CONNECT: 2-byte length, "MQTT", then the level
                        self.levels.append(body[6])
                        conn.sendall(b"\x20\x02\x00" + (b"\x00" if body[6] == 4 else b"\x01"))
                        if body[6] != 4:
                            break
                    elif kind >> 4 == 3:  # PUBLISH
                        n = int.from_bytes(body[:2], "big")
                        self.topics.append(body[2:2 + n].decode())
                        if kind & 0x06:  # QoS 1: PUBACK with its packet id
                            conn.sendall(b"\x40\x02" + body[2 + n:4 + n])
                    elif kind >> 4 == 14:  # DISCONNECT
                        break

    def close(self) -> None:
        self.server.close()


def _read_packet(f) -> tuple[int, bytes] | None:
    """One MQTT packet ``(first byte, rest)`` from a socket file, or None at its end."""
    head = f.read(1)
    if not head:
        return None
    length, shift = 0, 0
    while (byte := f.read(1)) and byte[0] & 0x80:
        length, shift = length + ((byte[0] & 0x7F) << shift), shift + 7
    length += (byte[0] if byte else 0) << shift
    return head[0], f.read(length)

