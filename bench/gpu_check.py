"""The GPU check: one command that builds, tests and measures the GPU path on one NVIDIA GPU machine.

    bash bench/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run]     # the wrapper: installs, then runs this
    python bench/gpu_check.py --out DIR [--dry-run] [--budget-s 500]

Phases, in order, each with its own time budget (seconds on the GPU machine; ``--dry-run``: the
same code on the CPU with tiny sizes):

====================  ======  ================================================================
phase                 budget  what
====================  ======  ================================================================
setup                 60      ``MODEL.pt2`` built from the ONNX with this machine's torch and
                              checked against ONNX Runtime; the 1080p30 H.264 test clip encoded
engine                50      engine-only fps, batch 1/8/32, FP32 and FP16 (CUDA backend, CUDA graphs)
decode                30      one stream: software decode to YUV, software decode + RGB, NVDEC
                              (host NV12, host RGB, device NV12 via DLPack): fps, CPU ms/frame
pipeline_vs_engine    45      batch 32 with decoding excluded (host YUV -> device -> RGB letterbox
                              -> engine -> NMS -> host) and with it (unpaced streams), against
                              engine-only at batch 32
streams               170     the largest N of 1080p30 streams at real-time pace with p99 <= 100 ms
                              and no growing latency (software decode; then NVDEC)
pytest                90      ``pytest -m gpu`` over the test files holding gpu tests (skipped in the
                              dry run: the command is recorded, not run)
====================  ======  ================================================================

Results go to ``OUT/results.json`` and ``OUT/results.md``, rewritten after every phase (a run cut
short still leaves the phases done); progress lines go to stdout. Exit status 0 when every phase
ran (figures may still miss the goals: see ``goals`` in the JSON), 1 when a phase failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from gpu_check_report import render_markdown  # noqa: E402


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes and budgets of one run (the GPU run or the dry run)."""

    device: str
    clip_wh: tuple[int, int]
    clip_seconds: float
    fps: int
    batches: tuple[int, ...]
    engine_graphs: tuple[int, ...]
    workers: int
    stream_counts: tuple[int, ...]
    max_streams: int
    trial_s: float
    budgets: dict[str, float]


GPU_BUDGETS = {"setup": 60.0, "engine": 50.0, "decode": 30.0, "pipeline_vs_engine": 45.0, "streams": 170.0,
               "pytest": 90.0}
DRY_BUDGETS = {"setup": 30.0, "engine": 5.0, "decode": 3.0, "pipeline_vs_engine": 10.0, "streams": 12.0,
               "pytest": 1.0}


def make_plan(dry_run: bool) -> Plan:
    """The GPU plan (1080p30, batch 1/8/32, up to 192 streams on 14 decoder processes) or the dry-run plan."""
    if dry_run:
        return Plan(device="cpu", clip_wh=(320, 180), clip_seconds=4.0, fps=10, batches=(1, 2), engine_graphs=(1, 2),
                    workers=1, stream_counts=(1, 2), max_streams=2, trial_s=1.5, budgets=DRY_BUDGETS)
    cores = os.cpu_count() or 16
    return Plan(device="cuda", clip_wh=(1920, 1080), clip_seconds=16.0, fps=30, batches=(1, 8, 32),
                engine_graphs=(1, 2, 4, 8, 16, 24, 32), workers=max(1, min(14, cores - 2)),
                stream_counts=(64, 96, 128, 48, 32, 16), max_streams=192, trial_s=7.0, budgets=GPU_BUDGETS)


