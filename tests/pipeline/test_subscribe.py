import json
import socket
import threading
import time

import numpy as np
import pytest
import zmq

from pipeline.stages.sinks import PubSink, detections_payload, eos_payload
from pipeline.subscribe import Published, Subscriber, SubscribeTimeout, format_line, main
from streamdet.letterbox import letterbox_params
from streamdet.messages import EndOfStream, EosReason, FrameMsg, FrameRecord
from streamdet.postprocess import Detections


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def payload(i: int, source: str = "cam"):
    rec = FrameRecord(FrameMsg(source, i, i * 0.04, (272, 640), -2, "", time.monotonic(), 1.0),
                      letterbox_params((272, 640), (640, 384)), 0.5)
    d = Detections(np.array([[1, 2, 30, 40]], np.float32), np.array([0.8], np.float32), np.array([0], np.int64))
    return rec, d, detections_payload(rec, d, model="m", class_names=("person",), engine_ms=3, postprocess_ms=1)


def publish(endpoint, n, sources=("cam",), wait=1):
    """Publish n frames per source and their EOS through the real PubSink (waits for `wait` subscribers)."""
    from pipeline.stages.sinks import FrameResult

    ctx = zmq.Context()
    sink = PubSink(ctx=ctx, endpoint=endpoint, wait_subscribers=wait, wait_timeout_s=20)
    sink.open()
    for i in range(n):
        for s in sources:
            rec, d, p = payload(i, s)
            sink.write(FrameResult(rec, d, p))
    for s in sources:
        sink.end_of_stream(EndOfStream(s, n, EosReason.FINISHED))
    sink.close()
    ctx.term()
    return sink


def test_subscriber_receives_everything_after_xpub_wait():
    ep = free_endpoint()
    with Subscriber(ep) as sub:
        t = threading.Thread(target=publish, args=(ep, 300, ("a", "b")))
        t.start()
        msgs = list(sub.messages(until_eos=True, timeout_s=20))
        t.join()
    assert len(msgs) == 602
    for s in ("a", "b"):
        mine = [m for m in msgs if m.source_id == s]
        assert [m.payload.get("frame_index") for m in mine[:-1]] == list(range(300))
        assert mine[-1].is_eos and mine[-1].topic == f"eos.{s}"


def test_topic_filter_and_count():
    ep = free_endpoint()
    with Subscriber(ep, topics=["detections.b"]) as sub:
        t = threading.Thread(target=publish, args=(ep, 5, ("a", "b")))
        t.start()
        msgs = list(sub.messages(count=5, timeout_s=20))
        t.join()
    assert {m.topic for m in msgs} == {"detections.b"}


def test_timeout():
    with Subscriber(free_endpoint()) as sub, pytest.raises(SubscribeTimeout):
        sub.recv(0.1)


def test_format_line():
    _, _, p = payload(7)
    line = format_line(Published("detections.cam", p))
    assert line.startswith("detections.cam frame=7 pts=0.280s dets=1 [person 0.80]")
    eos = format_line(Published("eos.cam", eos_payload(EndOfStream("cam", 3, EosReason.ERROR, "bad file"))))
    assert eos == "eos.cam frames=3 reason=error error=bad file"


def test_main_json_until_eos(capsys):
    ep = free_endpoint()
    t = threading.Thread(target=publish, args=(ep, 3))
    t.start()
    code = main([ep, "--until-eos", "--json", "--timeout", "20"])
    t.join()
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["topic"] for x in lines] == ["detections.cam"] * 3 + ["eos.cam"]
    assert lines[0]["schema"] == "streamdet.detections/2"


def test_main_timeout_is_one_error_line(capsys):
    assert main([free_endpoint(), "--timeout", "0.2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
