"""The MQTT sink (paho-mqtt) against a real Mosquitto broker (``tests/helpers/mosquitto.py``).

Subscribers keep a persistent session (``clean_session=False``) on a broker with persistence on,
so a broker restart loses nothing queued for them: what a subscriber misses was dropped by the sink.
"""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline import cli
from pipeline.runner import Pipeline
from pipeline.settings import SettingsError, load_settings
from pipeline.stages.base import StageError
from pipeline.stages.mqtt_sink import MqttConfig, MqttSink, MqttUrl, parse_mqtt_url
from pipeline.stages.stats import LiveStats, StatsConfig
from tests.helpers.cli import ROOT
from tests.helpers.mosquitto import Mosquitto, Mqtt311Broker, Subscriber, free_port
from tests.helpers.settings import settings_with
from tests.helpers.standin import bikes_path

SECRET = "s3cr3t-Pw"


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker", persistent=True)
    b.start()
    yield b
    b.close()


@pytest.fixture
def subscribers():
    made: list[Subscriber] = []
    yield lambda port, topic="streamdet/#": made.append(Subscriber(port, topic)) or made[-1]
    for s in made:
        s.close()


def sink_for(url: str, **kw) -> MqttSink:
    return MqttSink(config=MqttConfig(url=url, **kw))


def payloads(messages) -> list[bytes]:
    return [m.payload for m in messages]


# ------------------------------------------------------------------------------------------ URLs
def test_paho_is_imported_by_open_only():
    code = "import sys, pipeline.stages.postprocess, pipeline.stages.mqtt_sink; assert 'paho' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://127.0.0.1", MqttUrl(tls=False, host="127.0.0.1", port=1883)),
    ("mqtt://broker.example:1884", MqttUrl(tls=False, host="broker.example", port=1884)),
    ("mqtts://broker.example", MqttUrl(tls=True, host="broker.example", port=8883)),
    ("MQTTS://h:443/", MqttUrl(tls=True, host="h", port=443)),
    ("mqtt://[::1]:1883", MqttUrl(tls=False, host="::1", port=1883)),
    ("mqtt://bob@h", MqttUrl(tls=False, host="h", port=1883, username="bob")),
    (f"mqtt://bob:{SECRET}@h:2000", MqttUrl(tls=False, host="h", port=2000, username="bob", password=SECRET)),
    ("mqtt://b%40x:p%3Aw%2F@h", MqttUrl(tls=False, host="h", port=1883, username="b@x", password="p:w/")),
])
def test_parse_mqtt_url(url, expected):
    got = parse_mqtt_url(url)
    assert got == expected
    assert (got.username, got.password) == (expected.username, expected.password)
    assert SECRET not in repr(got) and "@" not in got.display()


@pytest.mark.parametrize(("url", "problem"), [
    ("foo://x", "expected mqtt://HOST[:PORT]"),
    ("127.0.0.1:1883", "expected mqtt://HOST[:PORT]"),
    (f"http://bob:{SECRET}@h", "expected mqtt://HOST[:PORT]"),
    ("mqtt://", "no host"),
    (f"mqtt://bob:{SECRET}@", "no host"),
    ("mqtt://:1883", "no host"),
    ("mqtt://h:0", "invalid port '0'"),
    ("mqtt://h:65536", "invalid port"),
    ("mqtt://h:", "invalid port ''"),
    (f"mqtt://bob:{SECRET}@h:x1", "invalid port 'x1'"),
    ("mqtt://h/topic", "no path"),
    (f"mqtt://bob:{SECRET}@h:1883/x", "no path"),
    ("mqtt://h?x=1", "no path, query"),
    ("mqtt://h#f", "fragment"),
    ("mqtt://h h", "no blanks"),
    ("mqtt://h\n:1", "no blanks"),
    ("mqtt://[::1", "invalid host"),
    ("mqtt://h%:1", "invalid host"),
    (f"mqtt://:{SECRET}@h", "empty user name"),
])
def test_parse_mqtt_url_errors_are_one_redacted_line(url, problem):
    with pytest.raises(ValueError) as exc:
        parse_mqtt_url(url)
    text = str(exc.value)
    assert problem in text and "\n" not in text and SECRET not in text
    assert text.startswith("MQTT URL '")
    if "@" in url:
        assert "***@" in text