class Check:
    """Runs the phases and keeps the results file current."""

    def __init__(self, out: Path, plan: Plan, model: Path, total_budget_s: float) -> None:
        self.out, self.plan, self.model = out, plan, model
        self.t_start = time.monotonic()
        self.deadline = self.t_start + total_budget_s
        self.work = out / ".work" if plan.device == "cpu" else Path("/tmp/streamdet-gpu-check")
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"schema": "streamdet.gpu_check/1", "dry_run": plan.device == "cpu",
                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(model),
                                        "plan": {"clip_wh": list(plan.clip_wh), "fps": plan.fps,
                                                 "batches": list(plan.batches), "workers": plan.workers,
                                                 "budgets_s": plan.budgets, "total_budget_s": total_budget_s},
                                        "phases": {}}
        self.engine: Any = None
        self.card: Any = None
        self.onnx: Path | None = None
        self.clip: dict[str, Any] = {}
        self.failed = False

    def say(self, msg: str) -> None:
        """One progress line."""
        print(f"[{time.monotonic() - self.t_start:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        """Write results.json and results.md (atomically)."""
        self.results["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        for name, text in (("results.json", json.dumps(self.results, indent=1, default=str)),
                           ("results.md", render_markdown(self.results))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def budget(self, phase: str) -> float:
        """The phase's budget, cut to what the whole run has left."""
        return max(1.0, min(self.plan.budgets[phase], self.deadline - time.monotonic()))

    def run(self, phase: str, fn: Any) -> None:
        """Run one phase: record its figures, its time and its budget, or its error."""
        budget = self.budget(phase)
        self.say(f"phase {phase}: budget {budget:.0f} s")
        t0 = time.monotonic()
        rec: dict[str, Any] = {"budget_s": round(budget, 1)}
        try:
            rec.update(fn(budget, t0 + budget) or {})
            rec["status"] = "ok"
        except Exception as e:  # one phase's failure must not lose the others' figures
            self.failed = True
            rec["status"] = "failed"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=6)
            self.say(f"phase {phase} FAILED: {rec['error']}")
        rec["elapsed_s"] = round(time.monotonic() - t0, 1)
        self.results["phases"][phase] = rec
        self.save()
        self.say(f"phase {phase}: {rec['status']} in {rec['elapsed_s']} s")

    # -- phases ---------------------------------------------------------------------------------

    def setup(self, budget: float, end: float) -> dict[str, Any]:
        """Environment, ``.pt2`` build, test clip."""
        import torch
        from gpu_check_media import make_clip
        from gpu_check_model import build_pt2

        from streamdet.card import load_card

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
        for mod in ("av", "zmq", "numpy", "cv2", "onnxruntime", "cupy"):
            try:
                env[mod] = __import__(mod).__version__
            except Exception as e:  # cupy may be missing or broken; recorded, not fatal
                env[mod] = f"unavailable ({type(e).__name__})"
        if self.plan.device == "cuda":
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                       cuda=torch.version.cuda, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                       matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        self.results["environment"] = env
        t = time.monotonic()
        self.onnx = build_pt2(self.model, self.work / "model")
        self.card = load_card(self.onnx.with_suffix(".json"))
        pt2_s = round(time.monotonic() - t, 1)
        self.say(f"built {self.onnx.with_suffix('.pt2').name} in {pt2_s} s (matches ONNX Runtime)")
        self.clip = make_clip(self.work / "clip.mp4", wh=self.plan.clip_wh, seconds=self.plan.clip_seconds,
                              fps=self.plan.fps)
        self.say(f"clip {self.clip['wh']} {self.clip['frames']} frames in {self.clip['encode_s']} s")
        return {"pt2_build_s": pt2_s, "clip": self.clip, "input_wh": list(self.card.input_wh)}

    def _engine(self, half: bool, graphs: tuple[int, ...]) -> Any:
        from engines.cuda_backend import CudaEngine

        assert self.onnx is not None
        e = CudaEngine(model_path=self.onnx, device=self.plan.device, half=half, graph_batches=graphs)
        e.start()
        return e

    def _fps(self, fn: Any, b: int, seconds: float, warmup: int = 3) -> float:
        import torch
        from gpu_bench import _Timer

        timer = _Timer(torch, torch.device(self.plan.device))
        for _ in range(warmup):
            fn()
        timer.sync()
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if n % 5 == 0 or self.plan.device == "cpu":
                timer.sync()
                if time.perf_counter() - t0 >= seconds:
                    break
        timer.sync()
        return b * n / (time.perf_counter() - t0)

    def engine_phase(self, budget: float, end: float) -> dict[str, Any]:
        """Engine-only fps per precision and batch."""
        import torch

        assert self.card is not None
        w, h = self.card.input_wh
        out: dict[str, Any] = {}
        per = max(0.2, (budget - 20.0 if self.plan.device == "cuda" else budget * 0.5) / (2 * len(self.plan.batches)))
        for prec, half in (("fp32", False), ("fp16", True)):
            t = time.monotonic()
            graphs = self.plan.batches if prec == "fp32" else self.plan.engine_graphs
            eng = self._engine(half, graphs)
            row: dict[str, Any] = {"start_s": round(time.monotonic() - t, 1), "graphs": list(eng.graphs)}
            for b in self.plan.batches:
                x = torch.rand((b, 3, h, w), device=self.plan.device)
                row[f"b{b}_fps"] = round(self._fps(lambda x=x, eng=eng: eng.infer_device(x), b, per), 1)
                self.say(f"engine {prec} batch {b}: {row[f'b{b}_fps']} fps")
            out[prec] = row
            if prec == "fp16":
                self.engine = eng
            else:
                eng.stop()
        if self.plan.device == "cpu":
            out["note"] = "CPU dry run: the CUDA backend runs eagerly in float32 (FP16 and graphs are CUDA only)"
        return out

    def decode_phase(self, budget: float, end: float) -> dict[str, Any]:
        """Decoding figures of one stream."""
        from gpu_check_media import decode_figures

        res = decode_figures(Path(self.clip["path"]), nvdec=self.plan.device == "cuda",
                             max_frames=self.clip["frames"], budget_s=budget - 2.0)
        for k, v in res.items():
            self.say(f"decode {k}: {v}")
        return res

    def _matrix(self) -> Any:
        import av

        from pipeline.gpu.nv12 import yuv_matrix_for

        with av.open(self.clip["path"]) as c:
            f = next(c.decode(video=0))
            matrix, full = yuv_matrix_for(f)
        return matrix, full

    def pipeline_phase(self, budget: float, end: float) -> dict[str, Any]:
        """Batch-32 (largest batch) pipeline against engine-only, without and with decoding."""
        import av
        import numpy as np
        import torch
        from gpu_check_streams import DecodeMode

        from pipeline.gpu.gpu_nms import postprocess_detect_torch
        from pipeline.gpu.nv12 import GpuYuvLetterbox, YuvLayout
        from streamdet.postprocess import PostprocessConfig

        assert self.engine is not None and self.card is not None
        b = max(self.plan.batches)
        fh, fw = self.plan.clip_wh[1], self.plan.clip_wh[0]
        frames = []
        with av.open(self.clip["path"]) as c:
            for f in c.decode(video=0):
                frames.append(f.to_ndarray(format="yuv420p"))
                if len(frames) == b:
                    break
        dev = torch.device(self.plan.device)
        host = torch.from_numpy(np.stack(frames))
        if dev.type == "cuda":
            host = host.pin_memory()
        dev_buf = torch.empty(host.shape, dtype=torch.uint8, device=dev)
        matrix, full = self._matrix()
        lb = GpuYuvLetterbox(card=self.card, max_batch=b, frame_hw=(fh, fw), layout=YuvLayout.I420, matrix=matrix,
                             full_range=full, device=dev)
        cfg = PostprocessConfig()
        nc = self.card.head.num_classes

        def full_step() -> None:
            dev_buf.copy_(host, non_blocking=True)
            x, lbs = lb(dev_buf)
            postprocess_detect_torch(self.engine.infer_device(x)[0], lbs, num_classes=nc, cfg=cfg)

        x0, _ = lb(dev_buf.copy_(host))
        x0 = x0.clone()
        share = max(0.3, (budget - 25.0) / 3 if dev.type == "cuda" else budget / 6)
        eng = self._fps(lambda: self.engine.infer_device(x0), b, share)
        pipe = self._fps(full_step, b, share)
        out: dict[str, Any] = {"batch": b, "engine_only_fps": round(eng, 1), "no_decode_fps": round(pipe, 1),
                               "no_decode_vs_engine": round(pipe / eng, 3), "matrix": matrix.value,
                               "full_range": full}
        self.say(f"batch {b}: engine-only {eng:.1f} fps, upload+convert+letterbox+engine+NMS {pipe:.1f} fps "
                 f"({pipe / eng:.2f}x)")
        left = end - time.monotonic()
        if left > 8.0 or dev.type == "cpu":
            n = max(1, min(self.plan.max_streams, 2 * self.plan.workers))
            h = self._harness()
            t = h.trial(n, seconds=max(1.0, min(self.plan.trial_s, left - 6.0)), paced=False, mode=DecodeMode.SOFTWARE)
            out["with_decode"] = t
            out["with_decode_vs_engine"] = round(t["fps"] / eng, 3)
            self.say(f"unpaced {n} streams with decode: {t['fps']} fps ({t['fps'] / eng:.2f}x engine-only)")
        return out

    def _harness(self) -> Any:
        from gpu_check_streams import StreamHarness, StreamsConfig

        if getattr(self, "_h", None) is None:
            cfg = StreamsConfig(clip=self.clip["path"], frame_hw=(self.plan.clip_wh[1], self.plan.clip_wh[0]),
                                fps=self.plan.fps, clip_seconds=self.plan.clip_seconds, device=self.plan.device,
                                workers=self.plan.workers, max_streams=self.plan.max_streams,
                                max_batch=max(self.plan.batches))
            t = time.monotonic()
            self._h = StreamHarness(cfg, engine=self.engine, card=self.card, matrix=self._matrix()[0])
            self.say(f"{cfg.workers} decoder processes ready in {time.monotonic() - t:.1f} s")
        return self._h

    def streams_phase(self, budget: float, end: float) -> dict[str, Any]:
        """The largest N at real-time pace, software decode, then NVDEC."""
        from gpu_check_streams import DecodeMode

        h = self._harness()
        out: dict[str, Any] = {"criteria": "p99 <= 100 ms, latency growth <= 25 ms, >= 95% of frames",
                               "trial_s": self.plan.trial_s, "trials": []}
        per_trial = self.plan.trial_s + 2.5
        modes = [DecodeMode.SOFTWARE] + ([DecodeMode.NVDEC] if self.plan.device == "cuda" else [])
        for mode in modes:
            ok_n, bad_n = 0, None
            todo = list(self.plan.stream_counts) if mode is DecodeMode.SOFTWARE else []
            if mode is DecodeMode.NVDEC:
                base = out.get("max_streams_software") or 64
                todo = [base, int(base * 1.5)]
            tried: set[int] = set()
            while todo:
                n = todo.pop(0)
                if n in tried or (bad_n is not None and n >= bad_n) or n <= ok_n or n > self.plan.max_streams:
                    continue
                if end - time.monotonic() < per_trial * (2 if mode is DecodeMode.SOFTWARE and len(modes) > 1 else 1):
                    self.say(f"streams: no time left for {n} ({mode.value})")
                    break
                tried.add(n)
                t = h.trial(n, seconds=self.plan.trial_s, paced=True, mode=mode)
                out["trials"].append(t)
                self.save_partial("streams", out)
                self.say(f"streams {mode.value} N={n}: ok={t.get('ok')} p50={t.get('latency_p50_ms')} "
                         f"p99={t.get('latency_p99_ms')} growth={t.get('latency_growth_ms')} fps={t['fps']} "
                         f"batch={t['mean_batch']} decode_cpu={t['decode_cpu_ms_per_frame']} ms {t['errors'] or ''}")
                if t.get("ok"):
                    ok_n = max(ok_n, n)
                else:
                    bad_n = n if bad_n is None else min(bad_n, n)
                if bad_n is not None and ok_n and bad_n - ok_n > max(4, ok_n // 8) and not todo:
                    todo.append((ok_n + bad_n) // 2)
                if mode is DecodeMode.NVDEC and t["errors"]:
                    break
            out[f"max_streams_{mode.value}"] = ok_n
        return out

    def save_partial(self, phase: str, rec: dict[str, Any]) -> None:
        """Save a phase's figures so far (a timeout keeps them)."""
        self.results["phases"][phase] = {**rec, "status": "running"}
        self.save()

    def pytest_phase(self, budget: float, end: float) -> dict[str, Any]:
        """``pytest -m gpu`` over the files that hold gpu tests (skipped in the dry run)."""
        cmd = pytest_command()
        if self.plan.device == "cpu":
            self.say(f"pytest: skipped in the dry run ({' '.join(cmd[1:])})")
            return {"mode": "skipped (dry run)", "command": cmd[1:]}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, budget - 2.0), env=env)
            text, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = -9
        (self.out / "pytest.log").write_text(text)
        summary = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
        self.say(f"pytest: rc={rc} {summary[0]}")
        if rc not in (0, 5):
            raise RuntimeError(f"pytest -m gpu exited {rc}: {summary[0]} (pytest.log)")
        return {"mode": "run", "rc": rc, "summary": summary[0], "command": cmd[1:]}

    def close(self) -> None:
        """Stop the harness and the engine."""
        h = getattr(self, "_h", None)
        if h is not None:
            h.close()
        if self.engine is not None:
            self.engine.stop()


