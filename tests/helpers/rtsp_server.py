"""A small RTSP server for the live-source tests (GStreamer's gst-rtsp-server, run with /usr/bin/python3).

Usage::

    /usr/bin/python3 tests/helpers/rtsp_server.py CLIP.mp4 PORT [--fps 25] [--auth USER:PASS]

Decodes the clip once into memory, then serves it in an endless loop, re-encoded as H.264
(x264enc, zerolatency) at ``--fps`` frames per second, on ``rtsp://127.0.0.1:PORT``:

* ``/clip``: the clip, looped;
* ``/resize``: the clip, its frame size doubled after 40 frames (a resolution change mid-stream);
* ``/audio``: an audio-only stream (no video track).

With ``--auth USER:PASS`` every mount needs HTTP Basic credentials. Prints ``ready`` on stdout
once it listens. It needs python3-gi, gir1.2-gst-rtsp-server-1.0 and the GStreamer base, good,
bad and ugly plugins (x264enc).
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

RESIZE_AFTER = 40


def decode_clip(path):
    """All frames of a clip as I420 ``Gst.Buffer`` objects, and their caps."""
    pipe = Gst.parse_launch(
        f'filesrc location="{path}" ! decodebin ! videoconvert ! video/x-raw,format=I420 '
        "! appsink name=sink sync=false emit-signals=false max-buffers=0")
    sink = pipe.get_by_name("sink")
    pipe.set_state(Gst.State.PLAYING)
    buffers, caps = [], None
    while True:
        sample = sink.emit("pull-sample")
        if sample is None:
            break
        caps = sample.get_caps()
        buffers.append(sample.get_buffer())
    pipe.set_state(Gst.State.NULL)
    if not buffers:
        raise SystemExit(f"error: {path}: no video frames decoded")
    return buffers, caps


class LoopFactory(GstRtspServer.RTSPMediaFactory):
    """Serves the in-memory frames in a loop through appsrc -> x264enc -> RTP."""

    def __init__(self, buffers, caps, fps, resize):
        super().__init__()
        self.buffers, self.caps, self.fps, self.resize = buffers, caps, fps, resize
        self.set_shared(True)

    def do_create_element(self, url):
        s = self.caps.get_structure(0)
        w, h = s.get_value("width"), s.get_value("height")
        launch = (
            "( appsrc name=src is-live=true format=time do-timestamp=true max-buffers=2 leaky-type=downstream "
            "! videoscale ! capsfilter name=size ! videoconvert "
            "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 "
            "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
        )
        bin_ = Gst.parse_launch(launch)
        src = bin_.get_by_name("src")
        src.set_property("caps", self.caps)
        size = bin_.get_by_name("size")
        size.set_property("caps", Gst.Caps.from_string(f"video/x-raw,width={w},height={h}"))
        state = {"i": 0}
        dur = Gst.SECOND // self.fps

        def push():  # one frame per tick, in real time (timestamps from the clock: do-timestamp)
            i = state["i"]
            if self.resize and i == RESIZE_AFTER:
                size.set_property("caps", Gst.Caps.from_string(f"video/x-raw,width={w * 2},height={h * 2}"))
            buf = self.buffers[i % len(self.buffers)].copy()
            buf.pts = buf.dts = Gst.CLOCK_TIME_NONE
            buf.duration = dur
            state["i"] = i + 1
            ret = src.emit("push-buffer", buf)
            return ret in (Gst.FlowReturn.OK, Gst.FlowReturn.FLUSHING) or i < 50

        GLib.timeout_add(1000 // self.fps, push)
        return bin_


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clip")
    p.add_argument("port", type=int)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--auth", default="")
    args = p.parse_args()
    Gst.init(None)
    buffers, caps = decode_clip(args.clip)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    factories = {
        "/clip": LoopFactory(buffers, caps, args.fps, resize=False),
        "/resize": LoopFactory(buffers, caps, args.fps, resize=True),
    }
    audio = GstRtspServer.RTSPMediaFactory()
    audio.set_launch("( audiotestsrc is-live=true ! audioconvert ! audioresample ! alawenc "
                     "! rtppcmapay name=pay0 pt=8 )")
    audio.set_shared(True)
    factories["/audio"] = audio
    if args.auth:
        user, _, password = args.auth.partition(":")
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        for f in factories.values():
            f.add_role_from_structure(Gst.Structure.from_string(
                "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true")[0])
    for path, f in factories.items():
        mounts.add_factory(path, f)
    if server.attach(None) == 0:
        print(f"error: cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    try:
        GLib.MainLoop().run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
