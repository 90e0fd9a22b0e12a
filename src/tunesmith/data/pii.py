"""Personal data and secrets in text: e-mail addresses, phone numbers, card numbers
(Luhn-checked), IBANs (mod-97-checked), IP addresses and API keys, each with its span.

Patterns are deliberately conservative: a number is a card only if its digits pass the
Luhn check, an IBAN only if it passes ISO 13616's mod-97 check, an IPv4 address only with
four octets of at most 255. Phone numbers have no checksum, so they need a phone-like
shape (a leading +, or groups split by spaces, dots, dashes or parentheses) and 9 to 15
digits; a plain run of digits (an order number) is not reported.

    python -c "from tunesmith.data.pii import find_pii; print(find_pii('mail me: ann@example.com'))"
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

KINDS = ("email", "phone", "card_number", "iban", "ip_address", "api_key")

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|[0-9A-Fa-f]{1,4})(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,5}(?![\w])"
    r"|(?<![\w+])\+\d{9,15}(?!\w)"
)
_KEYS = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{20,}|sk_live_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|xox[baprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,})"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
# What each pattern cannot match without (a card has 13 digits, a phone number 9, an IPv4
# address 4 and dots, an IBAN 2, an e-mail address an @, an IPv6 address a colon, a key
# its prefix): the audit calls find_pii on every message of every row, and most messages
# (answers, labels, questions with an order number) can hold none of them, so most texts
# are scanned once or twice instead of seven times.
_DIGIT = re.compile(r"\d")
_KEY_HINT = re.compile(r"sk[-_]|AKIA|gh[pousr]_|xox[baprs]-|AIza|hf_|-----BEGIN")


@dataclass(frozen=True)
class PiiMatch:
    kind: str
    start: int
    end: int
    text: str

    def masked(self) -> str:
        """The match with most characters hidden, so a report does not spread the data further."""
        t = self.text
        keep = 2 if len(t) > 6 else 1
        return t[:keep] + "*" * max(1, len(t) - 2 * keep) + t[-keep:]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def find_pii(text: str) -> list[PiiMatch]:
    """Every match in the text, in order of position; a span is reported under one kind only."""
    found: list[PiiMatch] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, m: re.Match) -> None:
        s, e = m.span()
        if any(s < te and ts < e for ts, te in taken):
            return
        taken.append((s, e))
        found.append(PiiMatch(kind, s, e, m.group()))

    digits = _count_digits(text)
    # Order matters: the checked kinds first, so that a card number is not also a phone number.
    if _KEY_HINT.search(text):
        for m in _KEYS.finditer(text):
            add("api_key", m)
    if "@" in text:
        for m in _EMAIL.finditer(text):
            add("email", m)
    if digits >= 2:
        for m in _IBAN.finditer(text):
            if iban_ok(m.group()):
                add("iban", m)
    if digits >= 13:
        for m in _CARD.finditer(text):
            number = re.sub(r"\D", "", m.group())
            if 13 <= len(number) <= 19 and len(set(number)) > 1 and luhn_ok(number):
                add("card_number", m)
    if digits >= 4 and "." in text:
        for m in _IPV4.finditer(text):
            if all(int(p) <= 255 for p in m.group().split(".")):
                add("ip_address", m)
    if ":" in text:
        for m in _IPV6.finditer(text):
            try:
                ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            add("ip_address", m)
    if digits >= 9:
        for m in _PHONE.finditer(text):
            if _phone_like(m.group()):
                add("phone", m)
    return sorted(found, key=lambda p: p.start)


def _count_digits(text: str) -> int:
    """The text's digits as the patterns' \\d counts them (Unicode decimals)."""
    if text.isascii():
        return sum(map(text.count, "0123456789"))  # ten scans in C, faster than the regex
    return len(_DIGIT.findall(text))


def _phone_like(s: str) -> bool:
    digits = sum(c.isdigit() for c in s)
    if not 9 <= digits <= 15:
        return False
    # Dates (2024-01-31), times and amounts (1.234.567) are not phone numbers: ask for a
    # leading + or parentheses, or at least three groups with no group of one digit.
    if s.startswith("+") or "(" in s:
        return True
    groups = re.split(r"[ .-]", s)
    return len(groups) >= 3 and not _date_like(s)


def _date_like(s: str) -> bool:
    return bool(re.fullmatch(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}", s))
