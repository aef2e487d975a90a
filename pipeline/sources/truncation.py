"""A file cut short that its demuxer reads to a quiet end: the size its own header declares.

FFmpeg's Matroska/WebM demuxer ends a truncated file as if it were complete (no error, no corrupt
packet): a download or copy cut at 30 % decoded as 0 frames, "finished". The Segment element at
the start of the file declares its size (Matroska specification, RFC 9559, section 4 "EBML"; a
live stream's "unknown" size declares nothing), so a file shorter than that was cut.
"""

from __future__ import annotations

import os

__all__ = ["MATROSKA_FORMATS", "matroska_declared_size"]

MATROSKA_FORMATS = frozenset({"matroska", "webm", "matroska,webm"})
"""FFmpeg's names of the formats :func:`matroska_declared_size` reads."""

_EBML_ID = 0x1A45DFA3
_SEGMENT_ID = 0x18538067
_HEAD_BYTES = 4096  # the EBML header and the Segment's size are within the first few dozen bytes


def _vint(data: bytes, pos: int, *, keep_marker: bool) -> tuple[int | None, int]:
    """An EBML variable-size integer at ``pos``: ``(value, next pos)``; value None for an all-ones size ("unknown")."""
    first = data[pos]
    length = 8 - first.bit_length() + 1
    if first == 0 or pos + length > len(data):
        raise ValueError("not an EBML integer")
    value = int.from_bytes(data[pos:pos + length], "big")
    if keep_marker:
        return value, pos + length
    value &= (1 << (7 * length)) - 1
    return (None if value == (1 << (7 * length)) - 1 else value), pos + length


def matroska_declared_size(path: str | os.PathLike[str]) -> int | None:
    """The file size a Matroska/WebM file declares: the end of its Segment element.

    Args:
        path: a local file.

    Returns:
        The size in bytes, or None when the file declares none (an "unknown" Segment size, as a live
        stream writes it) or its head is not EBML.

    Raises:
        OSError: if the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read(_HEAD_BYTES)
    pos = 0
    try:
        for k in range(8):  # the EBML header, maybe a Void, then the Segment
            element, pos = _vint(data, pos, keep_marker=True)
            size, pos = _vint(data, pos, keep_marker=False)
            if (k == 0 and element != _EBML_ID) or size is None and element != _SEGMENT_ID:
                return None
            if element == _SEGMENT_ID:
                return None if size is None else pos + size
            assert size is not None
            pos += size
    except (ValueError, IndexError):
        return None
    return None
