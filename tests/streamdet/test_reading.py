import numpy as np
import pytest

from streamdet.reading import read_text

ALPHA = list("0123456789AC")


def _dets(rows):
    b = np.array([r[0] for r in rows], np.float32).reshape(-1, 4)
    s = np.array([r[1] for r in rows], np.float32)
    c = np.array([r[2] for r in rows], np.int64)
    return b, s, c


@pytest.mark.parametrize(("rows", "min_score", "want"), [
    ([], 0.25, ("", 0.0)),  # nothing
    ([((0, 0, 10, 20), 0.1, 1)], 0.25, ("", 0.0)),  # all below the threshold
    # unsorted input
    ([((20, 0, 30, 20), 0.9, 2), ((0, 0, 10, 20), 0.8, 1), ((10, 0, 20, 20), 0.7, 10)], 0.25, ("1A2", 0.7)),
    # low scores dropped
    ([((0, 0, 10, 20), 0.9, 3), ((10, 0, 20, 20), 0.2, 4), ((20, 0, 30, 20), 0.6, 5)], 0.25, ("35", 0.6)),
    ([((0, 0, 10, 20), 0.9, 3), ((10, 0, 20, 20), 0.25, 4)], 0.25, ("34", 0.25)),  # threshold inclusive
    ([((2, 0, 8, 20), 0.9, 7), ((0, 0, 10, 20), 0.8, 1)], 0.25, ("17", 0.8)),  # same centre: left edge first
    ([((0, 0, 10, 20), 0.9, 7), ((0, 0, 10, 20), 0.8, 1)], 0.25, ("71", 0.8)),  # full tie: input order
])
def test_read_text_table(rows, min_score, want):
    b, s, c = _dets(rows)
    text, score = read_text(b, s, c, ALPHA, min_score)
    assert text == want[0]
    assert score == pytest.approx(want[1])


def test_read_text_errors():
    b, s, c = _dets([((0, 0, 1, 1), 0.9, 12)])
    with pytest.raises(ValueError, match="class ids"):
        read_text(b, s, c, ALPHA, 0.25)
    with pytest.raises(ValueError, match="expected boxes"):
        read_text(b, s[:0], c, ALPHA, 0.25)
