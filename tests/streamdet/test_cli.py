"""What every command line shares: the relative-path note of missing-file errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamdet.card import ModelCardError, load_card
from streamdet.cli import relative_path_note


@pytest.mark.parametrize("path,noted", [("model.onnx", True), ("a/b.json", True), ("./x", True),
                                        ("/abs/model.onnx", False), (Path("/abs"), False)])
def test_relative_path_note(path: str | Path, noted: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    note = relative_path_note(path)
    assert note == (f" (a relative path is taken from the current directory, {tmp_path})" if noted else "")


def test_missing_relative_card_names_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelCardError) as e:
        load_card("cards/none.json")
    assert str(e.value) == f"cards/none.json: model card not found (a relative path is taken from the current " \
                           f"directory, {tmp_path})"