def pytest_command() -> list[str]:
    """``python -m pytest -m gpu ...`` over the test files that hold ``gpu``-marked tests.

    Only those files are collected: the others import packages the GPU machine lacks (ray, selenium).
    """
    files = sorted({str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                    if "mark.gpu" in p.read_text(errors="replace")})
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", *files]


def default_out(dry_run: bool) -> Path:
    """``bench/results/<timestamp>-<device>``."""
    name = "cpu-dry-run"
    if not dry_run:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name).strip("-")
    return ROOT / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every phase ran, 1 otherwise (or on bad input)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<time>-<device>)")
    ap.add_argument("--dry-run", action="store_true", help="CPU paths, tiny sizes (CI)")
    ap.add_argument("--model", type=Path, default=ROOT / "engines" / "models" / "detector.onnx")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default 500; dry run 60)")
    args = ap.parse_args(argv)
    if not args.model.is_file() or not args.model.with_suffix(".json").is_file():
        print(f"error: {args.model}: model or its card {args.model.with_suffix('.json').name} not found",
              file=sys.stderr)
        return 1
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here (torch.cuda.is_available() is False); --dry-run runs the check on the CPU",
                  file=sys.stderr)
            return 1
    out = args.out or default_out(args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args.dry_run)
    check = Check(out, plan, args.model, args.budget_s or (60.0 if args.dry_run else 500.0))
    check.say(f"gpu_check {'dry run (CPU)' if args.dry_run else 'on ' + plan.device} -> {out}")
    try:
        check.run("setup", check.setup)
        if check.results["phases"]["setup"]["status"] == "ok":
            check.run("engine", check.engine_phase)
            check.run("decode", check.decode_phase)
            if check.engine is not None:
                check.run("pipeline_vs_engine", check.pipeline_phase)
                check.run("streams", check.streams_phase)
        check.run("pytest", check.pytest_phase)
    finally:
        check.close()
        check.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        check.save()
    check.say(f"done: {out / 'results.json'}, {out / 'results.md'}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