def test_bad_mqtt_setting_is_one_error_line(capsys):
    with pytest.raises(SettingsError) as exc:
        load_settings(overrides={"sinks": {"mqtt": f"mqtt://bob:{SECRET}@h:99999"}})
    assert "sinks.mqtt" in str(exc.value) and SECRET not in str(exc.value)
    assert cli.main(["run", "--mqtt", f"foo://bob:{SECRET}@x", "--publish", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.count("\n") == 1 and SECRET not in err
    assert "foo://***@x" in err


# ------------------------------------------------------------------------------------------ a run
def test_file_run_publishes_the_jsonl_lines_in_order(standin_model, broker, subscribers, tmp_path):
    """40 frames through the whole pipeline with --jsonl and --mqtt: same bytes, same order, then the EOS."""
    sub = subscribers(broker.port)
    s = settings_with({"sources": [str(bikes_path())], "model": str(standin_model), "quiet": True,
                       "sinks": {"publish": None}}, max_frames=40, sinks__jsonl=str(tmp_path / "o.jsonl"),
                      sinks__mqtt=broker.url, sinks__mqtt_flush_timeout_s=10)
    summary = Pipeline(settings=s).run(handle_signals=False)
    assert summary.exit_code == 0, summary.errors
    lines = (tmp_path / "o.jsonl").read_bytes().splitlines()
    assert len(lines) == 41
    got = sub.wait(41)
    assert [m.topic for m in got] == ["streamdet/bikes/detections"] * 40 + ["streamdet/bikes/eos"]
    assert payloads(got) == lines  # byte-identical, in frame order, the EOS last
    assert [json.loads(m.payload)["frame_index"] for m in got[:-1]] == list(range(40))
    assert not any(m.retain for m in got) and {m.qos for m in got} == {1}
    mqtt_line = next(line for line in summary.outputs if line.startswith("mqtt "))
    assert mqtt_line.startswith(f"mqtt {broker.url}: 41 messages, 0 dropped (topics streamdet/<source_id>/detections")


# ------------------------------------------------------------------------------------------ the sink
def test_status_is_retained_stats_are_not(broker, subscribers):
    sink = sink_for(broker.url, topic_prefix="site1/line2")
    sink.open()
    status = {"schema": "streamdet.status/1", "source_id": "cam1", "state": "connected", "attempt": 0}
    sink.status(status)
    sink.stats({"schema": "streamdet.stats/1", "sources": {}})
    sink.close()
    assert (sink.messages, sink.delivered, sink.dropped) == (2, 2, 0)
    late = subscribers(broker.port, "site1/#")  # subscribes afterwards: gets the retained status only
    got = late.wait(1, timeout_s=5)
    assert [(m.topic, m.retain, m.qos) for m in got] == [("site1/line2/cam1/status", True, 1)]
    assert json.loads(got[0].payload) == status


def test_broker_restart_mid_run_loses_nothing_and_never_blocks(broker, subscribers, capfd):
    sub = subscribers(broker.port)
    sink = sink_for(broker.url, flush_timeout_s=10)
    sink.open()
    sent = [f'{{"i":{i}}}'.encode() for i in range(60)]
    for p in sent[:20]:
        sink.write_json("cam", p)
    assert payloads(sub.wait(20)) == sent[:20]
    broker.stop()
    slowest = 0.0
    for p in sent[20:40]:  # broker away: QoS 1 messages are held by paho
        t = time.perf_counter()
        sink.write_json("cam", p)
        slowest = max(slowest, time.perf_counter() - t)
    assert slowest < 0.05 and sink.dropped == 0
    broker.start()
    for p in sent[40:]:
        sink.write_json("cam", p)
    sink.close()
    got = set(payloads(sub.wait_distinct(60, timeout_s=30)))  # at least once: a resent one may arrive twice
    assert got <= set(sent)
    assert sink.delivered + sink.dropped == len(sent)  # every loss counted
    assert sink.dropped == 0 and got == set(sent)  # QoS 1, buffer large enough: all of them (at least once)
    err = capfd.readouterr().err
    assert err.count("connection lost") == 1 and err.count(f"mqtt {broker.url}: connected") == 1


def test_tiny_buffer_drops_exactly_the_excess_then_connects(broker, subscribers, capfd):
    """The broker is down at start-up: the sink holds 5 QoS 1 messages, drops 7, sends the 5 once it is up."""
    sub = subscribers(broker.port)
    broker.stop()
    sink = sink_for(broker.url, buffer=5, flush_timeout_s=10)
    sink.open()
    sent = [f'{{"i":{i}}}'.encode() for i in range(12)]
    for p in sent:
        sink.write_json("cam", p)
    assert sink.dropped == 7  # 5 held, 7 beyond the buffer
    broker.start()
    sink.close()
    assert (sink.messages, sink.delivered, sink.dropped) == (12, 5, 7)
    assert payloads(sub.wait(5)) == sent[:5]
    time.sleep(0.2)
    assert len(sub.messages) == 5
    assert sink.describe().startswith(f"mqtt {broker.url}: 12 messages, 7 dropped")
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"warning: {broker.url}: broker unreachable (Connection refused)")
    assert err[1] == f"mqtt {broker.url}: connected"


def test_qos0_messages_while_disconnected_are_dropped_and_counted(broker, subscribers):
    sub = subscribers(broker.port)
    sink = sink_for(broker.url, qos=0, flush_timeout_s=1)
    sink.open()
    for i in range(5):
        sink.write_json("cam", b"%d" % i)
    assert len(sub.wait(5)) == 5
    broker.stop()
    for i in range(5, 8):
        sink.write_json("cam", b"%d" % i)
    sink.close()
    assert (sink.messages, sink.delivered, sink.dropped) == (8, 5, 3)


def test_unreachable_broker_at_start_warns_once_and_counts_what_it_could_not_send(capfd):
    port = free_port()
    sink = sink_for(f"mqtt://bob:{SECRET}@127.0.0.1:{port}", flush_timeout_s=1.0, buffer=100)
    t = time.monotonic()
    sink.open()  # does not fail: the run goes on, paho retries in the background
    assert time.monotonic() - t < 1.0
    for i in range(3):
        sink.write_json("cam", b"%d" % i)
    t = time.monotonic()
    sink.close()
    assert time.monotonic() - t < 1.0 + 1.0
    assert (sink.messages, sink.delivered, sink.dropped) == (3, 0, 3)
    err = capfd.readouterr().err
    assert err.splitlines() == [f"warning: mqtt://***@127.0.0.1:{port}: broker unreachable (Connection refused); "
                                "retrying, holding up to 100 messages"]
    assert SECRET not in sink.describe() and "bob" not in sink.describe() and SECRET not in repr(sink)


def test_refused_login_fails_open_with_one_redacted_line(tmp_path, capfd):
    b = Mosquitto(tmp_path / "auth", users={"bob": "right-" + SECRET})
    b.start()
    try:
        cfg = MqttConfig(url=f"mqtt://bob:{SECRET}@127.0.0.1:{b.port}")
        with pytest.raises(StageError) as exc:
            MqttSink(config=cfg).open()
        assert str(exc.value) == f"mqtt://***@127.0.0.1:{b.port}: the broker refused the login (Not authorized)"
        # config's login wins over the URL's
        ok = MqttSink(config=MqttConfig(url=cfg.url, password="right-" + SECRET))
        ok.open()
        ok.write_json("cam", b"{}")
        ok.close()
        assert (ok.delivered, ok.dropped) == (1, 0)
        text = " ".join([repr(cfg), repr(ok.config), repr(ok), ok.describe(), capfd.readouterr().err])
        assert SECRET not in text and "bob" not in text
    finally:
        b.close()


def test_refused_login_fails_the_run(standin_model, tmp_path, capfd):
    b = Mosquitto(tmp_path / "auth", users={"bob": "right"})
    b.start()
    try:
        s = settings_with({"sources": [str(bikes_path())], "model": str(standin_model), "quiet": True,
                           "sinks": {"publish": None}}, max_frames=4, sinks__mqtt=f"mqtt://127.0.0.1:{b.port}",
                          sinks__mqtt_username="bob", sinks__mqtt_password=SECRET)
        assert SECRET not in repr(s)
        summary = Pipeline(settings=s).run(handle_signals=False)
    finally:
        b.close()
    assert summary.exit_code == 1
    line = f"mqtt://***@127.0.0.1:{b.port}: the broker refused the login (Not authorized)"
    assert any(line in e for e in summary.errors), summary.errors
    out = capfd.readouterr()
    assert SECRET not in out.err + out.out + " ".join(summary.errors)


# ------------------------------------------------------------------------------------------ the broker's limits
def big_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "over the broker's limit" in line]


