"""Remote names: prefix first, readable stem, UTC timestamp, short hash, parts, safety, length."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import ImportsConfig, ImportType
from agent.imports.naming import MAX_REMOTE_NAME, readable_stem, remote_name

CFG = ImportsConfig()
WHEN = datetime(2024, 3, 5, 14, 7, 9, tzinfo=UTC)
SHA = "ab12cd34" + "0" * 56
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _name(original: str, import_type: ImportType = ImportType.USERS, **kwargs: object) -> str:
    return remote_name(CFG.prefixes.for_type(import_type), original, SHA, WHEN, **kwargs)  # type: ignore[arg-type]


def test_shape() -> None:
    assert _name("march export.csv") == "users_march-export_20240305T140709000Z_ab12cd34.csv"
    assert _name("events.JSONL", ImportType.USER_EVENTS) == \
        "userEvents_events_20240305T140709000Z_ab12cd34.jsonl"


def test_prefix_not_repeated() -> None:
    assert _name("users_march.csv") == "users_march_20240305T140709000Z_ab12cd34.csv"
    assert _name("USERS-march.csv") == "users_march_20240305T140709000Z_ab12cd34.csv"
    assert _name("users.march.csv") == "users_march_20240305T140709000Z_ab12cd34.csv"
    assert _name("users.csv") == "users_20240305T140709000Z_ab12cd34.csv"
    assert _name("usersmarch.csv") == "users_usersmarch_20240305T140709000Z_ab12cd34.csv"
    assert _name("deleteUsers_gdpr.csv", ImportType.DELETE_USERS).startswith("deleteUsers_gdpr_")


def test_parts() -> None:
    assert _name("big.csv", part=(2, 7)) == "users_big_20240305T140709000Z_ab12cd34_part2of7.csv"
    names = {_name("big.csv", part=(k, 3)) for k in (1, 2, 3)}
    assert len(names) == 3
    for bad in ((0, 3), (4, 3), (1, 0)):
        with pytest.raises(ValueError, match="part"):
            _name("big.csv", part=bad)


def test_timestamp_is_utc() -> None:
    local = WHEN.astimezone(timezone(timedelta(hours=-5)))
    assert remote_name("users", "a.csv", SHA, local) == _name("a.csv")
    with pytest.raises(ValueError, match="timezone-aware"):
        remote_name("users", "a.csv", SHA, datetime(2024, 1, 1))


def test_unique_and_deterministic() -> None:
    assert _name("a.csv") == _name("a.csv")
    other_hash = remote_name("users", "a.csv", "ff" * 32, WHEN)
    other_time = remote_name("users", "a.csv", SHA, WHEN + timedelta(seconds=1))
    assert len({_name("a.csv"), other_hash, other_time, _name("b.csv")}) == 4


@pytest.mark.parametrize(("original", "stem"), [
    ("Café Export (1).csv", "Cafe-Export-1"),
    ("../../etc/passwd.csv", "etc-passwd"),
    ("..\\..\\win.csv", "win"),
    ("line\nbreak\r\ttab.csv", "line-break-tab"),
    (".hidden.csv", "hidden"),
    ("naïve—dash 😀 emoji.csv", "naive-dash-emoji"),
    ("日本語.csv", ""),
    ("a..b...c.csv", "a-b-c"),
    ("x\x00y\x7fz.csv", "x-y-z"),
])
def test_unusual_characters_are_replaced(original: str, stem: str) -> None:
    assert readable_stem(original, "users") == stem
    name = _name(original)
    assert SAFE.fullmatch(name) and ".." not in name and "/" not in name


def test_length_is_bounded_and_stem_truncated() -> None:
    name = _name("x" * 500 + ".csv", part=(12, 99))
    assert len(name) == MAX_REMOTE_NAME
    assert name.startswith("users_xxx") and name.endswith("_ab12cd34_part12of99.csv")
    assert len(_name("a.csv", max_length=60)) <= 60


def test_unsafe_prefix_or_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="not safe"):
        remote_name("../up", "a.csv", SHA, WHEN)
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        _name("a.txt")
    with pytest.raises(ValueError, match="hexadecimal"):
        remote_name("users", "a.csv", "not-a-hash", WHEN)


@given(st.text(min_size=1, max_size=300), st.sampled_from(list(ImportType)),
       st.sampled_from([".csv", ".JSONL"]), st.one_of(st.none(), st.tuples(
           st.integers(1, 50), st.integers(50, 999))))
def test_any_name_gives_a_safe_remote_name(stem: str, import_type: ImportType, ext: str,
                                           part: tuple[int, int] | None) -> None:
    name = remote_name(CFG.prefixes.for_type(import_type), stem + ext, SHA, WHEN, part)
    assert name.startswith(CFG.prefixes.for_type(import_type) + "_")
    assert SAFE.fullmatch(name), name
    assert ".." not in name and len(name) <= MAX_REMOTE_NAME
    assert name.endswith(ext.lower()) and name.count(".") == 1
    assert "_20240305T140709000Z_ab12cd34" in name
