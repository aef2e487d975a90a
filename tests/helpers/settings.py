"""Settings for end-to-end tests: a base tree plus ``section__key=value`` overrides."""

from typing import Any

from pipeline.settings import Settings, load_settings


def settings_with(tree: dict[str, Any], **over: Any) -> Settings:
    """``load_settings`` of ``tree`` with each ``a__b=value`` set at ``tree["a"]["b"]``."""
    for key, value in over.items():
        node = tree
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return load_settings(overrides=tree)