def test_a_message_too_large_for_the_broker_is_dropped_and_the_others_arrive(tmp_path, subscribers, capfd):
    """Before, the broker cut the connection at each resend of the large one: nothing behind it arrived."""
    b = Mosquitto(tmp_path / "small", conf=["max_packet_size 360"])
    b.start()
    try:
        sub = subscribers(b.port)
        sink = sink_for(b.url, flush_timeout_s=3)
        sink.open()
        sent = [b'{"i":%d}' % i for i in range(20)]
        for i, p in enumerate(sent):
            sink.write_json("cam", p)
            if i in (5, 12):  # PUBLISH: 3-byte header, topic 2 + 24, packet id 2, properties 1, payload 400
                sink.write_json("cam" if i == 5 else "cam2", b"x" * 400)
        sink.close()
        assert payloads(sub.wait(20)) == sent
    finally:
        b.close()
    assert (sink.messages, sink.delivered, sink.dropped, sink.too_large) == (22, 20, 2, 2)
    assert sink.describe().startswith(f"mqtt {b.url}: 22 messages, 2 dropped, 2 of them too large for the broker (")
    err = capfd.readouterr().err
    assert big_warnings(err) == [f"warning: {b.url}: a message on streamdet/cam/detections is 432 bytes, over the "
                                 "broker's limit of 360: dropped (every such message is dropped and counted; "
                                 "this warning is not repeated)"]
    assert "connection lost" not in err


