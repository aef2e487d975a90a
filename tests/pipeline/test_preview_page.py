"""The preview page in headless Chromium, against the app under uvicorn over a scripted control plane.

The plane lists five sources (no pipeline runs): ``cam`` (live, ``connected``, one frame), ``clip``
(file, ``running``), ``recon`` (live, ``reconnecting``), ``old`` (file, ended before the page opened)
and ``late`` (listed as running, removed as its preview connects: closed with 4404). The page
(``window.WebSocket`` counted) must:

* open no preview for ``old`` and one only for ``late``, however long it stays open (it used to
  retry every second, for each of up to 100 ended sources);
* open ``late`` again once the list shows it running again (an id taken by a new source);
* count ``connected`` as running and give it the colour of ``running``, another to ``reconnecting``
  and ``ended``;
* show a text, not a broken image, in a tile without frames.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from tests.helpers.browser import ensure_chromium, headless_chrome, wait_for_js
from tests.pipeline.test_control_units import _view
from tests.pipeline.test_preview_ws import TOKEN, PreviewPlane, Served, serve

pytestmark = pytest.mark.slow

COUNT_SOCKETS = """
window.wsOpened = {};
const RealWebSocket = window.WebSocket;
window.WebSocket = function (url, protocols) {
  const id = decodeURIComponent(new URL(url).pathname.split("/").slice(-2)[0]);
  window.wsOpened[id] = (window.wsOpened[id] || 0) + 1;
  return new RealWebSocket(url, protocols);
};
window.WebSocket.prototype = RealWebSocket.prototype;
Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
"""

TILES = """
const out = {};
for (const t of document.querySelectorAll(".tile")) {
  const img = t.querySelector("img"), note = t.querySelector(".note"), state = t.querySelector(".state");
  out[t.id.slice(5)] = {state: state.textContent, colour: getComputedStyle(state).backgroundColor,
                        imgShown: img.getClientRects().length > 0, imgWidth: img.naturalWidth,
                        note: note && note.getClientRects().length > 0 ? note.textContent : null};
}
return {tiles: out, opened: window.wsOpened, frames: window.sdFrames,
        summary: document.getElementById("summary").textContent};
"""


@pytest.fixture
def page_plane() -> Iterator[tuple[PreviewPlane, Served]]:
    ensure_chromium()
    plane = PreviewPlane()
    plane.sources = {
        "cam": _view("cam", state="connected"),
        "clip": _view("clip", kind="file", url="/videos/clip.mp4", state="running"),
        "recon": _view("recon", state="reconnecting", fps=None),
        "old": _view("old", kind="file", url="/videos/old.mp4", state="ended", reason="eos", fps=None),
        "late": _view("late", kind="file", url="/videos/late.mp4", state="running"),
    }
    plane.removed_on_connect.add("late")
    ok, jpeg = cv2.imencode(".jpg", np.full((90, 160, 3), 128, np.uint8))
    assert ok
    plane.preview.put("cam", jpeg.tobytes())
    with serve(plane) as served:
        yield plane, served
    assert served.problems() == [], "uvicorn logged problems"


def test_page_leaves_ended_sources_alone_and_counts_connected_as_running(page_plane):
    plane, served = page_plane
    with headless_chrome(1280, 860) as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_SOCKETS})
        driver.get(f"{served.http}/#token={TOKEN}")
        wait_for_js(driver, "return (window.sdFrames || {})['cam'] >= 1", timeout_s=10)
        wait_for_js(driver, "return (window.sdSources || []).some(s => s.id === 'late' && s.state === 'ended')",
                    timeout_s=10)
        time.sleep(4.0)  # four polls: the page used to reopen each closed preview every second
        seen = driver.execute_script(TILES)

        plane.removed_on_connect.discard("late")  # a new source takes the id: listed as running again
        plane.sources["late"].update(state="running", reason=None)
        reopened = wait_for_js(driver, "return (window.wsOpened['late'] || 0) >= 2 && window.wsOpened", 5)
        time.sleep(1.5)
        after = driver.execute_script(TILES)

    tiles, opened = seen["tiles"], seen["opened"]
    assert opened.get("old", 0) == 0, f"previews opened for an ended source: {opened}"
    assert opened == {"cam": 1, "clip": 1, "recon": 1, "late": 1}, opened
    assert seen["summary"] == "5 source(s), 2 running"
    assert tiles["cam"]["colour"] == tiles["clip"]["colour"], "connected is not coloured as running"
    assert len({tiles[k]["colour"] for k in ("cam", "recon", "old")}) == 3, tiles
    assert tiles["cam"]["imgShown"] and tiles["cam"]["imgWidth"] == 160 and tiles["cam"]["note"] is None
    notes = {"old": "source ended (eos)", "late": "source ended (removed)", "clip": "waiting for frames"}
    for sid, text in notes.items():
        assert not tiles[sid]["imgShown"] and (tiles[sid]["note"] or "").startswith(text), tiles[sid]
    assert reopened["late"] == 2 and after["opened"]["late"] == 2, after["opened"]
    assert after["tiles"]["late"]["note"].startswith("waiting for frames")
    assert after["summary"] == "5 source(s), 3 running"
    assert plane.preview.viewers("old") == 0 and "old" not in plane.asked
