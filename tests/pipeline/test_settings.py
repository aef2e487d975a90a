from pathlib import Path

import pytest
import yaml

from engines.base import Backend
from pipeline.settings import (
    CONFIG_ENV,
    DEFAULT_MODEL,
    DEFAULT_PUBLISH,
    DEFAULT_SOURCE,
    Settings,
    SettingsError,
    describe_settings,
    load_settings,
    set_dotted,
)
from streamdet.postprocess import NmsMethod, PostprocessConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("STREAMDET_"):
            monkeypatch.delenv(k)


def test_defaults():
    s = load_settings()
    assert s.sources == [str(DEFAULT_SOURCE)]
    assert s.model == DEFAULT_MODEL
    assert s.sinks.publish == DEFAULT_PUBLISH
    assert s.engine.backend is Backend.ONNXRUNTIME
    assert s.postprocess.to_config() == PostprocessConfig()


def test_default_yaml_spells_out_the_defaults():
    from_yaml = load_settings(config_file=CONFIGS / "default.yaml")
    assert from_yaml.model_dump() == Settings().model_dump()


def test_default_yaml_names_every_setting():
    text = (CONFIGS / "default.yaml").read_text()
    spelled = set(_leaves(yaml.safe_load(text)))
    commented = {"sources", "model", "secondary"}  # their defaults are not YAML values: shown as comments
    assert all(f"# {name}:" in text for name in commented)
    assert {name for name, _, _ in describe_settings()} - commented == spelled


def _leaves(tree, prefix=""):
    """``{dotted.path: value}`` of a nested mapping (lists are leaves)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, f"{path}."))
        else:
            out[path] = value
    return out


def _matches(given, loaded):
    """Whether every key the preset spells out came through with its value (list items by position)."""
    if isinstance(given, dict):
        return isinstance(loaded, dict) and all(k in loaded and _matches(v, loaded[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(loaded, list) and len(given) == len(loaded) and all(map(_matches, given, loaded))
    return given == loaded


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    """Each key a preset sets is loaded with the preset's value; every other setting keeps its default."""
    given = yaml.safe_load(path.read_text())
    assert isinstance(given, dict) and given
    loaded = load_settings(config_file=path).model_dump(mode="json")
    for key, value in _leaves(given).items():
        got = _leaves(loaded)[key]
        assert _matches(value, got), f"{path.name}: {key} = {value!r} loaded as {got!r}"
    defaults = _leaves(Settings().model_dump(mode="json"))
    unset = {k: v for k, v in _leaves(loaded).items() if k not in _leaves(given)}
    assert unset == {k: defaults[k] for k in unset}


def test_precedence_cli_over_env_over_yaml_over_default(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"engine": {"intra_op_threads": 3}, "preprocess": {"max_batch": 2, "max_wait_ms": 7},
                                   "postprocess": {"score_threshold": 0.5}}))
    monkeypatch.setenv("STREAMDET_PREPROCESS__MAX_BATCH", "6")
    monkeypatch.setenv("STREAMDET_POSTPROCESS__SCORE_THRESHOLD", "0.6")
    s = load_settings(config_file=cfg, overrides={"postprocess": {"score_threshold": 0.7}})
    assert s.postprocess.score_threshold == 0.7  # CLI > env > YAML
    assert s.preprocess.max_batch == 6  # env > YAML
    assert s.preprocess.max_wait_ms == 7  # YAML > default
    assert s.engine.intra_op_threads == 3
    assert s.preprocess.tensor_slots == Settings().preprocess.tensor_slots  # default kept beside YAML values
    assert s.postprocess.iou_threshold == 0.45


