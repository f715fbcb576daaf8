"""HKDF-SHA256 (p2pchat.core.kdf) against RFC 5869's test vectors, and its output limit."""

from __future__ import annotations

import pytest

from p2pchat.core.kdf import HKDF_MAX_BYTES, hkdf_expand, hkdf_extract, hkdf_sha256


@pytest.mark.parametrize(
    ("ikm", "salt", "info", "length", "prk", "okm"),
    [
        (
            bytes([0x0B]) * 22,
            bytes(range(0x0D)),
            bytes(range(0xF0, 0xFA)),
            42,
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            bytes(range(0x50)),
            bytes(range(0x60, 0xB0)),
            bytes(range(0xB0, 0x100)),
            82,
            "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09da"
            "3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            bytes([0x0B]) * 22,
            b"",
            b"",
            42,
            "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ],
)
def test_hkdf_matches_rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int, prk: str, okm: str) -> None:
    assert hkdf_extract(salt=salt, ikm=ikm).hex() == prk
    assert hkdf_expand(prk=bytes.fromhex(prk), info=info, length=length).hex() == okm
    assert hkdf_sha256(salt=salt, ikm=ikm, info=info, length=length).hex() == okm


def test_output_length_limit_is_reached_and_enforced() -> None:
    longest = hkdf_sha256(salt=b"salt", ikm=b"ikm", info=b"info", length=HKDF_MAX_BYTES)
    assert len(longest) == HKDF_MAX_BYTES
    # Expand is a stream: a shorter output is a prefix of a longer one.
    assert hkdf_sha256(salt=b"salt", ikm=b"ikm", info=b"info", length=42) == longest[:42]
    for length in (0, HKDF_MAX_BYTES + 1):
        with pytest.raises(ValueError, match="derives 1"):
            hkdf_sha256(salt=b"salt", ikm=b"ikm", info=b"info", length=length)


def test_empty_salt_is_the_zero_salt() -> None:
    assert hkdf_extract(salt=b"", ikm=b"ikm") == hkdf_extract(salt=bytes(32), ikm=b"ikm")
    assert hkdf_extract(salt=b"", ikm=b"ikm") != hkdf_extract(salt=b"\x01", ikm=b"ikm")
