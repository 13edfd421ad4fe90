"""[imports] prefixes and folders are checked when the configuration is loaded (agent.imports.namerules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, ImportsConfig, load_config
from agent.imports.namerules import check_folder, check_prefix
from tests.test_validate_cli import validate, write_config

PREFIXES = ('[imports.prefixes]\nusers = "{}"\nuser_events = "{}"\ndelete_users = "{}"\n'
            'reward_redemptions = "{}"\n')
FOLDERS = PREFIXES.replace("prefixes", "folders")


@pytest.mark.parametrize(("table", "values", "expected"), [
    (PREFIXES, ("../up", "ev", "del", "rr"), "imports.prefixes': Value error, users: import prefix '../up'"),
    (PREFIXES, ("users", "ev", "a/b", "rr"), "delete_users: import prefix 'a/b' is not safe"),
    (PREFIXES, ("users", "ev\n", "del", "rr"), "user_events: import prefix 'ev\\n'"),
    (PREFIXES, ("users", "ev", "del", ".hidden"), "reward_redemptions: import prefix '.hidden'"),
    (PREFIXES, ("users", "ev", "del", "x" * 41), "not safe"),
    (PREFIXES, ("users", "Users", "del", "rr"), "'users' and 'user_events' have the same prefix 'Users'"),
    (FOLDERS, ("users", "../x", "del", "rr"),
     "imports.folders': Value error, user_events: folder name '../x'"),
    (FOLDERS, ("users", "ev", "del", "a b"), "folder name 'a b' is not a plain subfolder name"),
    (FOLDERS, ("users", "ev", "incoming.tmp", "rr"), "not ending in .tmp"),
    (FOLDERS, ("users", "ev", "users", "rr"), "'users' and 'delete_users' have the same folder 'users'"),
])
def test_unsafe_or_duplicate_names_are_config_errors(tmp_path: Path, table: str, values: tuple[str, ...],
                                                     expected: str) -> None:
    path = write_config(tmp_path, table.format(*(v.replace("\n", "\\n") for v in values)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: key 'imports.") and expected in message, message
    assert "\n" not in message


def test_good_names_load_and_one_rule_serves_both(tmp_path: Path) -> None:
    path = write_config(tmp_path, PREFIXES.format("members", "user.events", "delete-users", "RR_2")
                        + FOLDERS.format("m", "e", "d", "r"))
    imports = load_config(path).imports
    assert imports.prefixes.users == "members" and imports.folders.delete_users == "d"
    ImportsConfig()  # the defaults pass their own checks
    for bad in ("", "a/b", "..", "-x", "x" * 41):
        with pytest.raises(ValueError, match="not safe"):
            check_prefix(bad)
        with pytest.raises(ValueError, match="not a plain subfolder name"):
            check_folder(bad)


def test_cli_exits_2_naming_key_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, PREFIXES.format("users", "users", "del", "rr"))
    data = tmp_path / "users_a.csv"
    data.write_bytes(b"accountId,id\na,1\n")
    result = validate("--config", path, data)
    assert result.returncode == 2
    assert str(path) in result.stderr and "imports.prefixes" in result.stderr
    assert "have the same prefix 'users'" in result.stderr
