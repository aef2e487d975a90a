"""One msgpack codec for every frozen message dataclass, driven by its fields.

A class decorated with :func:`wire` gets a :class:`ClassCodec`, built once from
``dataclasses.fields`` and the resolved type hints: the values travel as a msgpack array in
field order, each through a converter picked by its type (see :func:`_converters`). A message
class (one that subclasses :class:`WireMessage` and is given a :class:`MsgKind`) is written as
``[WIRE_VERSION, kind, field, ...]``; a nested class (e.g. ``FrameRecord``) as ``[field, ...]``.

Converters per field type (encode / decode; "-" means the value passes unchanged):

* ``str``, ``int``, ``bytes``, an :class:`~enum.Enum` (``str``/``int`` mixin: msgpack writes its
  value; the class's ``__post_init__`` turns the value back into the member): - / -;
* ``float``: ``float`` / - (ints and numpy scalars are written as float64);
* ``bool``: ``bool`` / ``bool``;
* ``dict[...]``: ``dict`` / ``dict``;
* ``tuple[int, ...]`` and fixed ``tuple[int, int]``: - (msgpack writes a tuple as an array) / ``tuple``;
* a class decorated with :func:`wire`: its field array / the class from the array;
* ``tuple[C, ...]`` of such a class: a list of field arrays / a tuple of instances;
* :class:`~streamdet.letterbox.LetterboxParams`: ``to_list`` / ``from_list`` (8 flat ints).

Only the fields that need a converter pay for one: the others are read and handed to the
constructor as they are, by functions generated once per class (see :class:`ClassCodec`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from enum import Enum, IntEnum
from typing import Any, ClassVar, Self, TypeVar

import msgpack

from streamdet.letterbox import LetterboxParams

WIRE_VERSION = 4
"""Version of the internal msgpack wire format; bumped on any incompatible change."""


class MsgKind(IntEnum):
    """Tag of a message on the wire (second element of the msgpack array)."""

    FRAME = 1
    BATCH = 2
    RESULT = 3
    EOS = 4
    CREDIT = 5
    STATUS = 6
    SOURCE_STATUS = 7
    POOL_HANDLE = 8
    STAGE_RESTART = 9
    SOURCE_ADDED = 10
    PREVIEW_FRAME = 11
    STATS_SNAPSHOT = 12


Converter = Callable[[Any], Any]
"""Turns one field value into its wire form, or a wire value back into the field's argument."""

_Pair = tuple[Converter | None, Converter | None]

_FIXED: dict[Any, _Pair] = {
    str: (None, None),
    int: (None, None),
    bytes: (None, None),
    float: (float, None),
    bool: (bool, bool),
    LetterboxParams: (LetterboxParams.to_list, LetterboxParams.from_list),
}
"""Converters ``(encode, decode)`` of the leaf field types (``None``: the value passes unchanged)."""

_CODECS: dict[type, ClassCodec] = {}
_BY_KIND: dict[int, type[WireMessage]] = {}


class ClassCodec:
    """Field-array encoder and decoder of one :func:`wire` dataclass (built once per class).

    The two functions are generated from the fields (as ``dataclasses`` generates ``__init__``),
    so that they run as fast as hand-written ones: ``fields`` is ``[obj.a, float(obj.b), ...]``
    and ``from_fields`` is ``cls(v[0], v[1], tuple(v[2]), ...)`` after a length check; a field
    whose converter is "-" is read or passed with no call at all. ``source`` holds their code.

    Attributes:
        cls: the dataclass.
        names: its field names, in declaration (= wire) order.
        kind: the message tag (``None`` for a class that only travels nested).
        fields: ``fields(obj)`` returns the field array of an instance (a list).
        message: ``message(obj)`` returns ``[WIRE_VERSION, kind, *fields(obj)]`` (``kind`` set only).
        from_fields: ``from_fields(values)`` builds an instance from its field array, validated by
            the class's ``__post_init__``; raises ``ValueError`` if the number of values is wrong
            or a value is invalid, ``TypeError``/``IndexError``/``KeyError`` on values of the
            wrong shape.
        source: the generated code of the three functions.
    """

    __slots__ = ("cls", "names", "kind", "fields", "message", "from_fields", "source")

    def __init__(self, cls: type, kind: MsgKind | None = None) -> None:
        """Resolve the converters of ``cls``'s fields and generate its functions.

        Raises:
            TypeError: if a field's type has no converter (see the module docstring).
        """
        hints = typing.get_type_hints(cls)
        self.cls, self.kind = cls, kind
        self.names = tuple(f.name for f in dataclasses.fields(cls))
        ns: dict[str, Any] = {"cls": cls}
        reads, args = [], []
        for i, name in enumerate(self.names):
            enc, dec = _converters(hints[name], f"{cls.__name__}.{name}")
            read, arg = f"obj.{name}", f"v[{i}]"
            if enc is not None:
                ns[f"enc{i}"], read = enc, f"enc{i}({read})"
            if dec is not None:
                ns[f"dec{i}"], arg = dec, f"dec{i}({arg})"
            reads.append(read)
            args.append(arg)
        n, head = len(self.names), (f"{WIRE_VERSION}, {int(kind)}, " if kind is not None else "")
        self.source = (
            f"def fields(obj):\n    return [{', '.join(reads)}]\n\n"
            f"def message(obj):\n    return [{head}{', '.join(reads)}]\n\n"
            f"def from_fields(v):\n"
            f"    if len(v) != {n}:\n"
            f"        raise ValueError(f'expected {n} {cls.__name__} fields, got {{len(v)}}')\n"
            f"    return cls({', '.join(args)})\n"
        )
        exec(compile(self.source, f"<wire codec of {cls.__qualname__}>", "exec"), ns)
        self.fields: Callable[[Any], list[Any]] = ns["fields"]
        self.message: Callable[[Any], list[Any]] = ns["message"]
        self.from_fields: Callable[[list[Any]], Any] = ns["from_fields"]


