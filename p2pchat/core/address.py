"""Human addresses: an Ed25519 public key as Bech32m text, e.g. ``p2p1q...`` (63 characters).

The encoding is Bech32m (BIP-350) with the human-readable prefix ``p2p``.  The data part is one version symbol
(0) followed by the 256-bit key in 5-bit symbols, then the 6-symbol checksum.  Bech32m was chosen over plain
base32 because its BCH checksum detects any error in up to four characters and lets us *locate* a single typo
or an adjacent swap, so a user is told which character to fix instead of just "invalid".

Decoding is lenient only where it is safe: surrounding whitespace and an all-uppercase address (easier to read
aloud or put in a QR code) are accepted.  Everything else gets an :class:`~p2pchat.errors.AddressError` whose
one-line message names the problem.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence
from typing import Final

from p2pchat.errors import AddressError

__all__ = [
    "ADDRESS_HRP",
    "ADDRESS_LENGTH",
    "ADDRESS_PREFIX",
    "ADDRESS_VERSION",
    "BECH32M_CONST",
    "BECH32_ALPHABET",
    "BECH32_MAX_LENGTH",
    "bech32m_checksum",
    "bech32m_decode",
    "bech32m_encode",
    "bech32m_verify",
    "decode_address",
    "encode_address",
]

BECH32_ALPHABET: Final = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
"""The 32 data symbols of bech32, in value order; b, i, o and 1 are left out as easy to misread."""

BECH32M_CONST: Final = 0x2BC830A3
"""The value the polymod of a valid Bech32m string (hrp expansion, data and checksum) must equal (BIP-350)."""

BECH32_MAX_LENGTH: Final = 90
"""The longest string the generic BIP-350 decoder accepts; the checksum's guarantees hold up to it."""

ADDRESS_HRP: Final = "p2p"
"""Human-readable part of every p2pchat address."""

ADDRESS_PREFIX: Final = ADDRESS_HRP + "1"
"""What every p2pchat address starts with: the human-readable part and the bech32 separator."""

ADDRESS_VERSION: Final = 0
"""The address version this code writes and reads: the first data symbol."""