def test_a_held_message_too_large_is_dropped_when_the_broker_tells_its_limit(tmp_path, subscribers, capfd):
    """The broker is down at start-up: the sink holds the messages, then learns the limit from the CONNACK."""
    b = Mosquitto(tmp_path / "small", persistent=True, conf=["max_packet_size 300"])
    b.start()
    sub = subscribers(b.port)
    b.stop()
    try:
        sink = sink_for(b.url, flush_timeout_s=10)
        sink.open()
        sink.write_json("cam", b"1")
        sink.write_json("cam", b"x" * 300)
        sink.write_json("cam", b"2")
        b.start()
        sink.close()
        assert payloads(sub.wait(2)) == [b"1", b"2"]
    finally:
        b.close()
    assert (sink.delivered, sink.dropped, sink.too_large) == (2, 1, 1)
    assert len(big_warnings(capfd.readouterr().err)) == 1


def test_qos2_burst_beyond_the_brokers_receive_maximum_loses_nothing(tmp_path, subscribers):
    """Mosquitto takes 5 QoS 2 messages in flight here; before, the sink sent 100 and the rest were lost unseen."""
    b = Mosquitto(tmp_path / "narrow", persistent=True, conf=["max_inflight_messages 5"])
    b.start()
    sub = subscribers(b.port)
    b.stop()  # down at start-up: 100 messages held, sent once it is up
    try:
        sink = sink_for(b.url, qos=2, flush_timeout_s=20)
        sink.open()
        sent = [b"%d" % i for i in range(300)]
        for p in sent[:100]:
            sink.write_json("cam", p)
        b.start()
        for p in sent[100:]:
            sink.write_json("cam", p)
        sink.close()
        assert (sink.delivered, sink.dropped) == (300, 0)
        assert payloads(sub.wait(300, timeout_s=10)) == sent
    finally:
        b.close()


def test_a_message_the_broker_refuses_is_dropped_with_one_warning(tmp_path, subscribers, capfd):
    """An ACL denial comes back in the MQTT v5 PUBACK (QoS 1); before, it counted as delivered."""
    (tmp_path / "acl").write_text("topic write streamdet/ok/#\ntopic read #\n")
    b = Mosquitto(tmp_path / "acl-broker", conf=[f"acl_file {tmp_path / 'acl'}"])
    b.start()
    try:
        sub = subscribers(b.port)
        sink = sink_for(b.url)
        sink.open()
        for i in range(3):
            sink.write_json("ok", b"%d" % i)
            sink.write_json("no", b"%d" % i)
        sink.close()
        assert payloads(sub.wait(3)) == [b"0", b"1", b"2"]
    finally:
        b.close()
    assert (sink.messages, sink.delivered, sink.dropped) == (6, 3, 3)
    err = capfd.readouterr().err
    assert err.splitlines() == [f"warning: {b.url}: the broker refused a message on streamdet/no/detections "
                                "(Not authorized): dropped (every such message is dropped and counted; "
                                "this warning is not repeated)"]


def test_a_broker_without_mqtt_v5_gets_mqtt_311():
    b = Mqtt311Broker()
    try:
        sink = sink_for(f"mqtt://127.0.0.1:{b.port}", flush_timeout_s=5)
        sink.open()
        sink.write_json("cam", b"{}")
        sink.close()
    finally:
        b.close()
    assert b.levels == [5, 4] and b.topics == ["streamdet/cam/detections"]
    assert (sink.delivered, sink.dropped) == (1, 0)


# ------------------------------------------------------------------------------------------ stats
def test_stats_report_sink_dropped_in_payload_line_and_metrics():
    st = LiveStats(config=StatsConfig(sources=(("cam", True),), interval_s=1.0))
    line, payload = st.report(now=st._last + 1.0)
    assert "sink_dropped" not in payload and "mqtt_dropped" not in line
    st.set_sink_dropped("mqtt", 0)
    line, payload = st.report(now=st._last + 1.0)
    assert payload["sink_dropped"] == {"mqtt": 0} and "mqtt_dropped" not in line
    st.set_sink_dropped("mqtt", 7)
    line, payload = st.report(now=st._last + 1.0)
    assert payload["sink_dropped"] == {"mqtt": 7} and line.endswith(" mqtt_dropped=7")

    port = free_port()
    st = LiveStats(config=StatsConfig(sources=(("cam", True),), interval_s=1.0, metrics_port=port))
    st.open()
    try:
        st.set_sink_dropped("mqtt", 3)
        st.set_sink_dropped("mqtt", 5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        st.close()
    assert 'streamdet_sink_dropped_total{sink="mqtt"} 5.0' in text
