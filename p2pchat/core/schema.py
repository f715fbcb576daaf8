"""Explicit, typed schemas for msgpack-encoded packets.

A schema class is a frozen, slotted dataclass whose every field is annotated with ``typing.Annotated[T, spec]``::

    @wire_struct
    @dataclass(frozen=True, slots=True)
    class Endpoint(WireStruct):
        host: Annotated[str, IpAddress()]
        port: Annotated[int, Int(min_value=1, max_value=65535)]

    @packet(kind=9)
    @dataclass(frozen=True, slots=True)
    class Hello(Packet):
        txid: Annotated[bytes, Bytes(min_len=8, max_len=8)]
        where: Annotated[Endpoint, Struct(Endpoint)]

The schema decorator goes above ``@dataclass`` (it needs the finished slotted class), and schema classes live at
module level, where their string annotations can be resolved.  The decorators read the annotations once and
compile them into a :class:`Schema`; encoding and decoding then run a fixed list of checks with no introspection.
The wire form of a struct is a msgpack array of its field values in declaration order -- no field names --
because our datagrams must fit in 1280 bytes.

Two directions, two error types:

* decoding (:func:`from_wire`, :meth:`Spec.check`) sees remote input and raises only
  :class:`~p2pchat.errors.ProtocolError`;
* encoding (:func:`to_wire`, :meth:`Spec.to_wire`) runs the very same checks, so we never send what we would
  refuse, but raises :class:`ValueError`: encoding an invalid value is a bug in our own code, not the peer's.

Both messages name the field that failed, as a path such as ``Nodes.nodes[3].port``.

This module does no I/O and knows nothing of msgpack bytes; :mod:`p2pchat.core.framing` does the packing.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import operator
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Annotated, Any, ClassVar, Final, TypeVar

from p2pchat.errors import ProtocolError

__all__ = [
    "IP_CACHE_SIZE",
    "MAX_PACKET_KIND",
    "MIN_PACKET_KIND",
    "MSGPACK_INT_MAX",
    "MSGPACK_INT_MIN",
    "PACKETS",
    "STRUCT_MEMO_SIZE",
    "Bool",
    "Bytes",
    "Float",
    "Int",
    "IpAddress",
    "List",
    "Optional",
    "Packet",
    "PacketRegistry",
    "Schema",
    "Spec",
    "Str",
    "Struct",
    "WireStruct",
    "from_wire",
    "max_wire_size",
    "packet",
    "schema_of",
    "to_wire",
    "wire_struct",
]

MSGPACK_INT_MIN: Final = -(1 << 63)
"""Smallest integer msgpack can carry (int64)."""

MSGPACK_INT_MAX: Final = (1 << 64) - 1
"""Largest integer msgpack can carry (uint64)."""

MIN_PACKET_KIND: Final = 1
"""Smallest packet kind; 0 is reserved so that a zeroed header byte never means a real packet."""

MAX_PACKET_KIND: Final = 255
"""Largest packet kind: the kind travels in one header byte."""

STRUCT_MEMO_SIZE: Final = 4096
"""Decoded values kept per memoised struct class (see :func:`wire_struct`'s ``memo``).

A node decodes the same contacts and certificates in reply after reply; a frozen struct's validation depends on
nothing else, so the decoded object is kept by its wire form.  The bound keeps a flood of distinct ones from
growing memory: past it the oldest entries go."""

IP_CACHE_SIZE: Final = 4096
"""Entries kept by each IP-address conversion cache (packed <-> text).

Parsing an IPv6 address costs microseconds and a node sees the same few thousand addresses over and over in
routing-table traffic, so the conversions are memoised; the bound keeps a flood of distinct addresses from
growing memory.
"""

_T = TypeVar("_T")
_V = TypeVar("_V")
_S = TypeVar("_S", bound="WireStruct")
_P = TypeVar("_P", bound="Packet")


def _type_name(value: object) -> str:
    return type(value).__name__


def _to_value_error(check: Callable[[_V], _T], value: _V) -> _T:
    """Run a decode-side *check* on a value we are about to send, turning its ProtocolError into ValueError."""
    try:
        return check(value)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


# Errors inside a struct carry the path to the failing value (".nodes[3].port") apart from the reason, so each
# enclosing List/struct can prepend its step and the outermost call can put the class name in front:
# "Nodes.nodes[3].port: 0 is outside 1..65535".


class _FieldProtocolError(ProtocolError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _FieldValueError(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _decode_step(step: str, exc: ProtocolError) -> _FieldProtocolError:
    if isinstance(exc, _FieldProtocolError):
        return _FieldProtocolError(step + exc.path, exc.reason)
    return _FieldProtocolError(step, str(exc))


def _encode_step(step: str, exc: ValueError) -> _FieldValueError:
    if isinstance(exc, _FieldValueError):
        return _FieldValueError(step + exc.path, exc.reason)
    return _FieldValueError(step, str(exc))


# --- msgpack sizes, for max_wire_size -----------------------------------------------------------------------


def _msgpack_int_size(value: int) -> int:
    if 0 <= value < 128 or -32 <= value < 0:
        return 1
    magnitude = value if value >= 0 else -value - 1
    # Non-negative values use uint8/16/32/64; negative ones int8/16/32/64 (one bit less of magnitude).
    bits = magnitude.bit_length() + (0 if value >= 0 else 1)
    for size, width in ((2, 8), (3, 16), (5, 32)):
        if bits <= width:
            return size
    return 9


def _str_header(length: int) -> int:
    """Header size of a msgpack str of *length* bytes (fixstr, str8, str16, str32)."""
    return 1 if length <= 31 else 2 if length <= 0xFF else 3 if length <= 0xFFFF else 5


def _bin_header(length: int) -> int:
    """Header size of a msgpack bin of *length* bytes (bin8, bin16, bin32: bin has no one-byte form)."""
    return 2 if length <= 0xFF else 3 if length <= 0xFFFF else 5


def _array_header(count: int) -> int:
    """Header size of a msgpack array of *count* items (fixarray, array16, array32: there is no array8)."""
    return 1 if count <= 15 else 3 if count <= 0xFFFF else 5


# --- field specs ----------------------------------------------------------------------------------------------


class Spec(ABC):
    """A field spec: what values a field may hold and how they look on the wire.

    :meth:`check` validates a value decoded from msgpack and returns the Python value (raising
    :class:`ProtocolError`); :meth:`to_wire` validates a Python value with the same rules and returns its msgpack
    form (raising :class:`ValueError`).
    """

    __slots__ = ()

    @abstractmethod
    def check(self, value: object) -> Any:
        """Validate a decoded wire value and return the Python value; raise :class:`ProtocolError` if invalid."""

    def to_wire(self, value: object) -> object:
        """Validate a Python value and return its msgpack form; raise :class:`ValueError` if invalid."""
        return _to_value_error(self.check, value)

    @property
    @abstractmethod
    def max_wire_size(self) -> int:
        """The largest number of msgpack bytes a valid value of this field can take."""

    @abstractmethod
    def accepts_annotation(self, annotation: object) -> bool:
        """Whether *annotation* (the ``T`` of ``Annotated[T, spec]``) is the Python type this spec produces."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Bytes(Spec):
    """A msgpack bin of ``min_len`` to ``max_len`` bytes (set both equal for an exact length)."""

    min_len: int = 0
    max_len: int

    def __post_init__(self) -> None:
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"Bytes needs 0 <= min_len <= max_len, got {self.min_len}..{self.max_len}")

    def check(self, value: object) -> bytes:
        """Return *value* if it is bytes of an allowed length."""
        if type(value) is not bytes:
            raise ProtocolError(f"expected bytes, got {_type_name(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise ProtocolError(f"{len(value)} bytes, expected {self.min_len}..{self.max_len}")
        return value

    def to_wire(self, value: object) -> object:
        """Return *value* if it is bytes of an allowed length; :class:`ValueError` otherwise."""
        if type(value) is bytes and self.min_len <= len(value) <= self.max_len:
            return value
        return _to_value_error(self.check, value)

    @property
    def max_wire_size(self) -> int:
        """Header plus ``max_len`` bytes."""
        return _bin_header(self.max_len) + self.max_len

    def accepts_annotation(self, annotation: object) -> bool:
        """Bytes fields are annotated ``bytes``."""
        return annotation is bytes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Str(Spec):
    """A msgpack str (valid UTF-8) of at most ``max_bytes`` bytes once encoded."""

    max_bytes: int

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"Str needs max_bytes >= 0, got {self.max_bytes}")

    def check(self, value: object) -> str:
        """Return *value* if it is a str that fits in ``max_bytes`` of UTF-8."""
        if type(value) is not str:
            raise ProtocolError(f"expected str, got {_type_name(value)}")
        # Every character takes at least one byte and an ASCII one exactly one: skip encoding when that decides.
        if len(value) > self.max_bytes:
            raise ProtocolError(f"string longer than {self.max_bytes} bytes")
        if not value.isascii():
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:  # lone surrogates: only reachable on encode, msgpack would refuse them
                raise ProtocolError("string is not valid unicode (lone surrogate)") from None
            if size > self.max_bytes:
                raise ProtocolError(f"string of {size} bytes, longer than {self.max_bytes}")
        return value

    @property
    def max_wire_size(self) -> int:
        """Header plus ``max_bytes``."""
        return _str_header(self.max_bytes) + self.max_bytes

    def accepts_annotation(self, annotation: object) -> bool:
        """Str fields are annotated ``str``."""
        return annotation is str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Int(Spec):
    """An integer in ``min_value..max_value`` (inclusive).  A bool is not an integer here."""

    min_value: int
    max_value: int

    def __post_init__(self) -> None:
        if not MSGPACK_INT_MIN <= self.min_value <= self.max_value <= MSGPACK_INT_MAX:
            raise ValueError(f"Int needs msgpack-sized bounds in order, got {self.min_value}..{self.max_value}")

    def check(self, value: object) -> int:
        """Return *value* if it is an int (not a bool) within the bounds."""
        if type(value) is not int:
            raise ProtocolError(f"expected int, got {_type_name(value)}")
        if not self.min_value <= value <= self.max_value:
            raise ProtocolError(f"{value} is outside {self.min_value}..{self.max_value}")
        return value

    def to_wire(self, value: object) -> object:
        """Return *value* if it is an int (not a bool) within the bounds; :class:`ValueError` otherwise."""
        if type(value) is int and self.min_value <= value <= self.max_value:
            return value
        return _to_value_error(self.check, value)

    @property
    def max_wire_size(self) -> int:
        """The larger encoding of the two bounds (msgpack uses the smallest form that fits)."""
        return max(_msgpack_int_size(self.min_value), _msgpack_int_size(self.max_value))

    def accepts_annotation(self, annotation: object) -> bool:
        """Int fields are annotated ``int``."""
        return annotation is int


