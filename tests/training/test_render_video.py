import json

import av
import numpy as np
from pycocotools import mask as mask_utils

from training.render_video import main, render_frames


def test_ground_truth_matches_decoded_frames(tmp_path):
    out = tmp_path / "demo.mp4"
    assert main(["--out", str(out), "--seconds", "0.6", "--seed", "3"]) == 0
    gt = json.loads(out.with_suffix(".json").read_text())
    lossless = list(render_frames(3, 0.6))
    with av.open(str(out)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == len(lossless) == len(gt["images"]) == 15
    assert [im["id"] for im in gt["images"]] == list(range(15))
    for idx in (0, 7, 14):  # spot-check frames
        frame, ref = decoded[idx].astype(np.float32), lossless[idx]
        mse = float(((frame - ref.image) ** 2).mean())
        assert 10 * np.log10(255**2 / mse) > 30  # decoded frame is the rendered frame
        anns = [a for a in gt["annotations"] if a["image_id"] == idx]
        assert len(anns) == ref.boxes_xyxy.shape[0] > 0
        for a, box in zip(anns, ref.boxes_xyxy):
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], box)
            m = mask_utils.decode(a["segmentation"]).astype(bool)
            assert m.any()
            # the object is drawn where its mask says: decoded pixels there match the rendered object
            assert np.abs(frame[m] - ref.image[m]).mean() < 8
            # and its box is the tight box of those pixels
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_bad_output_path(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "missing" / "v.mp4"), "--seconds", "0.2"]) == 1
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