def _converters(hint: Any, where: str) -> _Pair:
    """The ``(encode, decode)`` converters of a field type (see the module docstring)."""
    if hint in _FIXED:
        return _FIXED[hint]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return (None, None)
    if hint in _CODECS:
        codec = _CODECS[hint]
        return (codec.fields, codec.from_fields)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return (dict, dict)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _CODECS:
        item = _CODECS[args[0]]
        item_enc, item_dec = item.fields, item.from_fields
        return (lambda v: [item_enc(x) for x in v], lambda v: tuple(item_dec(x) for x in v))
    if origin is tuple and all(a is int or a is Ellipsis for a in args):
        return (None, tuple)
    raise TypeError(f"no wire converter for {where}: {hint!r}")


class WireMessage:
    """Base of the message classes: ``encode`` and ``decode`` through their :class:`ClassCodec`."""

    __slots__ = ()

    KIND: ClassVar[MsgKind]
    """The message's tag on the wire (set by :func:`wire`)."""
    _codec: ClassVar[ClassCodec]

    def encode(self) -> bytes:
        """Encode as msgpack ``[WIRE_VERSION, KIND, field, ...]`` (fields in declaration order)."""
        out = msgpack.packb(self._codec.message(self), use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Self:
        """Inverse of ``encode``: decode one message and check it is of this class.

        Raises:
            ValueError: on a wrong version, kind or field, or a message of another class.
        """
        msg = decode_wire(data)
        if not isinstance(msg, cls):
            raise ValueError(f"expected a {cls.__name__}, got {type(msg).__name__}")
        return msg


T = TypeVar("T", bound=type)


def wire(kind: MsgKind | None = None) -> Callable[[T], T]:
    """Class decorator (outside ``@dataclass``): give a frozen dataclass its :class:`ClassCodec`.

    Args:
        kind: the message tag for a :class:`WireMessage` subclass (then :func:`decode_wire` returns
            it for that tag); ``None`` for a class that only travels nested in others.

    Raises:
        TypeError: if a field type has no converter, or ``kind`` is given to a class that is not a
            :class:`WireMessage`.
    """

    def register(cls: T) -> T:
        codec = ClassCodec(cls, kind)
        _CODECS[cls] = codec
        if kind is not None:
            if not issubclass(cls, WireMessage):
                raise TypeError(f"expected a WireMessage subclass for kind {kind.name}, got {cls.__name__}")
            cls.KIND = kind
            cls._codec = codec
            _BY_KIND[int(kind)] = cls
        return cls

    return register


def decode_wire(data: bytes | memoryview) -> WireMessage:
    """Decode the first part of a message into the class registered for its kind.

    Args:
        data: msgpack bytes written by a message's ``encode``.

    Returns:
        The message (validated).

    Raises:
        ValueError: if the bytes are not msgpack, the version is not :data:`WIRE_VERSION`, the kind
            is unknown or a field is invalid.
    """
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"expected a msgpack message, got undecodable bytes ({e})") from e
    if not isinstance(obj, list) or len(obj) < 2:
        raise ValueError(f"expected [version, kind, ...], got {type(obj).__name__}")
    version, kind, fields = obj[0], obj[1], obj[2:]
    if version != WIRE_VERSION:
        raise ValueError(f"expected wire version {WIRE_VERSION}, got {version!r}")
    cls = _BY_KIND.get(kind) if type(kind) is int else None
    if cls is None:
        raise ValueError(f"expected a message kind in {[m.value for m in MsgKind]}, got {kind!r}")
    try:
        msg: WireMessage = cls._codec.from_fields(fields)
    except (TypeError, IndexError, KeyError) as e:
        raise ValueError(f"expected valid {cls.KIND.name} fields, got {fields!r:.200} ({e})") from e
    return msg