def test_config_from_env(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("postprocess:\n  nms: soft_gaussian\n")
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    assert load_settings().postprocess.nms is NmsMethod.SOFT_GAUSSIAN


def test_env_list_and_nested(monkeypatch):
    monkeypatch.setenv("STREAMDET_SOURCES", '["a.mp4", "rtsp://cam/x"]')
    monkeypatch.setenv("STREAMDET_SINKS__PUBLISH", "none")
    s = load_settings()
    assert s.sources == ["a.mp4", "rtsp://cam/x"]
    assert s.sinks.publish is None


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"engine": {"intra_op_threads": -1}}, r"engine\.intra_op_threads"),
        ({"engine": {"backend": "openvino"}}, r"engine\.backend"),
        ({"postprocess": {"iou_threshold": 1.5}}, r"postprocess\.iou_threshold"),
        ({"postprocess": {"nms": "fast"}}, r"postprocess\.nms"),
        ({"max_frames": 0}, "max_frames"),
        ({"decode": {"slots": 1}}, r"decode\.slots"),
        ({"sinks": {"publish": "http://x:1"}}, r"sinks\.publish"),
        ({"sinks": {"publish": "tcp://127.0.0.1:70000"}}, r"sinks\.publish"),
        ({"sources": []}, "sources"),
        ({"sources": [""]}, "sources"),
        ({"nope": 1}, "unknown setting 'nope'"),
        ({"engine": {"nope": 1}}, r"unknown setting 'engine\.nope'"),
    ],
)
def test_invalid_settings_one_line(overrides, match):
    with pytest.raises(SettingsError, match=match) as e:
        load_settings(overrides=overrides)
    assert "\n" not in str(e.value)


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv("STREAMDET_ENGINE__INTRA_OP_THREADS", "many")
    with pytest.raises(SettingsError, match=r"engine\.intra_op_threads"):
        load_settings()


@pytest.mark.parametrize("text,match", [("engine: [1, 2", "not a readable YAML"), ("- 1\n- 2\n", "mapping"),
                                        ("engine:\n  bogus: 1\n", "unknown setting")])
def test_bad_yaml(tmp_path, text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SettingsError, match=match):
        load_settings(config_file=cfg)


def test_missing_yaml(tmp_path):
    with pytest.raises(SettingsError, match="config file not found") as e:
        load_settings(config_file=tmp_path / "none.yaml")
    assert "current directory" not in str(e.value)  # absolute: nothing to explain


def test_missing_relative_yaml_names_the_directory_it_was_looked_for_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as e:
        load_settings(config_file="configs/none.yaml")
    assert str(e.value) == (f"configs/none.yaml: config file not found (a relative path is taken from the "
                            f"current directory, {tmp_path})")


def test_settings_are_frozen():
    s = load_settings()
    with pytest.raises(Exception):  # noqa: B017 (pydantic's ValidationError)
        s.engine.intra_op_threads = 2  # type: ignore[misc]


def test_multi_label_reaches_the_postprocess_config(monkeypatch):
    monkeypatch.setenv("STREAMDET_POSTPROCESS__MULTI_LABEL", "true")
    assert load_settings().postprocess.to_config().multi_label is True


def test_set_dotted():
    tree: dict = {}
    set_dotted(tree, "a.b.c", 1)
    set_dotted(tree, "a.d", 2)
    assert tree == {"a": {"b": {"c": 1}, "d": 2}}
    with pytest.raises(SettingsError):
        set_dotted(tree, "a..b", 1)
    with pytest.raises(SettingsError, match="conflicts"):
        set_dotted(tree, "a.d.e", 1)


def test_describe_settings_covers_every_leaf():
    names = {n for n, _, _ in describe_settings()}
    assert {"sources", "engine.intra_op_threads", "sinks.publish_wait_subscribers", "postprocess.nms"} <= names
    env = dict((n, e) for n, _, e in describe_settings())
    assert env["engine.intra_op_threads"] == "STREAMDET_ENGINE__INTRA_OP_THREADS"


@pytest.mark.parametrize("overrides,message", [
    # a source given as a mapping: its own field's problem, not the string branch's "Input should be a valid string"
    ({"sources": [{"id": "cam1", "url": "a.mp4", "max_fps": 0}]},
     "invalid setting sources.0.max_fps: Input should be greater than 0 (got 0)"),
    ({"sources": [{"url": "a.mp4", "fps": 5}]}, "unknown setting 'sources.0.fps'"),
    ({"sources": [{"id": "cam1"}]}, "invalid setting sources.0.url: Field required"),
    ({"sources": ["a.mp4", 5]},
     "invalid setting sources.1: Input should be a valid dictionary or instance of SourceEntry (got 5)"),
    # secrets are never shown, credentials in URLs are redacted
    ({"control": {"token": 123456}}, "invalid setting control.token: Input should be a valid string (the value "
     "is not shown; quote one that YAML reads as a number: --set 'control.token=\"123\"')"),
    ({"sinks": {"mqtt_password": 987654}}, "invalid setting sinks.mqtt_password: Input should be a valid string "
     "(the value is not shown; quote one that YAML reads as a number: --set 'sinks.mqtt_password=\"123\"')"),
    ({"sources": "rtsp://admin:hunter2@cam1/stream"},
     "invalid setting sources: Input should be a valid list (got 'rtsp://***@cam1/stream')"),
    # waiting for subscribers of nothing (it was accepted, and the run waited for nobody)
    ({"sinks": {"publish": "none", "publish_wait_subscribers": 1}},
     "invalid setting sinks: publish_wait_subscribers=1 needs a publish endpoint, and sinks.publish is none"),
])
def test_invalid_settings_say_what_is_wrong_and_keep_secrets(overrides, message):
    with pytest.raises(SettingsError) as e:
        load_settings(overrides=overrides)
    assert str(e.value) == message


