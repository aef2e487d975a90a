import json

import pytest

import training.dataset
from training.dataset import DatasetError, load_coco_dataset, main, write_dataset


def test_cli_writes_coco_dataset(tmp_path):
    out = tmp_path / "ds"
    assert main(["--out", str(out), "--images", "2", "--seed", "1", "--quiet"]) == 0
    ds = load_coco_dataset(out)
    assert ds.image_ids == [0, 1]
    assert len(ds.class_names) == 10
    im = ds.coco["images"][0]
    assert ds.read_image_rgb(im).shape == (720, 1280, 3)
    assert ds.read_semantic(im).shape == (720, 1280)
    assert all(isinstance(a["segmentation"]["counts"], str) for a in ds.coco["annotations"])


def test_cli_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        assert main(["--out", str(tmp_path / name), "--images", "1", "--seed", "9", "--quiet"]) == 0
    for rel in ("images/000000.png", "semantic/000000.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    docs = [json.loads((tmp_path / n / "annotations.json").read_text()) for n in ("a", "b")]
    for d in docs:
        d["info"].pop("command")  # names the output directory
    assert docs[0] == docs[1]


@pytest.mark.parametrize("scene", ["shapes", "plates"])
def test_rendering_in_two_processes_writes_the_same_files(tmp_path, monkeypatch, scene):
    monkeypatch.setattr(training.dataset, "RENDER_CHUNK", 4)  # chunks of 4 (16 in use): a third of the images
    n = training.dataset.RENDER_CHUNK + 3  # two chunks, the second short
    one = write_dataset(tmp_path / "one", num_images=n, seed=5, show_progress=False, scene=scene, workers=1)
    two = write_dataset(tmp_path / "two", num_images=n, seed=5, show_progress=False, scene=scene, workers=2)
    for sub in ("images", "semantic"):
        names = sorted(p.name for p in (one / sub).iterdir())
        assert names == sorted(p.name for p in (two / sub).iterdir()) and len(names) == n
        assert all((one / sub / m).read_bytes() == (two / sub / m).read_bytes() for m in names)
    docs = [json.loads((d / "annotations.json").read_text()) for d in (one, two)]
    assert docs[0] == docs[1]
    ids = [a["id"] for a in docs[1]["annotations"]]
    assert ids == list(range(1, len(ids) + 1))  # annotation ids run on across the chunks


def test_cli_refuses_nonempty_output(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("1")
    assert main(["--out", str(tmp_path / "x"), "--images", "1", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "x" in err[0]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[]", "expected a COCO object"),
        (json.dumps({"images": [], "annotations": []}), "categories"),
        (json.dumps({"images": [{"id": 0}], "annotations": [], "categories": []}), "malformed image"),
        (json.dumps({"images": [], "annotations": [{"image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                     "categories": [{"id": 1, "name": "a"}]}), "unknown image"),
    ],
)
def test_malformed_annotations(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "annotations.json").write_text(content)
    with pytest.raises(DatasetError, match=problem) as e:
        load_coco_dataset(tmp_path)
    assert "annotations.json" in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_coco_dataset(tmp_path / "nope")