_CHECKSUM_SYMBOLS: Final = 6
_KEY_BYTES: Final = 32
# 256 key bits take 52 five-bit symbols; the 4 bits left over are zero padding.
_KEY_SYMBOLS: Final = -(-_KEY_BYTES * 8 // 5)
_KEY_PADDING_BITS: Final = _KEY_SYMBOLS * 5 - _KEY_BYTES * 8
_DATA_SYMBOLS: Final = 1 + _KEY_SYMBOLS + _CHECKSUM_SYMBOLS

ADDRESS_LENGTH: Final = len(ADDRESS_PREFIX) + _DATA_SYMBOLS
"""Number of characters in a p2pchat address."""

_GENERATOR: Final = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
# The generator terms to fold in for each value of the 5 bits shifted out of the top of the checksum register:
# one table lookup per symbol instead of five conditional XORs.
_TOP_FEEDBACK: Final = tuple(
    functools.reduce(lambda acc, i: acc ^ (_GENERATOR[i] if top >> i & 1 else 0), range(5), 0) for top in range(32)
)
_SYMBOL_VALUE: Final = {char: value for value, char in enumerate(BECH32_ALPHABET)}
_TO_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_UPPER: Final = frozenset(string.ascii_uppercase)
_LOWER: Final = frozenset(string.ascii_lowercase)

_NOT_OURS: Final = "not a p2pchat address: it should start with p2p1"
_UNLOCATED_TYPO: Final = "the address has a typo (checksum mismatch); check it against the original"


def _polymod(values: Sequence[int], checksum: int = 1) -> int:
    """Run the bech32 BCH checksum register over *values* (5-bit symbols) from state *checksum*."""
    for value in values:
        checksum = ((checksum & 0x1FFFFFF) << 5) ^ value ^ _TOP_FEEDBACK[checksum >> 25]
    return checksum


def _hrp_expand(hrp: str) -> list[int]:
    """The human-readable part as checksum input: high bits of each character, a zero, then low bits."""
    return [ord(char) >> 5 for char in hrp] + [0] + [ord(char) & 31 for char in hrp]


def bech32m_checksum(hrp: str, data: Sequence[int]) -> list[int]:
    """The six checksum symbols that make ``hrp`` + ``data`` a valid Bech32m string (*hrp* in lower case)."""
    residue = _polymod([*_hrp_expand(hrp), *data, *[0] * _CHECKSUM_SYMBOLS]) ^ BECH32M_CONST
    return [(residue >> 5 * (_CHECKSUM_SYMBOLS - 1 - i)) & 31 for i in range(_CHECKSUM_SYMBOLS)]


def bech32m_verify(hrp: str, data: Sequence[int]) -> bool:
    """Whether *data* (5-bit symbols ending in the checksum) carries a valid Bech32m checksum under *hrp*."""
    return _polymod([*_hrp_expand(hrp), *data]) == BECH32M_CONST


def bech32m_encode(hrp: str, data: Sequence[int]) -> str:
    """Encode 5-bit symbols *data* under the lower-case *hrp* as a Bech32m string, checksum appended."""
    symbols = [*data, *bech32m_checksum(hrp, data)]
    return hrp + "1" + "".join(BECH32_ALPHABET[value] for value in symbols)


def bech32m_decode(text: str) -> tuple[str, list[int]]:
    """Decode any Bech32m string by the rules of BIP-350 into (hrp, data symbols without the checksum).

    Raises :class:`ValueError` naming the broken rule.  Addresses use :func:`decode_address`, which explains
    problems to a person; this generic decoder exists to check the checksum code against the BIP's vectors.
    """
    if len(text) > BECH32_MAX_LENGTH:
        raise ValueError(f"longer than {BECH32_MAX_LENGTH} characters")
    if any(not 33 <= ord(char) <= 126 for char in text):
        raise ValueError("character outside the printable ASCII range")
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    separator = text.rfind("1")
    if separator < 1:
        raise ValueError("missing separator or empty human-readable part")
    if len(text) - separator - 1 < _CHECKSUM_SYMBOLS:
        raise ValueError("data part shorter than the checksum")
    hrp, data_text = text[:separator], text[separator + 1 :]
    if any(char not in _SYMBOL_VALUE for char in data_text):
        raise ValueError("character outside the bech32 alphabet")
    data = [_SYMBOL_VALUE[char] for char in data_text]
    if not bech32m_verify(hrp, data):
        raise ValueError("checksum mismatch")
    return hrp, data[:-_CHECKSUM_SYMBOLS]


def encode_address(public_key: bytes) -> str:
    """The p2pchat address of a 32-byte Ed25519 *public_key*."""
    if len(public_key) != _KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {_KEY_BYTES} bytes, got {len(public_key)}")
    bits = int.from_bytes(public_key, "big") << _KEY_PADDING_BITS
    key_symbols = [(bits >> 5 * (_KEY_SYMBOLS - 1 - i)) & 31 for i in range(_KEY_SYMBOLS)]
    return bech32m_encode(ADDRESS_HRP, [ADDRESS_VERSION, *key_symbols])


def decode_address(text: str) -> bytes:
    """The 32-byte public key in the p2pchat address *text*.

    Surrounding whitespace and an all-uppercase address are accepted.  Anything else that is not exactly an
    address raises :class:`~p2pchat.errors.AddressError` with a one-line message naming the problem -- for a
    typo the checksum can pin down, the character to fix.
    """
    address = text.strip()
    if not address:
        raise AddressError("the address is empty")
    lowered = address.translate(_TO_LOWER)
    if not lowered.startswith(ADDRESS_PREFIX):
        raise AddressError(_prefix_typo(lowered) or _NOT_OURS)
    if _UPPER.intersection(address) and _LOWER.intersection(address):
        raise AddressError("the address mixes upper- and lower-case letters; write it all in one case")
    data_text = lowered[len(ADDRESS_PREFIX) :]
    bad = [index for index, char in enumerate(data_text) if char not in _SYMBOL_VALUE]
    if bad:
        raise AddressError(_bad_character_message(data_text, bad))
    if len(lowered) != ADDRESS_LENGTH:
        raise AddressError(_length_message(len(lowered)))
    data = [_SYMBOL_VALUE[char] for char in data_text]
    if not bech32m_verify(ADDRESS_HRP, data):
        raise AddressError(_checksum_message(data))
    if data[0] != ADDRESS_VERSION:
        raise AddressError(
            f"the address has version {data[0]}, which this p2pchat does not know; it may need a newer p2pchat"
        )
    key = _key_from_data(data)
    if key is None:
        raise AddressError("the address is malformed (stray bits after the key); check it against the original")
    return key


def _key_from_data(data: Sequence[int]) -> bytes | None:
    """The key in checksummed address symbols, or None for an unknown version or non-zero padding."""
    if data[0] != ADDRESS_VERSION:
        return None
    bits = 0
    for value in data[1 : 1 + _KEY_SYMBOLS]:
        bits = bits << 5 | value
    if bits & ((1 << _KEY_PADDING_BITS) - 1):
        return None
    return (bits >> _KEY_PADDING_BITS).to_bytes(_KEY_BYTES, "big")


def _is_address(text: str) -> bool:
    """Whether lower-case *text* is exactly a valid address (no diagnosis; used to test candidate fixes)."""
    if len(text) != ADDRESS_LENGTH or not text.startswith(ADDRESS_PREFIX):
        return False
    data_text = text[len(ADDRESS_PREFIX) :]
    if any(char not in _SYMBOL_VALUE for char in data_text):
        return False
    data = [_SYMBOL_VALUE[char] for char in data_text]
    return bech32m_verify(ADDRESS_HRP, data) and _key_from_data(data) is not None


def _prefix_typo(text: str) -> str | None:
    """Explain a mangled ``p2p1`` prefix when one edit of it (or a swap across it) makes *text* valid."""
    fixes = set()
    for index, expected in enumerate(ADDRESS_PREFIX):
        fixed = text[:index] + expected + text[index + 1 :]
        if fixed != text and _is_address(fixed):
            fixes.add(_substitution_message(index, expected))
    for index in range(len(ADDRESS_PREFIX)):
        swapped = text[:index] + text[index + 1 : index + 2] + text[index : index + 1] + text[index + 2 :]
        if swapped != text and _is_address(swapped):
            fixes.add(_swap_message(index))
    return fixes.pop() if len(fixes) == 1 else None


def _bad_character_message(data_text: str, bad: Sequence[int]) -> str:
    """Name the first character outside the bech32 alphabet, and the likely right one when it can be found."""
    index = bad[0]
    position = len(ADDRESS_PREFIX) + index + 1
    message = (
        f"character {position} of the address, {data_text[index]!r}, cannot appear in a p2pchat address "
        "(after p2p1 only lowercase letters and digits are used, and never b, i, o or 1)"
    )
    if len(bad) == 1 and len(ADDRESS_PREFIX) + len(data_text) == ADDRESS_LENGTH:
        guess = _guess_symbol(data_text, index)
        if guess is not None:
            message += f"; it should probably be {guess!r}"
    return message


def _guess_symbol(data_text: str, index: int) -> str | None:
    """The one alphabet character at *index* that makes the otherwise sound *data_text* valid, if any."""
    data = [_SYMBOL_VALUE.get(char, 0) for char in data_text]
    fits = []
    for value in range(32):
        data[index] = value
        if bech32m_verify(ADDRESS_HRP, data) and _key_from_data(data) is not None:
            fits.append(BECH32_ALPHABET[value])
    return fits[0] if len(fits) == 1 else None


def _length_message(length: int) -> str:
    """Say whether the address is too short or too long."""
    if length < ADDRESS_LENGTH:
        return f"the address is too short ({length} characters instead of {ADDRESS_LENGTH}); part of it is missing"
    return f"the address is too long ({length} characters instead of {ADDRESS_LENGTH}); it has extra characters"


def _substitution_message(index: int, expected: str) -> str:
    """The message for a single wrong character at 0-based string *index*."""
    return f"the address has a typo: character {index + 1} should probably be {expected!r}"


def _swap_message(index: int) -> str:
    """The message for the characters at 0-based string *index* and the next one being swapped."""
    return f"the address has a typo: characters {index + 1} and {index + 2} look swapped"


def _checksum_message(data: list[int]) -> str:
    """Explain a checksum failure, naming the typo when exactly one small edit explains it."""
    fixes = [message for message, fixed in _candidate_fixes(data) if _key_from_data(fixed) is not None]
    return fixes[0] if len(fixes) == 1 else _UNLOCATED_TYPO


def _candidate_fixes(data: list[int]) -> list[tuple[str, list[int]]]:
    """Every single substitution and adjacent swap of *data* that makes its checksum valid.

    The checksum register is linear over GF(2), so an error pattern changes the final residue by an amount
    that depends only on the pattern.  Looking the residue up in a table of single-symbol error effects finds
    the substitution in one step; trying each value at each position would cost ~1,800 checksum runs per call.
    """
    syndrome = _polymod([*_hrp_expand(ADDRESS_HRP), *data]) ^ BECH32M_CONST
    effects = _error_effects(len(data))
    offset = len(ADDRESS_PREFIX)
    fixes = []
    hit = _error_index(len(data)).get(syndrome)
    if hit is not None:
        index, delta = hit
        fixed = data.copy()
        fixed[index] ^= delta
        fixes.append((_substitution_message(offset + index, BECH32_ALPHABET[fixed[index]]), fixed))
    for index in range(len(data) - 1):
        delta = data[index] ^ data[index + 1]
        if delta and effects[index][delta] ^ effects[index + 1][delta] == syndrome:
            fixed = data.copy()
            fixed[index], fixed[index + 1] = fixed[index + 1], fixed[index]
            fixes.append((_swap_message(offset + index), fixed))
    # The table lookups rest on the linearity argument above; the direct check keeps a mistake there harmless.
    return [(message, fixed) for message, fixed in fixes if bech32m_verify(ADDRESS_HRP, fixed)]


@functools.cache
def _error_effects(length: int) -> tuple[tuple[int, ...], ...]:
    """``effects[i][delta]``: how XOR-ing *delta* into symbol *i* of *length* symbols changes the residue."""
    # An error in the last symbol changes the residue by itself; each later symbol shifts that effect through
    # one more step of the register with a zero input.
    row = tuple(range(32))
    rows = [row]
    for _ in range(length - 1):
        row = tuple(_polymod([0], effect) for effect in row)
        rows.append(row)
    return tuple(reversed(rows))


@functools.cache
def _error_index(length: int) -> dict[int, tuple[int, int]]:
    """Residue change -> (symbol index, XOR delta) for every single-symbol error in *length* data symbols.

    Within BIP-350's length limit the code's distance is at least 5, so no two single errors collide.
    """
    effects = _error_effects(length)
    return {effects[index][delta]: (index, delta) for index in range(length) for delta in range(1, 32)}
