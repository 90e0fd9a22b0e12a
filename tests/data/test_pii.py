"""The PII patterns: checksums where there are some, spans, and look-alikes left alone."""

from __future__ import annotations

import pytest

from tunesmith.data.pii import find_pii, iban_ok, luhn_ok


def kinds(text: str) -> list[tuple[str, str]]:
    return [(m.kind, text[m.start:m.end]) for m in find_pii(text)]


@pytest.mark.parametrize("text, expected", [
    ("write to ann.lee+bank@mail.example.co.uk today", [("email", "ann.lee+bank@mail.example.co.uk")]),
    ("card 4111 1111 1111 1111 expired", [("card_number", "4111 1111 1111 1111")]),
    ("card 4111-1111-1111-1111", [("card_number", "4111-1111-1111-1111")]),
    ("card 4111 1111 1111 1112 expired", []),  # fails the Luhn check
    ("IBAN GB82 WEST 1234 5698 7654 32.", [("iban", "GB82 WEST 1234 5698 7654 32")]),
    # Fails mod 97: not an IBAN; its digit groups still have a phone number's shape.
    ("IBAN GB82 WEST 1234 5698 7654 33", [("phone", "1234 5698 7654 33")]),
    ("server 192.168.10.254 is down", [("ip_address", "192.168.10.254")]),
    ("version 999.1.1.1 is out", []),
    ("call +44 20 7946 0958 or (415) 555-0132", [("phone", "+44 20 7946 0958"), ("phone", "(415) 555-0132")]),
    ("call 020 7946 0958", [("phone", "020 7946 0958")]),
    ("on 2024-01-31 I paid 1.234.567", []),
    ("order 123456789 arrived", []),
    ("key sk-abcdefghijklmnopqrstuvwx1234 leaked", [("api_key", "sk-abcdefghijklmnopqrstuvwx1234")]),
    ("I am still waiting on my card?", []),
])
def test_find_pii(text, expected):
    assert kinds(text) == expected


def test_checksums_and_masking():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")
    (m,) = find_pii("ann@example.com")
    assert m.masked() == "an***********om" and (m.start, m.end) == (0, 15)
