"""MQTT broker URLs: ``mqtt[s]://[user[:pass]@]HOST[:PORT]``, parsed, and shown without their credentials.

(Moved from ``pipeline/stages/mqtt_sink.py``, which re-exports :class:`MqttUrl` and :func:`parse_mqtt_url`.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["DEFAULT_PORT", "DEFAULT_TLS_PORT", "MqttUrl", "parse_mqtt_url"]

DEFAULT_PORT = 1883
"""Port of ``mqtt://`` URLs without one."""

DEFAULT_TLS_PORT = 8883
"""Port of ``mqtts://`` URLs without one."""

_HOSTPORT_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]*))(?::(?P<port>.*))?")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def _redact(url: str) -> str:
    """``url`` with any userinfo hidden (``mqtt://***@host``) and control characters escaped (one line)."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    text = f"{head}{sep}{rest}"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


@dataclass(frozen=True)
class MqttUrl:
    """A parsed broker URL.

    Attributes:
        tls: ``mqtts://``.
        host: broker host.
        port: broker port (default 1883, or 8883 with TLS).
        username: login from the URL's userinfo, or None (never printed: ``repr=False``).
        password: password from the URL's userinfo, or None (never printed: ``repr=False``).
    """

    tls: bool
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        """``mqtt://HOST:PORT`` without credentials (for messages and logs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """Parse ``mqtt[s]://[user[:pass]@]HOST[:PORT]``.

    ``HOST`` is a name, an IPv4 address or a bracketed IPv6 address; the port defaults to 1883
    (``mqtt://``) or 8883 (``mqtts://``). User and password may be percent-encoded. A trailing
    ``/`` is allowed; any other path, a query or a fragment is not.

    Args:
        url: the broker URL, e.g. ``mqtt://127.0.0.1:1883`` or ``mqtts://user:pass@broker.example``.

    Returns:
        The parsed URL.

    Raises:
        ValueError: one line naming the URL (credentials redacted) and what is wrong.
    """
    from urllib.parse import unquote

    shown = _redact(url)

    def bad(problem: str) -> ValueError:
        return ValueError(f"MQTT URL {shown!r}: {problem}")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("mqtt", "mqtts"):
        raise bad("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise bad("expected no blanks or control characters")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if tail not in ("", "/"):
        raise bad("expected nothing after HOST[:PORT] (no path, query or fragment)")
    userinfo, at, hostport = authority.rpartition("@")
    m = _HOSTPORT_RE.fullmatch(hostport)
    if m is None:
        raise bad("invalid host (expected a name, an IPv4 address or [an IPv6 address])")
    host = m["v6"] or m["name"]
    if not host:
        raise bad("no host")
    if m["name"] is not None and not _NAME_RE.fullmatch(host):
        raise bad(f"invalid host {host!r}")
    tls = scheme.lower() == "mqtts"
    port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    if m["port"] is not None:
        if not m["port"].isdigit() or not 1 <= int(m["port"]) <= 65535:
            raise bad(f"invalid port {m['port']!r} (expected 1-65535)")
        port = int(m["port"])
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, pw = userinfo.partition(":")
        if not user:
            raise bad("empty user name before '@'")
        username = unquote(user)
        password = unquote(pw) if colon else None
    return MqttUrl(tls=tls, host=host, port=port, username=username, password=password)
