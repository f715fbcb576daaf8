"""Addresses: Bech32m round trip, BIP-350 vectors, and a helpful message for every kind of mistake."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pchat.core.address import (
    ADDRESS_HRP,
    ADDRESS_LENGTH,
    BECH32_ALPHABET,
    bech32m_checksum,
    bech32m_decode,
    bech32m_encode,
    bech32m_verify,
    decode_address,
    encode_address,
)
from p2pchat.errors import AddressError

# BIP-350, "Test vectors for Bech32m": valid strings.
BIP350_VALID = [
    "A1LQFN3A",
    "a1lqfn3a",
    "an83characterlonghumanreadablepartthatcontainsthetheexcludedcharactersbioandnumber11sg7hg6",
    "abcdef1l7aum6echk45nj3s0wdvt2fg8x9yrzpqzd3ryx",
    "11llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllludsr8",
    "split1checkupstagehandshakeupstreamerranterredcaperredlc445v",
    "?1v759aa",
]

# BIP-350, invalid strings, with the reason the BIP gives.
BIP350_INVALID = [
    "\x201xj0phk",  # HRP character out of range
    "\x7f1g6xzxy",  # HRP character out of range
    "\x801vctc34",  # HRP character out of range
    # overall max length exceeded
    "an84characterslonghumanreadablepartthatcontainsthetheexcludedcharactersbioandnumber11d6pts4",
    "qyrz8wqd2c9m",  # no separator character
    "1qyrz8wqd2c9m",  # empty HRP
    "y1b0jsk6g",  # invalid data character
    "lt1igcx5c0",  # invalid data character
    "in1muywd",  # too short checksum
    "mm1crxm3i",  # invalid character in checksum
    "au1s5cgom",  # invalid character in checksum
    "M1VUXWEZ",  # checksum calculated with uppercase form of HRP
    "16plkw9",  # empty HRP
    "1p2gdwpf",  # empty HRP
]

# BIP-173's valid (original bech32) strings: their checksums must not pass as bech32m.
BIP173_VALID = [
    "A12UEL5L",
    "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
]

KEYS = [bytes(32), b"\xff" * 32, bytes(range(32)), bytes.fromhex("d75a980182b10ab7d54bfed3c964073a" * 2)]
GARBAGE = [*string.ascii_uppercase, "b", "i", "o", "1", " ", "!", "-", "é", "\x00", "\u200b"]


def _symbols(text: str) -> list[int]:
    return [BECH32_ALPHABET.index(char) for char in text]


def _error(text: str) -> str:
    with pytest.raises(AddressError) as caught:
        decode_address(text)
    return str(caught.value)


@pytest.mark.parametrize("text", BIP350_VALID)
def test_bip350_valid_vectors(text: str) -> None:
    lowered = text.lower()
    separator = lowered.rfind("1")
    hrp, data = lowered[:separator], _symbols(lowered[separator + 1 :])
    assert bech32m_verify(hrp, data)
    assert bech32m_checksum(hrp, data[:-6]) == data[-6:]
    assert bech32m_decode(text) == (hrp, data[:-6])
    assert bech32m_encode(hrp, data[:-6]) == lowered


@pytest.mark.parametrize("text", BIP350_INVALID)
def test_bip350_invalid_vectors(text: str) -> None:
    with pytest.raises(ValueError):
        bech32m_decode(text)


@pytest.mark.parametrize("text", BIP173_VALID)
def test_bech32_checksums_are_not_bech32m(text: str) -> None:
    lowered = text.lower()
    separator = lowered.rfind("1")
    assert not bech32m_verify(lowered[:separator], _symbols(lowered[separator + 1 :]))


@given(st.binary(min_size=32, max_size=32))
def test_round_trip(key: bytes) -> None:
    address = encode_address(key)
    assert address.startswith("p2p1q")
    assert len(address) == ADDRESS_LENGTH == 63
    assert decode_address(address) == key


@given(st.binary(min_size=32, max_size=32))
def test_whitespace_and_uppercase_are_accepted(key: bytes) -> None:
    address = encode_address(key)
    assert decode_address(f" \t{address}\n") == key
    assert decode_address(address.upper()) == key
    assert decode_address(f"  {address.upper()}  ") == key


def test_encode_needs_a_32_byte_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encode_address(bytes(33))


@pytest.mark.parametrize("key", KEYS)
def test_every_substitution_is_rejected_and_located(key: bytes) -> None:
    address = encode_address(key)
    for index, original in enumerate(address):
        position = index + 1
        for char in BECH32_ALPHABET + ADDRESS_HRP:
            if char == original:
                continue
            mangled = address[:index] + char + address[index + 1 :]
            assert _error(mangled) == f"the address has a typo: character {position} should probably be {original!r}"
        for char in GARBAGE:
            mangled = address[:index] + char + address[index + 1 :]
            if mangled == address:
                continue
            message = _error(mangled)
            if char in "bio1" and index >= 4:
                assert f"character {position} of the address, {char!r}," in message
                assert message.endswith(f"it should probably be {original!r}")


@pytest.mark.parametrize("key", KEYS)
def test_every_adjacent_swap_is_rejected_and_located(key: bytes) -> None:
    address = encode_address(key)
    for index in range(len(address) - 1):
        if address[index] == address[index + 1]:
            continue
        swapped = address[:index] + address[index + 1] + address[index] + address[index + 2 :]
        assert _error(swapped) == f"the address has a typo: characters {index + 1} and {index + 2} look swapped"


def test_two_typos_are_caught_but_not_located() -> None:
    address = encode_address(bytes(range(32)))
    mangled = address[:10] + "x" + address[11:30] + "x" + address[31:]
    assert mangled != address
    assert _error(mangled) == "the address has a typo (checksum mismatch); check it against the original"


def test_empty_address() -> None:
    assert _error("") == "the address is empty"
    assert _error("  \n") == "the address is empty"


@pytest.mark.parametrize(
    "text",
    ["bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "hello", "p2p", "p2pq", "1p2p", "alice@example.org"],
)
def test_wrong_prefix(text: str) -> None:
    assert _error(text) == "not a p2pchat address: it should start with p2p1"


def test_truncated_and_extended_addresses() -> None:
    address = encode_address(bytes(range(32)))
    for length in range(4, len(address)):
        message = _error(address[:length])
        assert message == f"the address is too short ({length} characters instead of 63); part of it is missing"
    assert _error(address + "q") == "the address is too long (64 characters instead of 63); it has extra characters"
    assert _error(address[:20] + "q" + address[20:]).startswith("the address is too long")


def test_mixed_case() -> None:
    address = encode_address(bytes(range(32)))
    assert _error(address[:30] + address[30:].upper()) == (
        "the address mixes upper- and lower-case letters; write it all in one case"
    )
    assert "mixes upper- and lower-case" in _error("P2p1" + address[4:])


def test_character_outside_the_alphabet_is_named_with_its_position() -> None:
    address = encode_address(bytes(range(32)))
    message = _error(address[:16] + "b" + address[17:])
    assert message.startswith("character 17 of the address, 'b', cannot appear in a p2pchat address")
    assert "never b, i, o or 1" in message
    assert message.endswith(f"it should probably be {address[16]!r}")
    two_bad = _error(address[:16] + "o" + address[17:20] + "i" + address[21:])
    assert two_bad.startswith("character 17 of the address, 'o',")
    assert "should probably" not in two_bad
    assert _error(address[:10] + " " + address[10:]).startswith("character 11 of the address, ' ',")


def test_unknown_version() -> None:
    data = _symbols(encode_address(bytes(range(32)))[4:-6])
    data[0] = 1
    assert _error(bech32m_encode(ADDRESS_HRP, data)) == (
        "the address has version 1, which this p2pchat does not know; it may need a newer p2pchat"
    )


def test_nonzero_padding_is_malformed() -> None:
    data = _symbols(encode_address(bytes(range(32)))[4:-6])
    data[-1] |= 1
    assert "malformed" in _error(bech32m_encode(ADDRESS_HRP, data))


def test_a_typo_whose_fix_would_be_an_unknown_version_is_not_suggested() -> None:
    # A wrong version symbol is located like any typo, because only version 0 is a valid fix.
    address = encode_address(bytes(range(32)))
    assert _error(address[:4] + "p" + address[5:]) == "the address has a typo: character 5 should probably be 'q'"