@dataclasses.dataclass(frozen=True, slots=True)
class Bool(Spec):
    """``True`` or ``False`` (msgpack true/false, never 0 or 1)."""

    def check(self, value: object) -> bool:
        """Return *value* if it is a bool."""
        if type(value) is not bool:
            raise ProtocolError(f"expected bool, got {_type_name(value)}")
        return value

    def to_wire(self, value: object) -> object:
        """Return *value* if it is a bool; :class:`ValueError` otherwise."""
        if type(value) is bool:
            return value
        return _to_value_error(self.check, value)

    @property
    def max_wire_size(self) -> int:
        """One byte."""
        return 1

    def accepts_annotation(self, annotation: object) -> bool:
        """Bool fields are annotated ``bool``."""
        return annotation is bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Float(Spec):
    """A finite float in ``min_value..max_value``.  NaN and infinities are refused; so are ints."""

    min_value: float
    max_value: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_value) and math.isfinite(self.max_value)):
            raise ValueError("Float bounds must be finite")
        if self.min_value > self.max_value:
            raise ValueError(f"Float needs min_value <= max_value, got {self.min_value}..{self.max_value}")

    def check(self, value: object) -> float:
        """Return *value* if it is a float within the bounds (which also excludes NaN and infinities)."""
        if type(value) is not float:
            raise ProtocolError(f"expected float, got {_type_name(value)}")
        # NaN compares false with everything, so the range test rejects it too.
        if not self.min_value <= value <= self.max_value:
            raise ProtocolError(f"{value!r} is outside {self.min_value!r}..{self.max_value!r}")
        return value

    @property
    def max_wire_size(self) -> int:
        """msgpack packs every Python float as a float64: nine bytes."""
        return 9

    def accepts_annotation(self, annotation: object) -> bool:
        """Float fields are annotated ``float``."""
        return annotation is float


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _ip_text(packed: bytes) -> str:
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    return str(ipaddress.IPv6Address(packed))


