"""The GPU check's Markdown report and goal verdicts (from its results dictionary)."""

from __future__ import annotations

from typing import Any

GOAL_STREAMS = 64
"""Streams of 1080p30 the GPU path should carry with p99 <= 100 ms."""
GOAL_PIPELINE_VS_ENGINE = 0.9
"""Pipeline fps over engine-only fps at batch 32 the GPU path should reach."""


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Each goal's figure and whether it is met (None: not measured)."""
    ph = results.get("phases", {})
    st, pv = ph.get("streams", {}), ph.get("pipeline_vs_engine", {})
    n = max(st.get("max_streams_software") or 0, st.get("max_streams_nvdec") or 0) if st else None
    ratio = pv.get("no_decode_vs_engine")
    return {"streams_1080p30": {"goal": f">= {GOAL_STREAMS}", "value": n,
                                "met": None if n is None or results.get("dry_run") else n >= GOAL_STREAMS},
            "pipeline_vs_engine_b32": {"goal": f">= {GOAL_PIPELINE_VS_ENGINE}", "value": ratio,
                                       "met": None if ratio is None or results.get("dry_run")
                                       else ratio >= GOAL_PIPELINE_VS_ENGINE}}


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def render_markdown(results: dict[str, Any]) -> str:
    """The report: environment, phases with budgets and times, the figures of each phase, the goals."""
    results["goals"] = goals(results)
    ph = results.get("phases", {})
    lines = [f"# GPU check {'(CPU dry run: the figures say nothing about a GPU)' if results.get('dry_run') else ''}",
             "", f"started {results.get('started')}, elapsed {results.get('elapsed_s')} s, model "
             f"`{results.get('model')}`", ""]
    env = results.get("environment", {})
    if env:
        lines += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += ["## Phases", "", _row(["phase", "status", "seconds", "budget s"]), _row(["---"] * 4)]
    lines += [_row([k, v.get("status"), v.get("elapsed_s"), v.get("budget_s")]) for k, v in ph.items()]
    lines += ["", "## Goals", "", _row(["goal", "target", "value", "met"]), _row(["---"] * 4)]
    lines += [_row([k, g["goal"], g["value"], g["met"]]) for k, g in results["goals"].items()]
    eng = ph.get("engine", {})
    if eng.get("status") in ("ok", "running"):
        lines += ["", "## Engine only (CUDA backend, fps)", ""]
        keys = sorted({k for v in eng.values() if isinstance(v, dict) for k in v if k.endswith("_fps")},
                      key=lambda k: int(k[1:].split("_")[0]))
        lines += [_row(["precision", *keys]), _row(["---"] * (len(keys) + 1))]
        lines += [_row([p, *[eng[p].get(k) for k in keys]]) for p in ("fp32", "fp16") if p in eng]
    dec = ph.get("decode", {})
    if dec.get("status") == "ok":
        lines += ["", "## Decode (one stream, one thread)", "", _row(["way", "fps", "CPU ms/frame", "error"]),
                  _row(["---"] * 4)]
        lines += [_row([k, v.get("fps"), v.get("cpu_ms_per_frame"), v.get("error")]) for k, v in dec.items()
                  if isinstance(v, dict) and ("fps" in v or "error" in v)]
    pv = ph.get("pipeline_vs_engine", {})
    if pv.get("status") == "ok":
        wd = pv.get("with_decode", {})
        lines += ["", f"## Pipeline vs engine only (batch {pv.get('batch')})", "",
                  f"engine only {pv.get('engine_only_fps')} fps; host YUV -> device -> RGB letterbox -> engine -> "
                  f"NMS -> host {pv.get('no_decode_fps')} fps (**{pv.get('no_decode_vs_engine')}x**); with decoding "
                  f"({wd.get('streams')} unpaced streams) {wd.get('fps')} fps ({pv.get('with_decode_vs_engine')}x)."]
    st = ph.get("streams", {})
    if st.get("trials"):
        cols = ["decode", "streams", "ok", "fps", "latency_p50_ms", "latency_p99_ms", "worst_stream_p99_ms",
                "latency_growth_ms", "mean_batch", "decode_cpu_ms_per_frame", "frames", "frames_scheduled"]
        lines += ["", f"## Streams at real-time pace ({st.get('criteria')})", "", _row(cols),
                  _row(["---"] * len(cols))]
        lines += [_row([t.get(c) for c in cols]) for t in st["trials"]]
        lines += ["", f"largest N: software decode {st.get('max_streams_software')}, "
                  f"NVDEC {st.get('max_streams_nvdec')}"]
    py = ph.get("pytest", {})
    if py:
        lines += ["", f"## pytest -m gpu ({py.get('mode')})", "", f"rc {py.get('rc')}: {py.get('summary')}"]
    failed = {k: v.get("error") for k, v in ph.items() if v.get("status") == "failed"}
    if failed:
        lines += ["", "## Failures", ""] + [f"* {k}: {e}" for k, e in failed.items()]
    return "\n".join(lines) + "\n"