@pytest.mark.parametrize("name,value,field", [
    ("STREAMDET_SOURCES", "a.mp4", "sources"),  # a list wants JSON
    ("STREAMDET_SOURCES", '["a.mp4"', "sources"),
    ("STREAMDET_DECODE", "abc", "decode"),  # a section wants JSON (or STREAMDET_DECODE__FIELD)
    ("STREAMDET_SECONDARY", "abc", "secondary"),
])
def test_an_env_variable_that_is_not_json_is_one_line(monkeypatch, name, value, field):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert str(e.value).startswith(f"invalid setting {field} (${name}): expected JSON, e.g. ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,meant", [
    ("STREAMDET_SCORE_THRESHOLD", "STREAMDET_POSTPROCESS__SCORE_THRESHOLD"),  # the section left out
    ("STREAMDET_LOOP", "STREAMDET_DECODE__LOOP"),
    ("STREAMDET_SOURCE", "STREAMDET_SOURCES"),  # misspelt
    ("STREAMDET_DECOD__LOOP", "STREAMDET_DECODE__LOOP"),  # a misspelt section (its field is checked once it exists)
    ("streamdet_max_frame", "STREAMDET_MAX_FRAMES"),  # (the names are not case-sensitive)
    ("STREAMDET_FOO", None),
])
def test_an_env_variable_that_names_no_setting_is_refused(monkeypatch, name, meant):
    monkeypatch.setenv(name, "0.9")  # pydantic-settings ignored it: the run went on without the setting
    with pytest.raises(SettingsError) as e:
        load_settings()
    hint = f"did you mean {meant}?" if meant else "see STREAMDET_<SECTION>__<FIELD> in --help"
    assert str(e.value) == f"{name}: not a setting (an environment variable with the STREAMDET_ prefix; {hint})"


@pytest.mark.parametrize("name", ["STREAMDET_CONFIG", "STREAMDET_CONTROL_URL", "STREAMDET_DEBUG", "STREAMDET_TEST_X"])
def test_the_tools_own_env_variables_are_not_settings_and_not_refused(monkeypatch, tmp_path, name):
    value = str(tmp_path / "preset.yaml") if name == "STREAMDET_CONFIG" else "1"
    (tmp_path / "preset.yaml").write_text("quiet: true\n")
    monkeypatch.setenv(name, value)
    load_settings()


@pytest.mark.parametrize("value", ["", "none", "off", "null", " None "])
def test_jsonl_off_values_mean_no_jsonl(value):
    assert load_settings(overrides={"sinks": {"jsonl": value}}).sinks.jsonl is None  # not a file named "none"


def test_a_config_path_that_is_a_directory_or_empty(tmp_path):
    with pytest.raises(SettingsError) as e:
        load_settings(config_file=tmp_path)
    assert str(e.value) == f"{tmp_path}: the config file is a directory"
    with pytest.raises(SettingsError) as e:
        load_settings(config_file="")
    assert str(e.value) == "config file: expected a path, got an empty one"


@pytest.mark.parametrize("address,ok", [
    ("127.0.0.1:6379", True), ("ray://head:10001", True), ("auto", True), ("[::1]:6379", True),
    ("127.0.0.1:99999", False), ("127.0.0.1:0", False), ("127.0.0.1", False), ("head:", False),
])
def test_ray_address_port_is_checked_at_startup(address, ok):
    """A port out of range was accepted and failed later as an unreachable cluster (exit 1, not 2)."""
    if ok:
        assert load_settings(overrides={"cluster": {"ray_address": address}}).cluster.ray_address == address
        return
    with pytest.raises(SettingsError) as e:
        load_settings(overrides={"cluster": {"ray_address": address}})
    assert "expected HOST:PORT of the Ray head (port 1..65535) or 'auto'" in str(e.value)
    assert "\n" not in str(e.value)
