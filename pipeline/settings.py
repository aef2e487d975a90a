"""All pipeline settings: ONE pydantic-settings tree.

Sources of values, highest precedence first:

1. command-line flags (``run_pipeline.py --model ...``, ``--set engine.intra_op_threads=1``);
2. environment variables: prefix ``STREAMDET_``, nested fields joined by ``__``, e.g.
   ``STREAMDET_ENGINE__INTRA_OP_THREADS=1``, ``STREAMDET_SOURCES='["a.mp4", "b.mp4"]'``;
3. a YAML preset (``--config configs/X.yaml`` or ``STREAMDET_CONFIG=configs/X.yaml``);
4. the defaults below (``configs/default.yaml`` spells them out).

Invalid values raise :class:`SettingsError` with one line naming the setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError as PydanticSettingsError

from engines.base import Backend
from pipeline.settings_sections import DEFAULT_PUBLISH as DEFAULT_PUBLISH  # re-exported
from pipeline.settings_sections import (
    ClusterSettings,
    ControlSettings,
    SecondarySettings,
    Section,
    SinkSettings,
    SuperviseSettings,
)
from pipeline.sources.options import (
    DecodePlacement,
    DecodeThreads,
    HWAccelMode,
    HWAccelOptions,
    LiveOptions,
    RtspTransport,
)
from pipeline.transport import TransportMode, redact_url
from streamdet.cli import relative_path_note
from streamdet.postprocess import NmsMethod, PostprocessConfig

ENV_PREFIX = "STREAMDET_"
ENV_NESTED_DELIMITER = "__"
CONFIG_ENV = "STREAMDET_CONFIG"
"""Environment variable naming a YAML preset (the ``--config`` flag wins over it)."""

OTHER_ENV = frozenset({CONFIG_ENV, "STREAMDET_CONTROL_URL", "STREAMDET_DEBUG", "STREAMDET_ULTRALYTICS_PYTHON",
                       "STREAMDET_QUANT_MODEL", "STREAMDET_UPDATE_SCREENSHOT"})
"""``STREAMDET_*`` variables that are not settings: the preset, ``streamdet ctl``'s URL, the stages'
debug switch, the benchmarks' and tests' own (and any ``STREAMDET_TEST_*``)."""

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_ROOT / "engines" / "models" / "detector.onnx"
"""The bundled detector."""
DEFAULT_SOURCE = Path(__file__).resolve().parent / "samples" / "demo.mp4"
"""The bundled demo video."""

DEFAULT_LIGHT_STAGE_NICE = 10
"""Default niceness of the decode, preprocess and postprocess processes."""


class SettingsError(ValueError):
    """Invalid settings (bad value, unknown key, unreadable preset); the message is one line."""


class TransportSettings(Section):
    """How stages talk.

    Attributes:
        mode: ``ipc`` (unix sockets in a private temp dir, frames in shared memory) or ``tcp``
            (frames and tensors inline in the messages).
        tcp_host: interface the stage sockets bind in ``tcp`` mode.
        tcp_base_port: first of the consecutive ports used in ``tcp`` mode (6 + number of sources,
            + 3 per model after the first).
    """

    mode: TransportMode = TransportMode.IPC
    tcp_host: str = "127.0.0.1"
    tcp_base_port: int = Field(default=5570, ge=1, le=65000)


class SourceEntry(Section):
    """A source with an id and options (YAML ``sources: [{id: cam1, url: rtsp://..., max_fps: 10}]``).

    Attributes:
        url: file path or URL.
        id: source id (topic-safe ``[A-Za-z0-9_-]{1,64}``); default: derived from the URL.
        max_fps: live sources: pass at most this many frames per second (the rest are skipped).
        model: ONNX model for this source (default: the global ``model``); sources sharing a model
            share its preprocess / engine chain.
        card: that model's card (default: ``MODEL.json`` beside it, else its ONNX metadata; the
            global ``card`` applies only to sources using the global model).
    """

    url: str = Field(min_length=1)
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    max_fps: float | None = Field(default=None, gt=0.0)
    model: Path | None = None
    card: Path | None = None


class DecodeSettings(Section):
    """Decoder.

    Attributes:
        slots: frames in each file source's shared-memory slot pool (bounds memory; >= 2).
        live_slots: frames in flight per live (URL) source: few, so that latency stays bounded
            (the decoder keeps only the newest frame while they are all in use).
        threads: FFmpeg decoder threading.
        hwaccel: ``none`` (software decode on the CPU) or ``cuda`` (NVDEC on an NVIDIA GPU, through
            FFmpeg's hwaccel in PyAV; each decoded frame is downloaded to host memory once and the
            rest of the pipeline is unchanged, see docs/gpu.md). Checked at start-up for every
            source: if it cannot be used the run fails with one line naming the source.
        hwaccel_device: GPU index of the hardware decoder.
        hwaccel_fallback: if the hardware decoder cannot be used for a source, decode that source in
            software with a warning, instead of failing.
        loop: read each file source this many times in a row (soak tests, memory checks).
        nice: niceness of the stage's process (0..19; higher yields the CPU to the engine).
        placement: ``separate`` (each source decoded in its own process), ``with_preprocess``
            (in threads of its model chain's preprocess process: one process and one ZeroMQ hop
            fewer per frame, for machines with few cores; not with ``control.port``) or ``auto``, the
            default (``with_preprocess`` on machines with at most 2 cores and without
            ``control.port``, else ``separate``). See docs/pipeline.md.
        rtsp_transport: ``tcp`` (default) or ``udp`` for ``rtsp://`` sources.
        open_timeout_s: live sources: longest wait to connect.
        read_timeout_s: live sources: longest wait for data once connected (FFmpeg read timeout).
        stall_timeout_s: live sources: no frame for this long counts as a lost stream (reconnect).
        reconnect_initial_s: first reconnection delay (doubles each attempt, with +-25 % jitter).
        reconnect_max_s: longest reconnection delay.
        reconnect_max_attempts: give a live source up after this many failed attempts in a row
            (null: retry forever).
    """

    slots: int = Field(default=12, ge=2, le=1024)
    live_slots: int = Field(default=4, ge=2, le=1024)
    threads: DecodeThreads = DecodeThreads.AUTO
    hwaccel: HWAccelMode = HWAccelMode.NONE
    hwaccel_device: int = Field(default=0, ge=0, le=63)
    hwaccel_fallback: bool = False
    loop: int = Field(default=1, ge=1)
    nice: int = Field(default=DEFAULT_LIGHT_STAGE_NICE, ge=0, le=19)
    placement: DecodePlacement = DecodePlacement.AUTO
    rtsp_transport: RtspTransport = RtspTransport.TCP
    open_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    read_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    stall_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    reconnect_initial_s: float = Field(default=0.5, gt=0.0, le=600.0)
    reconnect_max_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    reconnect_max_attempts: int | None = Field(default=None, ge=1)

    def live_options(self) -> LiveOptions:
        """The live-source options of the decode stage."""
        return LiveOptions(rtsp_transport=self.rtsp_transport, open_timeout_s=self.open_timeout_s,
                           read_timeout_s=self.read_timeout_s, stall_timeout_s=self.stall_timeout_s,
                           reconnect_initial_s=self.reconnect_initial_s, reconnect_max_s=self.reconnect_max_s,
                           reconnect_max_attempts=self.reconnect_max_attempts)

    def hwaccel_options(self) -> HWAccelOptions:
        """The hardware-decoding options of the decode stage."""
        return HWAccelOptions(mode=self.hwaccel, device=self.hwaccel_device, fallback=self.hwaccel_fallback)


DEFAULT_MAX_BATCH = 4
"""Frames per engine batch when ``preprocess.max_batch`` is auto and the engine runs one batch at a time."""


class PreprocessSettings(Section):
    """Letterbox and batching.

    Attributes:
        max_batch: frames per engine batch (a model with a static batch size overrides it; 0 =
            auto: 1 when the engine runs concurrent batches on the CPU, where one frame per run
            measured faster and leaner, else :data:`DEFAULT_MAX_BATCH`).
        max_wait_ms: send a partial batch this long after its first frame.
        tensor_slots: input tensors in flight between preprocess and engine (>= 2).
        on_device: with the engine on a CUDA device (``--backend cuda`` or ``tensorrt``), copy each
            frame to the GPU once and letterbox, normalise and batch it there, in GPU tensors the
            engine reads without a host copy (detect models also get their NMS on the GPU); off:
            preprocess on the CPU as with ``--device cpu``. No effect on the CPU.
        nice: niceness of the stage's process (0..19; higher yields the CPU to the engine).
        rect: when the model's input height and width are dynamic (an ultralytics export with
            ``dynamic=True``), letterbox each frame into the smallest rectangle that holds it with
            each side a multiple of the model's stride (640x288 for a 640x272 frame, instead of
            640x640), as ultralytics' predictor does; off: always the card's full input size.
    """

    max_batch: int = Field(default=0, ge=0, le=256)
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=60_000.0)
    tensor_slots: int = Field(default=3, ge=2, le=64)
    on_device: bool = True
    nice: int = Field(default=DEFAULT_LIGHT_STAGE_NICE, ge=0, le=19)
    rect: bool = True


class EngineSettings(Section):
    """Inference engine.

    Attributes:
        backend: ``onnxruntime`` (CPU, always available), ``tensorrt`` or ``cuda`` (NVIDIA GPUs).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        intra_op_threads: CPU threads per operator (ONNX Runtime; 0 = the cores divided among the
            concurrent batches, at least 1).
        concurrent_batches: batches the engine runs at once, each by its own instance of the model
            on its own thread, results still in order (ONNX Runtime on the CPU only; 0 = auto: 2
            there when the machine has at least 2 cores and ``intra_op_threads`` is 0, else 1).
            Two single-threaded runs keep 2 cores busier than one 2-threaded run
            (docs/pipeline.md); set 1 for the lowest latency per batch.
        allow_fallback: if the backend cannot run here, use the next available one (TensorRT, then
            CUDA, then ONNX Runtime) with a warning, instead of failing.
    """

    backend: Backend = Backend.ONNXRUNTIME
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda|cuda:\d+)$")
    intra_op_threads: int = Field(default=0, ge=0, le=1024)
    concurrent_batches: int = Field(default=0, ge=0, le=64)
    allow_fallback: bool = False


class PostprocessSettings(Section):
    """Decode, NMS and thresholds (see ``streamdet.postprocess.PostprocessConfig``).

    Attributes:
        score_threshold: keep detections scoring above this.
        iou_threshold: NMS IoU threshold.
        max_detections: most detections per frame.
        pre_nms_topk: most candidates per frame entering NMS.
        class_agnostic: NMS across classes (default: class-aware).
        multi_label: an anchor may yield one detection per class above the threshold (as mAP is
            measured; default: its best class only). Keeps the postprocess on the CPU.
        nms: ``hard``, ``soft_gaussian`` (Soft-NMS, Gaussian) or ``soft_linear``.
        soft_sigma: Gaussian Soft-NMS width.
        mask_threshold: instance-mask probability threshold.
        masks: publish instance masks (segment models) and class maps (semantic models); off:
            boxes only, and no mask work at all.
        nice: niceness of the stage's process (0..19; higher yields the CPU to the engine).
    """

    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.45, ge=0.0, le=1.0)
    max_detections: int = Field(default=300, ge=1)
    pre_nms_topk: int = Field(default=3000, ge=1)
    class_agnostic: bool = False
    multi_label: bool = False
    nms: NmsMethod = NmsMethod.HARD
    soft_sigma: float = Field(default=0.5, gt=0.0)
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    masks: bool = True
    nice: int = Field(default=DEFAULT_LIGHT_STAGE_NICE, ge=0, le=19)

    def to_config(self) -> PostprocessConfig:
        """The equivalent ``PostprocessConfig``."""
        return PostprocessConfig(
            score_threshold=self.score_threshold, iou_threshold=self.iou_threshold,
            max_detections=self.max_detections, pre_nms_topk=self.pre_nms_topk,
            class_agnostic=self.class_agnostic, multi_label=self.multi_label, nms_method=self.nms,
            soft_sigma=self.soft_sigma, mask_threshold=self.mask_threshold, masks=self.masks,
        )


def _default_sources() -> list[str | SourceEntry]:
    return [str(DEFAULT_SOURCE)]


class Settings(BaseSettings):
    """The whole configuration of a pipeline run.

    Attributes:
        sources: video files or URLs (anything FFmpeg opens), or :class:`SourceEntry` objects
            (``{id, url, max_fps}``); one decode process each.
        model: the ONNX model.
        card: its model card (default: ``MODEL.json`` beside it, else the ultralytics metadata).
        max_frames: stop each source after this many frames.
        quiet: no progress bar.
        transport: :class:`TransportSettings`.
        decode: :class:`DecodeSettings`.
        preprocess: :class:`PreprocessSettings`.
        engine: :class:`EngineSettings`.
        postprocess: :class:`PostprocessSettings`.
        sinks: :class:`SinkSettings`.
        supervise: :class:`SuperviseSettings`.
        cluster: :class:`ClusterSettings`.
        control: :class:`ControlSettings`.
        secondary: secondary models run on crops of the (global) model's detections, in order
            (:class:`SecondarySettings`; a cascade, docs/pipeline.md).
    """

    sources: list[str | SourceEntry] = Field(default_factory=_default_sources, min_length=1)
    model: Path = DEFAULT_MODEL
    card: Path | None = None
    max_frames: int | None = Field(default=None, ge=1)
    quiet: bool = False
    transport: TransportSettings = TransportSettings()
    decode: DecodeSettings = DecodeSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    engine: EngineSettings = EngineSettings()
    postprocess: PostprocessSettings = PostprocessSettings()
    sinks: SinkSettings = SinkSettings()
    supervise: SuperviseSettings = SuperviseSettings()
    cluster: ClusterSettings = ClusterSettings()
    control: ControlSettings = ControlSettings()
    secondary: tuple[SecondarySettings, ...] = ()

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      extra="forbid", frozen=True, nested_model_default_partial_update=True)

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str | SourceEntry]) -> list[str | SourceEntry]:
        for s in v:
            if isinstance(s, str) and (not s or not s.strip()):
                raise ValueError("expected non-empty source paths or URLs, got an empty one")
        ids = [s.id for s in v if isinstance(s, SourceEntry) and s.id]
        if len(set(ids)) != len(ids):
            raise ValueError(f"expected unique source ids, got {ids}")
        return v

    def source_entries(self) -> list[SourceEntry]:
        """Every source as a :class:`SourceEntry` (plain strings become ``{url}``)."""
        return [SourceEntry(url=s) if isinstance(s, str) else s for s in self.sources]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """CLI (init kwargs) > environment > YAML preset > defaults."""
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


SECRET_SETTINGS = frozenset({"token", "mqtt_password"})
"""Settings whose values an error line never shows (a mistyped token is still a token)."""


def _union_branch_errors(errors: list[Any]) -> list[Any]:
    """The errors worth showing: a union's ``str`` branch is left out where the value was meant for another.

    A source is a string or a mapping (``str | SourceEntry``): a mapping with one bad field failed
    both branches, and the first error (``Input should be a valid string``) said nothing of the field.
    """
    def other_branch(x: Any) -> bool:
        loc = tuple(x["loc"])
        return bool(loc) and loc[-1] == "str" and any(
            tuple(y["loc"])[:len(loc) - 1] == loc[:-1] and tuple(y["loc"]) != loc for y in errors)

    return [x for x in errors if not other_branch(x)] or errors


def _format_error(e: ValidationError) -> str:
    errors = _union_branch_errors(e.errors())
    first = errors[0]
    loc = ".".join(str(x) for x in first["loc"] if x != "SourceEntry") or "settings"
    msg = first["msg"]
    if first.get("type") == "extra_forbidden":
        return f"unknown setting {loc!r}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {redact_url(repr(value))})"
    if first["loc"] and first["loc"][-1] in SECRET_SETTINGS:
        shown = f" (the value is not shown; quote one that YAML reads as a number: --set '{loc}=\"123\"')"
    if first.get("type") == "value_error":
        msg, shown = msg.removeprefix("Value error, "), ""
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid setting {loc}: {msg}{shown}{more}"


def _env_error(e: PydanticSettingsError) -> str:
    """One line for a ``STREAMDET_*`` variable pydantic-settings could not parse (a list or a section wants JSON)."""
    m = re.search(r'field "(\w+)"', str(e))
    name = m[1] if m else "?"
    cause = f" ({' '.join(str(e.__cause__).split())})" if e.__cause__ is not None else ""
    return (f"invalid setting {name} (${ENV_PREFIX}{name.upper()}): expected JSON, e.g. "
            f"{ENV_PREFIX}SOURCES='[\"a.mp4\", \"b.mp4\"]' or {ENV_PREFIX}DECODE__LOOP=2 for one field{cause}")


def _check_env_names() -> None:
    """Refuse a ``STREAMDET_*`` variable that names no section or setting (pydantic-settings ignores those).

    A misspelt field inside a section is already refused (``unknown setting 'decode.threadz'``);
    a name missing its section (``STREAMDET_SCORE_THRESHOLD``) was silently ignored.

    Raises:
        SettingsError: naming the variable and the setting it most likely meant.
    """
    import difflib

    fields = set(Settings.model_fields)
    for var in sorted(os.environ):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in OTHER_ENV or upper.startswith(ENV_PREFIX + "TEST_"):
            continue
        if upper[len(ENV_PREFIX):].split(ENV_NESTED_DELIMITER)[0].lower() in fields:
            continue
        name = upper[len(ENV_PREFIX):]
        known = {env[len(ENV_PREFIX):]: env for _, _, env in describe_settings()}
        near = [known[k] for k in difflib.get_close_matches(name, list(known), n=1, cutoff=0.7)]
        near = near or [env for k, env in known.items() if k.endswith(ENV_NESTED_DELIMITER + name)][:1]
        hint = f"; did you mean {near[0]}?" if near else f"; see {ENV_PREFIX}<SECTION>__<FIELD> in --help"
        raise SettingsError(f"{var}: not a setting (an environment variable with the {ENV_PREFIX} prefix{hint})")


def load_settings(
    *, overrides: Mapping[str, Any] | None = None, config_file: str | os.PathLike[str] | None = None
) -> Settings:
    """Build the settings from flags, environment, a YAML preset and the defaults.

    Args:
        overrides: values from the command line, nested dicts (highest precedence).
        config_file: a YAML preset; default: ``$STREAMDET_CONFIG`` if set, else none.

    Returns:
        The validated, frozen :class:`Settings`.

    Raises:
        SettingsError: one line naming the bad setting, or the unreadable preset.
    """
    import yaml

    path = config_file if config_file is not None else os.environ.get(CONFIG_ENV) or None
    cls: type[Settings] = Settings
    if path is not None:
        if not str(path).strip():
            raise SettingsError("config file: expected a path, got an empty one")
        p = Path(path)
        if p.is_dir():
            raise SettingsError(f"{p}: the config file is a directory")
        if not p.is_file():
            raise SettingsError(f"{p}: config file not found{relative_path_note(p)}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            problem = " ".join(str(e).split())
            raise SettingsError(f"{p}: not a readable YAML config ({problem[:200]})") from e
        if data is not None and not isinstance(data, dict):
            raise SettingsError(f"{p}: expected a YAML mapping of settings, got {type(data).__name__}")

        class _WithYaml(Settings):
            model_config = SettingsConfigDict(yaml_file=str(p))

        cls = _WithYaml
    _check_env_names()
    try:
        return cls(**dict(overrides or {}))
    except ValidationError as e:
        where = f" (config {path})" if path is not None else ""
        raise SettingsError(_format_error(e) + where) from e
    except PydanticSettingsError as e:
        raise SettingsError(_env_error(e)) from e


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``key = "a.b"`` (creating nested dicts).

    Raises:
        SettingsError: if ``key`` is empty or has an empty part.
    """
    parts = key.split(".")
    if not all(parts):
        raise SettingsError(f"invalid setting name {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError(f"setting {key!r} conflicts with a value given for {part!r}")
        node = child
    node[parts[-1]] = value


def describe_settings() -> list[tuple[str, str, str]]:
    """Every setting as ``(dotted name, default, environment variable)`` for ``--help``."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, Path) and default.is_relative_to(PACKAGE_ROOT):
                default = default.relative_to(PACKAGE_ROOT)
            shown = getattr(default, "value", default)
            if isinstance(shown, list):
                shown = [str(Path(s).relative_to(PACKAGE_ROOT)) if Path(s).is_relative_to(PACKAGE_ROOT) else s
                         for s in shown]
            dotted = f"{prefix}{name}"
            rows.append((dotted, str(shown), ENV_PREFIX + dotted.upper().replace(".", ENV_NESTED_DELIMITER)))

    walk(Settings, "")
    return rows
