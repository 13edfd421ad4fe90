"""Import types: job types, typing by prefix or folder, refusals, the deletion guard."""

from __future__ import annotations

import pytest

from agent.config import ImportsConfig, ImportType, PerTypeNames
from agent.imports.types import (
    JOB_TYPES,
    FileFormat,
    Refusal,
    RefusalCode,
    classify,
    file_format,
    job_type,
)

CFG = ImportsConfig()


def test_job_types() -> None:
    assert job_type(ImportType.USERS) == "MUTATION/USER"
    assert job_type(ImportType.USER_EVENTS) == "MUTATION/USER_EVENT"
    assert job_type(ImportType.DELETE_USERS) == "MUTATION/DELETE_USER"
    assert job_type(ImportType.REWARD_REDEMPTIONS) == "MUTATION/REDEEMABLE_REWARD_BALANCE"
    assert set(JOB_TYPES) == set(ImportType)


@pytest.mark.parametrize(("name", "expected"), [
    ("users_2024.csv", ImportType.USERS),
    ("USERS-2024.csv", ImportType.USERS),
    ("users.csv", ImportType.USERS),
    ("Users.March.jsonl", ImportType.USERS),
    ("userEvents_march.csv", ImportType.USER_EVENTS),
    ("userevents-march.jsonl", ImportType.USER_EVENTS),
    ("deleteUsers_gdpr.csv", ImportType.DELETE_USERS),
    ("rewardRedemptions_q1.csv", ImportType.REWARD_REDEMPTIONS),
    ("users_with spaces and ünïcode.csv", ImportType.USERS),
    ("users_line\nbreak.csv", ImportType.USERS),
])
def test_typed_by_prefix(name: str, expected: ImportType) -> None:
    result = classify(name, None, CFG)
    assert result.ok and result.import_type == expected and result.by_prefix
    assert result.job_type == JOB_TYPES[expected]


def test_longest_prefix_wins() -> None:
    cfg = ImportsConfig(prefixes=PerTypeNames(
        users="users", user_events="users-events", delete_users="users-delete",
        reward_redemptions="rewards"))
    assert classify("users-events_x.csv", None, cfg).import_type == ImportType.USER_EVENTS
    assert classify("users-delete.csv", None, cfg).import_type == ImportType.DELETE_USERS
    assert classify("users-x.csv", None, cfg).import_type == ImportType.USERS


@pytest.mark.parametrize("folder", ["users", "user-events", "delete-users", "reward-redemptions"])
def test_typed_by_folder(folder: str) -> None:
    result = classify("export.csv", folder, CFG)
    assert result.ok and result.by_folder and not result.by_prefix
    assert CFG.folders.for_type(result.import_type) == folder  # type: ignore[arg-type]


def test_folder_and_prefix_agreeing_is_fine() -> None:
    result = classify("users_x.csv", "users", CFG)
    assert result.import_type == ImportType.USERS and result.by_prefix and result.by_folder


def _refused(result: object, code: RefusalCode) -> str:
    refusal = result.refusal  # type: ignore[attr-defined]
    assert not result.ok  # type: ignore[attr-defined]
    assert isinstance(refusal, Refusal) and refusal.code == code, refusal
    return refusal.message


def test_wrong_prefix_lists_prefixes_and_folders() -> None:
    message = _refused(classify("customers_2024.csv", None, CFG), RefusalCode.NO_TYPE)
    assert "customers_2024.csv" in message
    for prefix in ("users_", "userEvents_", "deleteUsers_", "rewardRedemptions_"):
        assert prefix in message
    for folder in ("drop/users/", "drop/user-events/", "drop/delete-users/",
                   "drop/reward-redemptions/"):
        assert folder in message


@pytest.mark.parametrize("name", ["2024-03.csv", "usersexport.csv", "my_users.csv", "users"])
def test_missing_prefix_is_refused(name: str) -> None:
    assert "has no import type" in _refused(classify(name, None, CFG), RefusalCode.NO_TYPE)


def test_folder_prefix_disagreement_names_both() -> None:
    message = _refused(classify("deleteUsers_x.csv", "users", CFG), RefusalCode.TYPE_CONFLICT)
    assert "drop/users/" in message and "users folder" in message
    assert "user deletion prefix 'deleteUsers'" in message
    message = _refused(classify("users_x.csv", "delete-users", CFG), RefusalCode.TYPE_CONFLICT)
    assert "user deletion folder" in message and "users prefix 'users'" in message


def test_unknown_subfolder() -> None:
    message = _refused(classify("users_x.csv", "misc", CFG), RefusalCode.UNKNOWN_FOLDER)
    assert "drop/misc/" in message and "drop/user-events/" in message


@pytest.mark.parametrize("name", ["../users_x.csv", "a/users_x.csv", "", "..", "users\x00.csv"])
def test_path_like_names_are_refused(name: str) -> None:
    assert "not a plain file name" in _refused(classify(name, None, CFG), RefusalCode.BAD_NAME)


def test_deletion_guard_blocks_fallback() -> None:
    message = _refused(classify("gdpr.csv", None, CFG, fallback=ImportType.DELETE_USERS),
                       RefusalCode.DELETION_GUARD)
    assert "cannot be undone" in message and "drop/delete-users/" in message
    assert "'deleteUsers_'" in message
    # Explicit routes still work under the guard.
    assert classify("deleteUsers_gdpr.csv", None, CFG).import_type == ImportType.DELETE_USERS
    assert classify("gdpr.csv", "delete-users", CFG).import_type == ImportType.DELETE_USERS
    # Without the guard the fallback may say deletion.
    unguarded = ImportsConfig(deletion_guard=False)
    result = classify("gdpr.csv", None, unguarded, fallback=ImportType.DELETE_USERS)
    assert result.import_type == ImportType.DELETE_USERS


def test_fallback_types_untyped_names_but_never_overrides() -> None:
    assert classify("export.csv", None, CFG, fallback=ImportType.USERS).import_type == \
        ImportType.USERS
    message = _refused(classify("deleteUsers_x.csv", None, CFG, fallback=ImportType.USERS),
                       RefusalCode.TYPE_CONFLICT)
    assert "name prefix says user deletion" in message


def test_duplicate_configured_prefixes_are_ambiguous() -> None:
    cfg = ImportsConfig.model_construct(prefixes=PerTypeNames(
        users="users", user_events="Users", delete_users="del", reward_redemptions="rew"))
    message = _refused(classify("users_x.csv", None, cfg), RefusalCode.AMBIGUOUS_CONFIG)
    assert "[imports.prefixes]" in message


@pytest.mark.parametrize(("name", "expected"), [
    ("users_a.csv", FileFormat.CSV),
    ("users_a.CSV", FileFormat.CSV),
    ("users_a.jsonl", FileFormat.JSONL),
    ("users_a.JsonL", FileFormat.JSONL),
])
def test_file_format(name: str, expected: FileFormat) -> None:
    assert file_format(name) == expected


@pytest.mark.parametrize(("name", "shown"), [
    ("users_a.txt", "'.txt'"),
    ("users_a.xlsx", "'.xlsx'"),
    ("users_a.json", "'.json'"),
    ("users_a.csv.gz", "'.gz'"),
    ("users_a", "no extension"),
    (".csv", "no name before its extension"),
])
def test_wrong_extension(name: str, shown: str) -> None:
    refusal = file_format(name)
    assert isinstance(refusal, Refusal) and refusal.code == RefusalCode.BAD_EXTENSION
    assert shown in refusal.message and ".csv or .jsonl" in refusal.message
