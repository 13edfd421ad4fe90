"""Per-type field rules: which fields are required, and how typed fields are checked.

Field names are SaaSquatch's, case-sensitive, in the CSV flattening (`event.key`); JSONL records are
flattened to the same dotted paths before they are checked. A checker takes the text of a
non-empty value and returns None when it is fine or a message saying what is wrong.

Reward redemption: the Available Balance Report's columns are not published as text, so only the
columns every redemption needs are required: `accountId` and `userId` (whose balance) and
`valueToRedeem`. SaaSquatch skips rows whose `valueToRedeem` did not change; we are stricter and
require it in every record, so an unedited report is never sent by mistake: remove the rows you
do not redeem.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from agent.imports.types import ImportType

Checker = Callable[[str], str | None]

REQUIRED: dict[ImportType, tuple[str, ...]] = {
    ImportType.USERS: ("accountId", "id"),
    ImportType.USER_EVENTS: ("accountId", "userId", "event.key"),
    ImportType.DELETE_USERS: ("accountId", "id"),
    ImportType.REWARD_REDEMPTIONS: ("accountId", "userId", "valueToRedeem"),
}

# Millisecond timestamps between 1973-03-03 and 2286-11-20. Below that the value is almost surely
# in seconds (1.7e9 today), above it in micro- or nanoseconds.
MIN_MILLIS = 100_000_000_000
MAX_MILLIS = 10_000_000_000_000

_BOOLEANS = frozenset(("true", "false"))
_LOCALE = re.compile(r"[a-z]{2,3}_[A-Z]{2}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")


def shown(value: str, limit: int = 40) -> str:
    """A value quoted for a message, shortened, control characters escaped."""
    text = value if len(value) <= limit else value[: limit - 3] + "..."
    return repr(text)


def check_boolean(value: str) -> str | None:
    if value.lower() in _BOOLEANS:
        return None
    return f"must be true or false, got {shown(value)}"


def check_integer(value: str) -> str | None:
    if _DIGITS.fullmatch(value):
        return None
    return f"must be a whole number, got {shown(value)}"


def check_millis(value: str) -> str | None:
    if not _DIGITS.fullmatch(value):
        return f"must be a timestamp in milliseconds (a whole number), got {shown(value)}"
    number = int(value)
    if number < MIN_MILLIS:
        return (f"{value} is too small for a timestamp in milliseconds; it looks like seconds "
                "(multiply by 1000)")
    if number >= MAX_MILLIS:
        return (f"{shown(value)} is too large for a timestamp in milliseconds; it looks like "
                "microseconds or nanoseconds")
    return None


def check_locale(value: str) -> str | None:
    if _LOCALE.fullmatch(value):
        return None
    return (f"must be language_COUNTRY with a lowercase language and an uppercase country "
            f"(e.g. en_US), got {shown(value)}")


def check_country(value: str) -> str | None:
    if _COUNTRY.fullmatch(value):
        return None
    return f"must be a two-letter uppercase country code (e.g. CA), got {shown(value)}"


def check_positive_number(value: str) -> str | None:
    if _DECIMAL.fullmatch(value):
        try:
            if Decimal(value) > 0:
                return None
        except InvalidOperation:  # pragma: no cover - the pattern already excludes it
            pass
        return f"must be a positive number, got {shown(value)} (zero is not redeemed)"
    if value.startswith("-"):
        return f"must be a positive number, got the negative {shown(value)}"
    return f"must be a positive number like 10 or 12.5 (no signs, units or commas), got {shown(value)}"


TYPED: dict[ImportType, dict[str, Checker]] = {
    ImportType.USERS: {
        "referable": check_boolean,
        "referredBy.isConverted": check_boolean,
        "locale": check_locale,
        "countryCode": check_country,
        "dateUsTaxFormSubmitted": check_integer,
    },
    ImportType.USER_EVENTS: {
        "event.dateTriggered": check_millis,
    },
    ImportType.DELETE_USERS: {
        "preserveEmptyAccount": check_boolean,
        "doNotTrack": check_boolean,
    },
    ImportType.REWARD_REDEMPTIONS: {
        "valueToRedeem": check_positive_number,
    },
}

# Types whose `customFields.*` must be scalars (only JSONL can carry anything else).
SCALAR_CUSTOM_FIELDS = frozenset((ImportType.USERS,))
