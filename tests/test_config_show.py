"""`config show [--defaults]`, the example file and README kept in step with the configuration model,
partial `[imports.prefixes]`/`[imports.folders]` tables, and `doctor`'s fix for each kind of
configuration error (issue 15)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import Field

from agent.config import Config, ConfigError, NotifyConfig, load_config, parse_config
from agent.ops.configshow import MASK, REQUIRED, Key, all_keys, mask, show, tables

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "agent.example.toml"

MINIMAL = """
[sftp]
host = "sftp.example.com"
username = "test_akdq8a9wyvzba"
private_key = "keys/id_ed25519"
known_hosts = "keys/known_hosts"
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, check=False)


def value_at(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def example_lines() -> dict[str, dict[str, str]]:
    """Per table of the example file (commented-out tables too): each key's text after `=`."""
    found: dict[str, dict[str, str]] = {}
    table = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^#?\s*\[([a-z_.]+)\]", line)
        if header:
            table = header[1]
            found.setdefault(table, {})
            continue
        pair = re.match(r"^#?\s*([a-z_0-9]+)\s*=\s*(.+)$", line)
        if pair and table:
            found[table].setdefault(pair[1], pair[2])
    return found


def test_every_key_of_the_model_is_in_the_example_with_its_default() -> None:
    example = example_lines()
    keys = all_keys()
    assert {"imports.duplicate_window_days", "daemon.stop_timeout_seconds"} <= {key.dotted for key in keys}
    for key in keys:
        assert key.name in example.get(key.table, {}), f"{key.dotted} is not in {EXAMPLE.name}"
        line = example[key.table][key.name]
        if key.default is REQUIRED:
            continue
        if key.default is None:  # shown with an example value; the comment says it is unset by default
            assert "default: none" in line, f"{key.dotted}: {line}"
            continue
        value = tomllib.loads(f"v = {line}")["v"]  # the line's comment is TOML's too
        data: dict[str, Any] = tomllib.loads(MINIMAL)
        node = data
        for part in key.table.split("."):
            node = node.setdefault(part, {})
        node[key.name] = value
        config = parse_config(data, Path("/etc/saasquatch-agent/agent.toml"))
        assert value_at(config, key.dotted) == key.default, (key.dotted, value, key.default)


def test_every_key_is_in_the_readme_configuration_reference() -> None:
    readme = REPO.joinpath("README.md").read_text()
    section = readme[readme.index("## Configuration reference"):]
    section = section[:section.index("\n## ", 10)]
    for key in all_keys():
        named = (f"`{key.dotted}`" in section or f"`{key.table}.*`" in section
                 or (f"`{key.name}`" in section and f"`{key.table}." in section))
        assert named, f"{key.dotted} is not in README's configuration reference"


def test_config_show_prints_the_effective_configuration_as_loadable_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL + '\n[notify]\ncommand = "curl -s https://ops:hunter2@hooks.example.com/x"\n'
                    '[imports.prefixes]\nusers = "members"\n')
    result = cli("config", "show", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# effective configuration from {path}")
    assert "hunter2" not in result.stdout and f"https://ops:{MASK}@hooks.example.com/x" in result.stdout
    shown = tomllib.loads(result.stdout)
    assert shown["sftp"]["private_key"] == str(tmp_path.resolve() / "keys" / "id_ed25519")
    assert shown["imports"]["prefixes"] == {"users": "members", "user_events": "userEvents",
                                            "delete_users": "deleteUsers",
                                            "reward_redemptions": "rewardRedemptions"}
    assert shown["status"]["mode"] == ["none"] and shown["daemon"]["stop_timeout_seconds"] == 10.0
    # what it prints loads back as the same configuration (the masked command aside)
    again = tmp_path / "again.toml"
    again.write_text(result.stdout)
    original, reloaded = load_config(path), load_config(again)
    for key in all_keys():
        if key.dotted != "notify.command":
            assert value_at(reloaded, key.dotted) == value_at(original, key.dotted), key.dotted


def test_config_show_defaults_lists_every_key_without_a_file() -> None:
    result = cli("config", "show", "--defaults", "--config", "/nonexistent/agent.toml")
    assert result.returncode == 0, result.stderr
    for table, keys in tables():
        assert f"\n[{table}]\n" in result.stdout
        for key in keys:
            if key.default is REQUIRED:
                assert f"# {key.name} = ...  (required: no default)" in result.stdout
            elif key.default is not None:
                assert re.search(rf"^{key.name} = ", result.stdout, re.MULTILINE), key.dotted
    assert 'users = "users"' in result.stdout and "duplicate_window_days = 7.0" in result.stdout
    assert result.stdout == "\n".join(show(None)) + "\n"
    assert cli("config", "show", "--config", "/nonexistent/agent.toml").returncode == 2


def test_secret_keys_are_masked() -> None:
    class ApiConfig(Config):
        api_key: Annotated[str, Field(json_schema_extra={"secret": True})] = ""
        token_file: str = ""

    fields = ApiConfig.model_fields
    marked = Key("api", "api_key", fields["api_key"], "")
    by_name = Key("api", "token_file", fields["token_file"], "")
    plain = Key("notify", "command", NotifyConfig.model_fields["command"], "")
    assert mask(marked, "s3cr3t") == MASK and mask(by_name, "t") == MASK
    assert mask(marked, "") == "" and mask(plain, "ssh -W %h:%p jump") == "ssh -W %h:%p jump"
    assert mask(plain, "sftp://u:pw@h/x and ftp://a:b@c") == f"sftp://u:{MASK}@h/x and ftp://a:{MASK}@c"


@pytest.mark.parametrize("table, written, expected", [
    ("prefixes", {"users": "members"}, {"users": "members", "user_events": "userEvents"}),
    ("folders", {"delete_users": "gdpr"}, {"users": "users", "delete_users": "gdpr"}),
])
def test_a_partial_table_keeps_the_defaults_for_the_rest(tmp_path: Path, table: str, written: dict[str, str],
                                                         expected: dict[str, str]) -> None:
    lines = "".join(f'{key} = "{value}"\n' for key, value in written.items())
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL + f"[imports.{table}]\n{lines}")
    names = getattr(load_config(path).imports, table)
    for key, value in expected.items():
        assert getattr(names, key) == value


