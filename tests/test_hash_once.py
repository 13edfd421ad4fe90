"""Intake reads a file once for its SHA-256 and its validation (issue 7): admit(digest=None)
hashes while validating, and never returns a wrong hash (a second pass voids it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.config import ImportsConfig
from agent.imports.admission import admit


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("name", "data"), [
    ("users_ok.csv", b"accountId,id,email\n" + b"".join(
        f"acct-{i},u{i},u{i}@example.com\n".encode() for i in range(20_000))),
    ("users_ok.jsonl", b"".join(
        f'{{"accountId": "acct-{i}", "id": "u{i}", "email": "u{i}@example.com"}}\n'.encode()
        for i in range(5_000))),
])
def test_valid_file_is_hashed_while_validated(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    verdict = admit(path, name, None, None, ImportsConfig())
    assert verdict.ok, verdict.refusal
    assert verdict.sha256 == sha(path)
    assert verdict.remote_name is not None and sha(path)[:8] in verdict.remote_name
    given = admit(path, name, None, "0" * 64, ImportsConfig())  # a caller's digest is used as given
    assert given.sha256 == "0" * 64


@pytest.mark.parametrize("data", [
    b"accountId,id,email\nacct-1,u1,\xff\xfe@example.com\n",  # bad UTF-8: located by a second pass
    b"accountId,id\nacct-1,\n",  # a rule broken: read to the end
    b"",  # empty: refused before reading
])
def test_refused_file_has_the_right_hash_or_none(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "users_bad.csv"
    path.write_bytes(data)
    verdict = admit(path, path.name, None, None, ImportsConfig())
    assert not verdict.ok
    assert verdict.sha256 in (None, sha(path))
