"""Compiled msgspec decoders for schema classes: the fast path of :func:`p2pchat.core.framing.decode_packet`.

:mod:`p2pchat.core.schema` is the definition of what a packet may hold, and its checks run in Python on values
msgpack has already unpacked.  Here each schema class is compiled once into a *shadow*: a ``msgspec.Struct``
(array-like, so the same wire form) whose field types carry the same bounds as ``msgspec.Meta`` constraints, so
that one C call parses the msgpack bytes and checks them.  A converter then builds the schema class from the
shadow, doing in Python only what msgspec cannot express (IP addresses to text, record kinds to enums, memoised
contacts).

The reference stays the judge.  A shadow may be *stricter* than its schema, never looser: whatever the fast
path refuses -- msgspec's errors, a converter's :class:`~p2pchat.errors.ProtocolError`, anything -- is decoded
again by the reference path, which either accepts it (the same value) or raises the :class:`ProtocolError` that
names the failing field.  So a refused packet costs a second decode, and nothing else changes: error messages,
counters and behaviour are those of the reference.  ``tests/test_fastwire.py`` checks the two agree on valid
packets of every kind and on mutated ones.

Where msgspec differs from our rules the field falls back to the schema's own check on the plain value
(``Any``): floats (msgspec accepts an int for a float), integers whose bounds do not fit an int64 constraint, and
specs this module does not know.  Strings are bounded by characters here and by UTF-8 bytes in the schema, so a
non-ASCII one is checked again.  Array-like structs forbid extra items (msgspec would otherwise drop them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Final

import msgspec

from p2pchat.core.schema import (
    STRUCT_MEMO_SIZE,
    Bool,
    Bytes,
    Int,
    IpAddress,
    List,
    Optional,
    Spec,
    Str,
    Struct,
    WireStruct,
    schema_of,
)

__all__ = ["INT64_MAX", "fast_decoder"]

INT64_MAX: Final = (1 << 63) - 1
"""Largest bound msgspec takes as an integer constraint (larger values still decode, checked by the schema).  The
smallest, -2**63, is msgpack's own (``MSGPACK_INT_MIN``), below which no Int spec's bound can go."""

Converter = Callable[[Any], Any]
"""Turns what msgspec decoded for a field into the schema's Python value; may raise ProtocolError."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Form:
    """How one field decodes: the msgspec type, the converter (None: the decoded value is the Python value), and
    whether equal decoded values are always of the same types (so they can key a memo)."""

    type: Any
    convert: Converter | None
    exact: bool


def _form(spec: Spec) -> _Form:
    kind = type(spec)
    if kind is Bytes:
        assert isinstance(spec, Bytes)
        return _Form(Annotated[bytes, msgspec.Meta(min_length=spec.min_len, max_length=spec.max_len)], None, True)
    if kind is Int:
        assert isinstance(spec, Int)
        if spec.max_value <= INT64_MAX:
            return _Form(Annotated[int, msgspec.Meta(ge=int(spec.min_value), le=int(spec.max_value))], None, True)
        return _Form(int, spec.check, True)
    if kind is Bool:
        return _Form(bool, None, True)
    if kind is Str:
        assert isinstance(spec, Str)
        check = spec.check
        # msgspec counts characters, the schema UTF-8 bytes: equal for ASCII, and characters <= bytes otherwise.
        return _Form(
            Annotated[str, msgspec.Meta(max_length=spec.max_bytes)],
            lambda value: value if value.isascii() else check(value),
            True,
        )
    if kind is IpAddress:
        return _Form(Annotated[bytes, msgspec.Meta(min_length=4, max_length=16)], spec.check, True)
    if kind is Optional:
        assert isinstance(spec, Optional)
        inner = _form(spec.spec)
        convert = inner.convert
        return _Form(
            inner.type | None,
            None if convert is None else (lambda value: None if value is None else convert(value)),
            inner.exact,
        )
    if kind is List:
        assert isinstance(spec, List)
        inner = _form(spec.item)
        meta = msgspec.Meta(min_length=spec.min_items, max_length=spec.max_items)
        items = tuple[inner.type, ...]  # type: ignore[name-defined]  # built at run time, for msgspec only
        return _Form(Annotated[items, meta], _list_converter(spec.item, inner), False)
    if kind is Struct:
        assert isinstance(spec, Struct)
        shadow = _shadow(spec.cls)
        return _Form(shadow.type, shadow.convert, False)
    # A float (msgspec would take an int for it), or a spec of another module: the plain msgpack value, checked
    # by the spec itself.
    return _Form(Any, spec.check, False)