@functools.lru_cache(maxsize=IP_CACHE_SIZE)
def _ip_packed(text: str) -> bytes | None:
    """The packed form of a canonical IP literal, or None if *text* is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # Only the canonical spelling maps one-to-one onto the packed form (no "::FFFF", no padding), and a scope id
    # ("%eth0") names an interface of ours, meaningless to a peer and lost when packed.
    if str(address) != text or (isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None):
        return None
    return address.packed


@dataclasses.dataclass(frozen=True, slots=True)
class IpAddress(Spec):
    """An IP address: a canonical text literal in Python, its packed 4 or 16 bytes on the wire.

    Packed, because a ``Nodes`` reply with twenty IPv6 contacts must fit in one 1280-byte datagram and the text
    form does not (up to 45 bytes against 16).  The Python side keeps the text (``str(ipaddress.ip_address(x))``)
    so values compare and hash the same way wherever they came from; a non-canonical spelling (``"::FFFF:..."``,
    ``"fe80::1%eth0"``) is refused on encode rather than silently rewritten.
    """

    def check(self, value: object) -> str:
        """Return the canonical text of a packed IPv4 (4 bytes) or IPv6 (16 bytes) address."""
        if type(value) is not bytes:
            raise ProtocolError(f"expected packed IP address bytes, got {_type_name(value)}")
        if len(value) not in (4, 16):
            raise ProtocolError(f"packed IP address of {len(value)} bytes, expected 4 or 16")
        return _ip_text(value)

    def to_wire(self, value: object) -> bytes:
        """Return the packed form of a canonical IP literal."""
        if type(value) is not str:
            raise ValueError(f"expected an IP address str, got {_type_name(value)}")
        packed = _ip_packed(value)
        if packed is None:
            raise ValueError(f"{value!r} is not a canonical IP address literal")
        return packed

    @property
    def max_wire_size(self) -> int:
        """An IPv6 address: bin8 header plus 16 bytes."""
        return _bin_header(16) + 16

    def accepts_annotation(self, annotation: object) -> bool:
        """IP address fields are annotated ``str``."""
        return annotation is str


@dataclasses.dataclass(frozen=True, slots=True)
class Optional(Spec):
    """Either ``None`` (msgpack nil) or a value of *spec*."""

    spec: Spec

    def check(self, value: object) -> Any:
        """Return None or the inner spec's value."""
        return None if value is None else self.spec.check(value)

    def to_wire(self, value: object) -> object:
        """Return None or the inner spec's wire form."""
        return None if value is None else self.spec.to_wire(value)

    @property
    def max_wire_size(self) -> int:
        """The inner spec's maximum (nil is one byte, never more)."""
        return max(1, self.spec.max_wire_size)

    def accepts_annotation(self, annotation: object) -> bool:
        """Optional fields are annotated ``X | None`` where the inner spec accepts ``X``."""
        if not isinstance(annotation, types.UnionType) and typing.get_origin(annotation) is not typing.Union:
            return False
        args = typing.get_args(annotation)
        rest = [arg for arg in args if arg is not types.NoneType]
        return len(args) == 2 and len(rest) == 1 and self.spec.accepts_annotation(rest[0])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class List(Spec):
    """A msgpack array of at most ``max_items`` values of ``item``; a ``tuple`` in Python (schemas are frozen)."""

    item: Spec
    max_items: int
    min_items: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_items <= self.max_items:
            raise ValueError(f"List needs 0 <= min_items <= max_items, got {self.min_items}..{self.max_items}")

    def _check_length(self, count: int) -> None:
        if not self.min_items <= count <= self.max_items:
            raise ProtocolError(f"{count} items, expected {self.min_items}..{self.max_items}")

    def check(self, value: object) -> tuple[Any, ...]:
        """Return a tuple of checked items if *value* is an array of an allowed length."""
        if type(value) is not list:
            raise ProtocolError(f"expected array, got {_type_name(value)}")
        self._check_length(len(value))
        item = self.item
        check = item.check
        try:
            if type(item) is Struct:
                return item.check_all(value)
            return tuple([check(one) for one in value])
        except ProtocolError:
            # Slow path, only on failure: find the item that failed so the message can name it.
            for index, item in enumerate(value):
                try:
                    check(item)
                except ProtocolError as exc:
                    raise _decode_step(f"[{index}]", exc) from None
            raise  # pragma: no cover - a pure check cannot fail once and then pass

    def to_wire(self, value: object) -> list[object]:
        """Return the list of the items' wire forms; *value* must be a tuple."""
        if type(value) is not tuple:
            raise ValueError(f"expected tuple, got {_type_name(value)}")
        _to_value_error(self._check_length, len(value))
        item = self.item
        if type(item) is Struct:
            try:
                return item.to_wire_all(value)
            except ValueError:
                pass  # the loop below names the item that failed
        encode = item.to_wire
        wire: list[object] = []
        for index, item in enumerate(value):
            try:
                wire.append(encode(item))
            except ValueError as exc:
                raise _encode_step(f"[{index}]", exc) from None
        return wire

    @property
    def max_wire_size(self) -> int:
        """Array header plus ``max_items`` of the largest item."""
        return _array_header(self.max_items) + self.max_items * self.item.max_wire_size

    def accepts_annotation(self, annotation: object) -> bool:
        """List fields are annotated ``tuple[X, ...]`` where the item spec accepts ``X``."""
        args = typing.get_args(annotation)
        return (
            typing.get_origin(annotation) is tuple
            and len(args) == 2
            and args[1] is Ellipsis
            and self.item.accepts_annotation(args[0])
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Struct(Spec):
    """A nested schema class (decorated with :func:`wire_struct`), encoded as a msgpack array of its fields."""

    cls: type[WireStruct]

    def __post_init__(self) -> None:
        schema_of(self.cls)  # a nested class must be compiled first, or decoding it would fail at run time

    def check(self, value: object) -> WireStruct:
        """Return an instance of ``cls`` decoded from *value*."""
        cls = self.cls
        memo: dict[tuple[object, ...], WireStruct] | None = cls.__dict__.get("__wire_decode_memo__")
        if memo is None or type(value) is not list:
            return _decode(cls, value)
        key = tuple(value)
        try:
            hit = memo.get(key)
        except TypeError:  # an unhashable item (an array or map): not a valid memoised struct anyway
            return _decode(cls, value)
        if hit is None:
            hit = _decode(cls, value)
            if len(memo) >= STRUCT_MEMO_SIZE:
                del memo[next(iter(memo))]
            memo[key] = hit
            return hit
        # A key equal to a valid one holds the same bytes and strs (they equal only their own type), but a bool or
        # float equals an int (True == 1, 1.0 == 1): the strict decoder must still see, and refuse, those.
        for index, kind in cls.__wire_exact_types__:  # type: ignore[attr-defined]
            if type(key[index]) is not kind:
                return _decode(cls, value)
        return hit

    def check_all(self, values: list[object]) -> tuple[WireStruct, ...]:
        """:meth:`check` for each of *values* (an array's items), with the memo's hits taken inline."""
        cls = self.cls
        memo: dict[tuple[object, ...], WireStruct] | None = cls.__dict__.get("__wire_decode_memo__")
        if memo is None:
            return tuple([self.check(value) for value in values])
        exact: tuple[tuple[int, type], ...] = cls.__wire_exact_types__  # type: ignore[attr-defined]
        out: list[WireStruct] = []
        for value in values:
            if type(value) is list:
                key = tuple(value)
                try:
                    hit = memo.get(key)
                except TypeError:
                    hit = None
                if hit is not None:
                    for index, kind in exact:
                        if type(key[index]) is not kind:
                            break
                    else:
                        out.append(hit)
                        continue
            out.append(self.check(value))
        return tuple(out)

    def to_wire_all(self, values: tuple[object, ...]) -> list[object]:
        """:meth:`to_wire` for each of *values*, with the memoised forms taken inline."""
        cls = self.cls
        if not cls.__wire_memo__:
            return [self.to_wire(value) for value in values]
        out: list[object] = []
        for value in values:
            if type(value) is cls:
                try:
                    out.append(value._wire_form)  # type: ignore[attr-defined]
                    continue
                except AttributeError:
                    pass
            out.append(self.to_wire(value))
        return out

    def to_wire(self, value: object) -> list[object]:
        """Return the array form of *value*, which must be exactly a ``cls`` instance."""
        cls = self.cls
        if type(value) is not cls:
            raise ValueError(f"expected {cls.__name__}, got {_type_name(value)}")
        if not cls.__wire_memo__:
            return _encode(value)
        # A memoised struct keeps its (checked) wire form in a slot of its own: the object is frozen, so the form
        # cannot go stale, and a node sends the same contact and certificate objects in reply after reply.
        try:
            return value._wire_form  # type: ignore[attr-defined, no-any-return]
        except AttributeError:
            wire = _encode(value)
            object.__setattr__(value, "_wire_form", wire)
            return wire

    @property
    def max_wire_size(self) -> int:
        """The largest encoding of ``cls``."""
        return max_wire_size(self.cls)

    def accepts_annotation(self, annotation: object) -> bool:
        """Struct fields are annotated with the class itself."""
        return annotation is self.cls


# --- schema classes -------------------------------------------------------------------------------------------


class WireStruct:
    """Base of every schema class.  Subclasses are frozen slotted dataclasses decorated with :func:`wire_struct`."""

    # Not a dataclass field: where a memoised struct keeps its wire form once encoded (see Struct.to_wire).
    __slots__ = ("_wire_form",)

    __wire_schema__: ClassVar[Schema]
    __wire_memo__: ClassVar[bool] = False


class Packet(WireStruct):
    """Base of top-level packets, which carry a kind byte; decorate subclasses with :func:`packet`."""

    __slots__ = ()

    KIND: ClassVar[int]
    """The packet kind, set by :func:`packet`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Schema:
    """The compiled schema of one class: its field names and specs, in wire order."""

    cls: type[WireStruct]
    names: tuple[str, ...]
    specs: tuple[Spec, ...]
    # Bound methods and a getter, collected once so encode/decode do no lookups per call.
    checks: tuple[Callable[[object], Any], ...] = dataclasses.field(repr=False)
    encoders: tuple[Callable[[object], object], ...] = dataclasses.field(repr=False)
    values: Callable[[object], tuple[object, ...]] = dataclasses.field(repr=False)
    construct: Callable[..., WireStruct] = dataclasses.field(repr=False)


def _compile(cls: type[_S]) -> Schema:
    if not isinstance(cls, type) or not issubclass(cls, WireStruct):
        raise TypeError(f"{cls!r} must subclass WireStruct")
    if "__wire_schema__" in cls.__dict__:
        raise TypeError(f"{cls.__name__} is already a schema class")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be a dataclass; put the schema decorator above @dataclass")
    if not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be @dataclass(frozen=True, slots=True)")
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except NameError as exc:
        raise TypeError(f"{cls.__name__}: cannot resolve an annotation ({exc}); define it at module level") from exc
    names: list[str] = []
    specs: list[Spec] = []
    for field in dataclasses.fields(typing.cast(Any, cls)):
        hint = hints[field.name]
        if typing.get_origin(hint) is not Annotated:
            raise TypeError(f"{cls.__name__}.{field.name} needs an Annotated[T, Spec] annotation")
        found = [meta for meta in hint.__metadata__ if isinstance(meta, Spec)]
        if len(found) != 1:
            raise TypeError(f"{cls.__name__}.{field.name} needs exactly one Spec, found {len(found)}")
        spec = found[0]
        base = typing.get_args(hint)[0]
        if not spec.accepts_annotation(base):
            raise TypeError(f"{cls.__name__}.{field.name}: {spec!r} does not produce values of type {base!r}")
        names.append(field.name)
        specs.append(spec)
    if not names:
        raise TypeError(f"{cls.__name__} has no fields")
    getter = operator.attrgetter(*names)
    # attrgetter returns a bare value, not a 1-tuple, when given a single name.
    values: Callable[[object], tuple[object, ...]] = getter if len(names) > 1 else (lambda obj: (getter(obj),))
    return Schema(
        cls=cls,
        names=tuple(names),
        specs=tuple(specs),
        checks=tuple(spec.check for spec in specs),
        encoders=tuple(spec.to_wire for spec in specs),
        values=values,
        construct=cls,
    )


@typing.overload
def wire_struct(cls: type[_S], /) -> type[_S]: ...


@typing.overload
def wire_struct(*, memo: bool) -> Callable[[type[_S]], type[_S]]: ...


def wire_struct(cls: type[_S] | None = None, /, *, memo: bool = False) -> type[_S] | Callable[[type[_S]], type[_S]]:
    """Class decorator: compile the schema of a nested struct (a :class:`WireStruct` frozen slotted dataclass).

    ``@wire_struct(memo=True)`` also memoises the struct's encodings and decodings when nested in another: for
    small structs that recur in traffic, such as contacts and node certificates.  Decodings are kept in a table of
    up to :data:`STRUCT_MEMO_SIZE` wire forms; an encoding is kept in the (frozen) object itself.  Their fields
    must be bytes, str or numbers.

    Raises :class:`TypeError` at import if the class is not a frozen slotted dataclass or a field lacks a spec
    or has a spec that does not match its type.
    """

    def decorate(cls: type[_S]) -> type[_S]:
        schema = cls.__wire_schema__ = _compile(cls)
        if memo:
            exact: list[tuple[int, type]] = []
            for index, spec in enumerate(schema.specs):
                if isinstance(spec, Int | Bool | Float):
                    exact.append((index, {Int: int, Bool: bool, Float: float}[type(spec)]))
                elif not isinstance(spec, Bytes | Str | IpAddress):
                    raise TypeError(f"{cls.__name__}: a memoised struct has only bytes, str and number fields")
            cls.__wire_exact_types__ = tuple(exact)  # type: ignore[attr-defined]
            cls.__wire_decode_memo__ = {}  # type: ignore[attr-defined]
            cls.__wire_memo__ = True
        return cls

    return decorate if cls is None else decorate(cls)


class PacketRegistry:
    """Maps packet kinds to packet classes; :func:`packet` fills it at import, the decoder looks kinds up."""

    __slots__ = ("_by_kind",)

    def __init__(self) -> None:
        self._by_kind: dict[int, type[Packet]] = {}

    def register(self, kind: int, cls: type[Packet]) -> None:
        """Add *cls* under *kind*; :class:`ValueError` if the kind is out of range or already taken."""
        if not MIN_PACKET_KIND <= kind <= MAX_PACKET_KIND:
            raise ValueError(f"packet kind {kind} outside {MIN_PACKET_KIND}..{MAX_PACKET_KIND}")
        if kind in self._by_kind:
            raise ValueError(f"packet kind {kind} is taken by {self._by_kind[kind].__name__}, not {cls.__name__}")
        self._by_kind[kind] = cls

    def lookup(self, kind: int) -> type[Packet] | None:
        """The class registered under *kind*, or None."""
        return self._by_kind.get(kind)

    def __iter__(self) -> Iterator[type[Packet]]:
        """The registered classes, in kind order."""
        return iter([self._by_kind[kind] for kind in sorted(self._by_kind)])

    def __len__(self) -> int:
        """The number of registered kinds."""
        return len(self._by_kind)


PACKETS: Final = PacketRegistry()
"""The registry of the p2pchat protocol's packets (filled by importing :mod:`p2pchat.core.packets`)."""


def packet(kind: int, *, registry: PacketRegistry = PACKETS) -> Callable[[type[_P]], type[_P]]:
    """Class decorator: compile a :class:`Packet` schema, set its ``KIND`` and register it in *registry*.

    A duplicate kind raises :class:`ValueError` at import, so two modules cannot silently claim one kind.
    """

    def decorate(cls: type[_P]) -> type[_P]:
        if not (isinstance(cls, type) and issubclass(cls, Packet)):
            raise TypeError(f"{cls!r} must subclass Packet")
        schema = _compile(cls)
        registry.register(kind, cls)
        cls.__wire_schema__ = schema
        cls.KIND = kind
        return cls

    return decorate


def schema_of(cls: type[WireStruct]) -> Schema:
    """The compiled schema of a schema class; :class:`TypeError` if it was never decorated."""
    schema = cls.__dict__.get("__wire_schema__")
    if schema is None:
        raise TypeError(f"{cls.__name__} is not a schema class (decorate it with @wire_struct or @packet)")
    assert isinstance(schema, Schema)
    return schema


def _decode(cls: type[_S], wire: object) -> _S:
    schema = cls.__wire_schema__
    if schema.cls is not cls:
        raise TypeError(f"{cls.__name__} is not a schema class itself (only a subclass of one)")
    if type(wire) is not list:
        raise ProtocolError(f"expected an array, got {_type_name(wire)}")
    checks = schema.checks
    if len(wire) != len(checks):
        raise ProtocolError(f"expected {len(checks)} fields, got {len(wire)}")
    try:
        values = [check(item) for check, item in zip(checks, wire, strict=True)]
    except ProtocolError:
        # Slow path, only on failure: find the failing field so the message names it.
        for field, check, item in zip(schema.names, checks, wire, strict=True):
            try:
                check(item)
            except ProtocolError as exc:
                raise _decode_step(f".{field}", exc) from None
        raise  # pragma: no cover - a pure check cannot fail once and then pass
    # The schema was compiled from cls itself (checked above), so construct builds a cls.
    return typing.cast(_S, schema.construct(*values))


def _encode(obj: WireStruct) -> list[object]:
    schema = type(obj).__wire_schema__
    if schema.cls is not type(obj):
        raise TypeError(f"{type(obj).__name__} is not a schema class itself (only a subclass of one)")
    try:
        return [encode(value) for encode, value in zip(schema.encoders, schema.values(obj), strict=True)]
    except ValueError:
        pass
    # Slow path, only on failure: find the failing field so the message names it.
    wire: list[object] = []
    for field, encode, value in zip(schema.names, schema.encoders, schema.values(obj), strict=True):
        try:
            wire.append(encode(value))
        except ValueError as exc:
            raise _encode_step(f".{field}", exc) from None
    raise AssertionError("unreachable: a pure check cannot fail once and then pass")  # pragma: no cover


def from_wire(cls: type[_S], wire: object) -> _S:
    """Decode the msgpack array *wire* into an instance of *cls*; :class:`ProtocolError` on any mismatch.

    The message names the failing value by its path, e.g. ``Nodes.nodes[3].port: 0 is outside 1..65535``.
    """
    try:
        return _decode(cls, wire)
    except _FieldProtocolError as exc:
        raise ProtocolError(f"{cls.__name__}{exc.path}: {exc.reason}") from None
    except ProtocolError as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from None


def to_wire(obj: WireStruct) -> list[object]:
    """Validate *obj* and return its msgpack array form; :class:`ValueError` naming the failing value's path."""
    try:
        return _encode(obj)
    except _FieldValueError as exc:
        raise ValueError(f"{type(obj).__name__}{exc.path}: {exc.reason}") from None


def max_wire_size(cls: type[WireStruct]) -> int:
    """The largest number of msgpack bytes a valid instance of *cls* can encode to."""
    schema = schema_of(cls)
    return _array_header(len(schema.specs)) + sum(spec.max_wire_size for spec in schema.specs)