def test_a_partial_table_still_refuses_unknown_keys_and_clashes(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL + '[imports.prefixes]\nuser = "members"\n')
    with pytest.raises(ConfigError, match=re.escape("unknown key 'imports.prefixes.user'")):
        load_config(path)
    path.write_text(MINIMAL + '[imports.prefixes]\nusers = "userEvents"\n')
    with pytest.raises(ConfigError, match="same prefix"):
        load_config(path)


@pytest.mark.parametrize("text, problem, fix", [
    (None, "configuration file not found", "scripts/install.sh writes one from config/agent.example.toml"),
    ("[sftp\n", "not valid TOML", "correct the TOML at the line and column named"),
    (MINIMAL + "connect_timout = 3\n", "unknown key 'sftp.connect_timout'",
     "did you mean 'sftp.connect_timeout'?"),
    ('[sftp]\nhost = "h"\nusername = "u"\nknown_hosts = "k"\n', "missing required key 'sftp.private_key'",
     "add 'sftp.private_key' to the file: config/agent.example.toml shows it"),
    (MINIMAL + "port = 0\n", "key 'sftp.port'", "change 'sftp.port' as the message says; its default is 22"),
])
def test_doctor_gives_the_fix_for_each_kind_of_configuration_error(tmp_path: Path, text: str | None,
                                                                  problem: str, fix: str) -> None:
    path = tmp_path / "agent.toml"
    if text is not None:
        path.write_text(text)
    result = cli("doctor", "--config", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL configuration: ") and problem in lines[0], result.stdout
    assert lines[1].startswith("     fix: ") and fix in lines[1], result.stdout
    assert "correct the key it names" not in result.stdout


def test_doctor_says_how_to_make_an_unreadable_file_readable(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL)
    error = ConfigError(f"{path}: cannot read configuration: Permission denied", (("unreadable", None),))
    from agent.ops.configshow import config_fixes

    [fix] = config_fixes(error, path)
    assert fix.startswith(f"let the agent's user read {path}") and "chmod 0640" in fix


def test_every_kind_of_configuration_problem_has_its_own_fix(tmp_path: Path) -> None:
    from agent.config import PROBLEM_KINDS
    from agent.ops.configshow import config_fixes

    path = tmp_path / "agent.toml"
    fixes = [config_fixes(ConfigError("x", ((kind, "sftp.port"),)), path)[0] for kind in PROBLEM_KINDS]
    assert len(set(fixes)) == len(PROBLEM_KINDS), fixes