def _list_converter(item: Spec, form: _Form) -> Converter | None:
    convert = form.convert
    if convert is None:
        return None
    memo = _shadow(item.cls).memo if isinstance(item, Struct) else None
    if memo is None:
        return lambda values: tuple([convert(one) for one in values])
    # Contacts: a reply's twenty are usually all known, so look them all up in one C-level pass and fall back to
    # the converter (which fills the memo) only when one is missing.  A WireStruct has no __bool__, so all() is
    # false only for a miss (None).
    lookup = memo.get

    def convert_all(values: tuple[msgspec.Struct, ...]) -> tuple[WireStruct, ...]:
        hits = tuple(map(lookup, values))
        if all(hits):
            return hits  # type: ignore[return-value]
        return tuple([convert(one) for one in values])

    return convert_all


@dataclasses.dataclass(frozen=True, slots=True)
class _Shadow:
    type: type[msgspec.Struct]
    convert: Callable[[Any], WireStruct]
    memo: dict[msgspec.Struct, WireStruct] | None


_SHADOWS: dict[type[WireStruct], _Shadow] = {}


def _shadow(cls: type[WireStruct]) -> _Shadow:
    known = _SHADOWS.get(cls)
    if known is None:
        known = _SHADOWS[cls] = _compile_shadow(cls)
    return known


def _compile_shadow(cls: type[WireStruct]) -> _Shadow:
    schema = schema_of(cls)
    forms = [_form(spec) for spec in schema.specs]
    shadow_type = msgspec.defstruct(
        f"_{cls.__name__}Wire",
        [(name, form.type) for name, form in zip(schema.names, forms, strict=True)],
        array_like=True,
        frozen=True,  # hashable, to key the memo
        forbid_unknown_fields=True,  # an array with extra items is refused, as the schema refuses it
        gc=False,  # holds no cycles; keeping it out of the collector spares its generation counts
    )
    # A generated converter, as dataclasses generates __init__: one call with each field read by name and
    # converted where it must be, with no loop per decode.
    namespace: dict[str, Any] = {"construct": schema.construct}
    arguments = []
    for index, (name, form) in enumerate(zip(schema.names, forms, strict=True)):
        if form.convert is None:
            arguments.append(f"wire.{name}")
        else:
            namespace[f"convert_{index}"] = form.convert
            arguments.append(f"convert_{index}(wire.{name})")
    source = f"def convert(wire):\n    return construct({', '.join(arguments)})\n"
    exec(source, namespace)  # noqa: S102 - the source is built above from field names, not from input
    convert: Callable[[Any], WireStruct] = namespace["convert"]
    if not (cls.__wire_memo__ and all(form.exact for form in forms)):
        return _Shadow(shadow_type, convert, None)
    memo: dict[msgspec.Struct, WireStruct] = {}
    return _Shadow(shadow_type, _memoised(convert, memo), memo)


def _memoised(
    convert: Callable[[Any], WireStruct], memo: dict[msgspec.Struct, WireStruct]
) -> Callable[[Any], WireStruct]:
    # Keyed by the shadow itself: msgspec has checked every field's exact type, so equal shadows hold equal values
    # of equal types (no True == 1 confusion), and the struct's validation depends on nothing else.

    def memoised(wire: msgspec.Struct) -> WireStruct:
        hit = memo.get(wire)
        if hit is None:
            hit = convert(wire)
            if len(memo) >= STRUCT_MEMO_SIZE:
                del memo[next(iter(memo))]
            memo[wire] = hit
        return hit

    return memoised


_DECODERS: dict[type[WireStruct], Callable[[bytes], WireStruct]] = {}


def fast_decoder(cls: type[WireStruct]) -> Callable[[bytes], WireStruct]:
    """The compiled decoder of a schema class (built on first use, then kept).

    It returns the schema object its bytes encode and raises -- msgspec's errors, :class:`ProtocolError`, ... --
    on anything it refuses; :func:`p2pchat.core.framing.decode_struct` then asks the reference path.
    """
    decode = _DECODERS.get(cls)
    if decode is None:
        shadow = _shadow(cls)
        parse = msgspec.msgpack.Decoder(shadow.type).decode
        convert = shadow.convert

        def decode(body: bytes) -> WireStruct:
            return convert(parse(body))

        _DECODERS[cls] = decode
    return decode
