"""Plain-dict round trips of the model configs (detector and semantic) for checkpoints and model cards."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any


def plain_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict, tuples as lists (JSON- and ``weights_only``-safe).

    Args:
        config: a dataclass instance.

    Returns:
        Field name -> value.
    """
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def check_known_keys(d: Mapping[str, Any], known: Iterable[str], label: str) -> None:
    """Reject keys a config does not have.

    Args:
        d: the dict read back.
        known: the config's field names.
        label: what the message calls the keys, e.g. ``"DetectorConfig"``.

    Raises:
        ValueError: ``expected LABEL keys [...], got unknown [...]``.
    """
    known = set(known)
    extra = set(d) - known
    if extra:
        raise ValueError(f"expected {label} keys {sorted(known)}, got unknown {sorted(extra)}")


class PlainConfig:
    """Mixin of the config dataclasses: :meth:`to_dict` for checkpoints and model cards."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples) for checkpoints and model cards."""
        return plain_dict(self)
