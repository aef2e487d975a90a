import socket
import threading

import pytest
import zmq

from pipeline.transport import (
    STAGE_HWM,
    StageFlags,
    Stopped,
    TransportError,
    ipc_endpoints,
    make_socket,
    recv_parts,
    redact_url,
    send_parts,
    tcp_endpoints,
)


@pytest.mark.parametrize(
    "url,shown",
    [
        ("rtsp://user:secret@cam.local:554/stream", "rtsp://***@cam.local:554/stream"),
        ("rtsp://user@cam/x", "rtsp://***@cam/x"),
        ("rtsp://cam.local/stream", "rtsp://cam.local/stream"),
        ("http://a:b@h/x?u=rtsp://c:d@e/f", "http://***@h/x?u=rtsp://***@e/f"),
        ("/videos/a@b.mp4", "/videos/a@b.mp4"),
        ("error opening rtsp://u:p@h/s: timeout", "error opening rtsp://***@h/s: timeout"),
        ("rtsp://admin:p@secret@cam/x", "rtsp://***@cam/x"),  # "@" in the password
        ("rtsp://admin:pa/secret@cam", "rtsp://***@cam"),  # "/" in the password
        ("url 'rtsp://admin:secret@cam/a b': malformed", "url 'rtsp://***@cam/a b': malformed"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    assert "secret" not in redact_url(url)


REDACT_EDGES = [
    # (id, text, shown): credentials hidden whatever raw characters the password holds
    ("space-in-password", "rtsp://admin:pa secret@10.0.0.5/stream", "rtsp://***@10.0.0.5/stream"),
    ("question-mark", "rtsp://admin:pa?secret@10.0.0.5/stream", "rtsp://***@10.0.0.5/stream"),
    ("hash", "rtsp://admin:pa#secret@10.0.0.5/stream", "rtsp://***@10.0.0.5/stream"),
    ("at-sign", "rtsp://admin:p@secret@10.0.0.5/stream", "rtsp://***@10.0.0.5/stream"),
    ("percent-encoded-at", "rtsp://admin:p%40secret@10.0.0.5/stream", "rtsp://***@10.0.0.5/stream"),
    ("all-of-them", "rtsp://admin:a b?c#d@e%40secret@10.0.0.5:554/s", "rtsp://***@10.0.0.5:554/s"),
    ("no-path", "rtsp://admin:pa ss secret@10.0.0.5", "rtsp://***@10.0.0.5"),
    ("user-only", "rtsp://secret@cam/x", "rtsp://***@cam/x"),
    ("ipv6-host", "rtsp://admin:secret@[::1]:554/x", "rtsp://***@[::1]:554/x"),
    ("raw-slash-and-at", "rtsp://admin:pa/se@secret@cam/x", "rtsp://***@cam/x"),
    ("in-a-message", "url 'rtsp://admin:pa secret@10.0.0.5/stream': malformed",
     "url 'rtsp://***@10.0.0.5/stream': malformed"),
    ("two-urls-one-line", "http://a:secret@h/x?u=rtsp://c:d secret@e/f", "http://***@h/x?u=rtsp://***@e/f"),
    ("per-line", "rtsp://u:secret@h/a\nrtsp://v:secret@i/b", "rtsp://***@h/a\nrtsp://***@i/b"),
    # not credentials: an "@" after the first "/" following HOST[:PORT] is in the path, and stays
    ("at-in-query", "rtsp://host/path?x=a@b", "rtsp://host/path?x=a@b"),
    ("at-in-path", "rtsp://host:554/clips/a@b.mp4", "rtsp://host:554/clips/a@b.mp4"),
    ("at-in-path-ipv6", "rtsp://[fe80::1]:554/a@b", "rtsp://[fe80::1]:554/a@b"),
    ("file-url", "file:///videos/a@b.mp4", "file:///videos/a@b.mp4"),
    ("endpoint", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5556"),
    ("no-scheme", "admin:secret@cam/x is not a URL", "admin:secret@cam/x is not a URL"),
    ("empty", "", ""),
]


@pytest.mark.parametrize(("text", "shown"), [c[1:] for c in REDACT_EDGES], ids=[c[0] for c in REDACT_EDGES])
def test_redact_url_edges(text, shown):
    assert redact_url(text) == shown


def test_endpoints(tmp_path):
    ep = ipc_endpoints(tmp_path, ["p0", "p1"])
    assert not ep.inline and ep.frames.startswith("ipc://") and ep.credit_endpoint("p1").endswith("credits-1")
    ept = tcp_endpoints("127.0.0.1", 6000, ["p0"])
    assert ept.inline and ept.frames == "tcp://127.0.0.1:6000" and ept.credit_endpoint("p0") == "tcp://127.0.0.1:6005"
    with pytest.raises(KeyError):
        ep.credit_endpoint("nope")
    with pytest.raises(ValueError, match="ports"):
        tcp_endpoints("127.0.0.1", 65533, ["p0"])


class _Flags:
    def __init__(self):
        self.stop = threading.Event()

    def alive(self):
        return not self.stop.is_set()


def test_push_pull_in_order_and_blocking_at_hwm(tmp_path):
    ctx = zmq.Context()
    ep = f"ipc://{tmp_path / 's'}"
    pull = make_socket(ctx, zmq.PULL, ep, bind=True)
    push = make_socket(ctx, zmq.PUSH, ep, bind=False)
    flags = _Flags()
    sent = []
    payload = bytes(100_000)  # big enough that kernel socket buffers hold only a few

    def produce():
        try:
            for i in range(10 * STAGE_HWM):
                send_parts(push, [str(i).encode(), payload], flags.alive)
                sent.append(i)
        except Stopped:
            pass

    t = threading.Thread(target=produce)
    t.start()
    t.join(1.0)
    # nobody reads: the producer blocks at about twice the HWM (send + receive queues + kernel buffers)
    assert t.is_alive()
    assert len(sent) < 4 * STAGE_HWM
    got = []
    while len(got) < 10 * STAGE_HWM:
        parts = recv_parts(pull, 2000)
        assert parts is not None
        got.append(int(parts[0].bytes))
    t.join(5)
    assert got == list(range(10 * STAGE_HWM))  # nothing dropped, in order
    push.close(0)
    pull.close(0)
    ctx.term()


def test_blocked_send_stops_when_told(tmp_path):
    ctx = zmq.Context()
    push = make_socket(ctx, zmq.PUSH, f"ipc://{tmp_path / 'nobody'}", bind=True)  # no peer: send blocks
    flags = _Flags()
    flags.stop.set()
    with pytest.raises(Stopped):
        send_parts(push, [b"x"], flags.alive)
    push.close(0)
    ctx.term()


def test_bind_in_use_names_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    ctx = zmq.Context()
    try:
        with pytest.raises(TransportError, match=f"tcp://127.0.0.1:{port}: cannot bind"):
            make_socket(ctx, zmq.PULL, f"tcp://127.0.0.1:{port}", bind=True)
    finally:
        s.close()
        ctx.term()


def test_stage_flags():
    import multiprocessing as mp
    import os

    e = [mp.get_context("spawn").Event() for _ in range(3)]
    f = StageFlags(go=e[0], stop_input=e[1], abort=e[2], parent_pid=os.getppid())
    assert f.alive() and f.input_open()
    e[1].set()
    assert f.alive() and not f.input_open()
    e[2].set()
    assert not f.alive()
    orphan = StageFlags(go=e[0], stop_input=e[1], abort=mp.get_context("spawn").Event(), parent_pid=-1)
    assert not orphan.parent_alive() and not orphan.alive()


@pytest.mark.parametrize(("tmpdir_len", "in_tmpdir"), [(20, True), (50, True), (70, False), (200, False)])
def test_run_dir_leaves_room_for_socket_names(monkeypatch, tmpdir_len, in_tmpdir):
    import os
    import shutil
    import tempfile

    from pipeline.transport import IPC_PATH_MAX, private_run_dir

    top = tempfile.mkdtemp(prefix="sd-t", dir="/tmp")
    deep = os.path.join(top, "d" * (tmpdir_len - len(top) - 1))
    os.makedirs(deep)
    assert len(deep) == tmpdir_len
    monkeypatch.setattr(tempfile, "tempdir", deep)
    run_dir = private_run_dir()
    try:
        assert os.path.dirname(run_dir) == (deep if in_tmpdir else "/tmp")
        assert os.stat(run_dir).st_mode & 0o777 == 0o700
        endpoint = os.path.join(run_dir, "tensor-credits-m12")
        assert len(endpoint) <= IPC_PATH_MAX
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.bind(f"ipc://{endpoint}")  # (failed with "File name too long" under a deep TMPDIR)
        sock.close(0)
        ctx.term()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
