"""Same detections before and after a change: run the main job on two commits and compare the JSONL.

    python bench/same_output.py                    # this work tree against 121c34a (main before the layering change)
    python bench/same_output.py --before HEAD~3    # against any commit
    python bench/same_output.py --max-frames 60    # quicker

Both runs use each tree's own ``run_pipeline.py`` with its defaults (the bundled detector on the
bundled demo video), ``--jsonl`` and no PUB socket. The commit is exported with ``git archive`` into
a temporary folder, so the work tree is never touched. Every JSONL line is compared as JSON after
dropping the fields that measure time (``capture_time``, ``latency_ms``, ``timing_ms``, and the
``time`` of status and stats lines); everything else (frame indices, PTS, boxes, scores, classes,
masks, EOS) must be equal. Last line: ``same_output=yes lines=N`` (exit 0) or ``same_output=no
first_difference=LINE`` (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEFORE_LAYERING = "121c34a"
TIMING_FIELDS = ("capture_time", "latency_ms", "timing_ms", "time")


def export_commit(rev: str, dest: Path) -> Path:
    """Write the tree of commit ``rev`` into ``dest`` (``git archive``); returns ``dest``."""
    archive = dest.with_suffix(".tar")
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return dest


def run_main_job(tree: Path, out: Path, max_frames: int | None) -> None:
    """Run ``tree/run_pipeline.py`` with its defaults, writing ``out`` (JSONL)."""
    cmd = [sys.executable, str(tree / "run_pipeline.py"), "--jsonl", str(out), "--publish", "none", "--quiet"]
    if max_frames:
        cmd += ["--max-frames", str(max_frames)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("STREAMDET_CONFIG", None)
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {tree}: run_pipeline.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}")


def normalized(line: str) -> Any:
    """One JSONL line as JSON without the fields that measure time."""
    obj = json.loads(line)
    return _drop(obj)


def _drop(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [_drop(v) for v in obj]
    return obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE_LAYERING, help=f"commit to compare with (default {BEFORE_LAYERING})")
    ap.add_argument("--max-frames", type=int, default=None, help="stop after N frames (default: the whole video)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="same_output_") as tmp:
        old_tree = export_commit(args.before, Path(tmp) / "before")
        old_out, new_out = Path(tmp) / "before.jsonl", Path(tmp) / "after.jsonl"
        run_main_job(old_tree, old_out, args.max_frames)
        run_main_job(ROOT, new_out, args.max_frames)
        old_lines = old_out.read_text().splitlines()
        new_lines = new_out.read_text().splitlines()
    print(f"before ({args.before}): {len(old_lines)} lines; after (work tree): {len(new_lines)} lines")
    for i, (a, b) in enumerate(zip(old_lines, new_lines), start=1):
        if normalized(a) != normalized(b):
            print(f"line {i} differs:\n  before: {a[:300]}\n  after:  {b[:300]}")
            print(f"same_output=no first_difference={i}")
            return 1
    if len(old_lines) != len(new_lines):
        print(f"same_output=no first_difference={min(len(old_lines), len(new_lines)) + 1}")
        return 1
    print(f"same_output=yes lines={len(new_lines)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
