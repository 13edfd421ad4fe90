"""`config show [--defaults]`: the effective configuration, or every key with its default, as TOML;
and what `doctor` says to do about each kind of configuration error.

The keys come from the configuration model itself (`agent.config.Config`), so this output, the
example file (config/agent.example.toml, checked by a test) and the model cannot drift apart. A key
that holds a secret is masked: one marked `json_schema_extra={"secret": True}` in the model, or
named like one (password, token, secret, api_key); a password inside a URL is masked too.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agent.config import CONFIG_ENV_VAR, Config, ConfigError

MASK = "********"
_SECRET_NAME = re.compile(r"(password|passphrase|token|secret|api_key|apikey)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/:@\s]*):(?P<password>[^/@\s]+)@",
                           re.IGNORECASE)
REQUIRED = object()  # the default of a key that has none


@dataclass(frozen=True)
class Key:
    table: str  # dotted table name: "sftp", "imports.prefixes"
    name: str
    field: FieldInfo
    default: Any  # REQUIRED when the key has no default

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.name}"

    @property
    def secret(self) -> bool:
        extra = self.field.json_schema_extra
        marked = isinstance(extra, dict) and extra.get("secret") is True
        return marked or bool(_SECRET_NAME.search(self.name))


def _nested(field: FieldInfo) -> type[BaseModel] | None:
    """The table type of a field (`X` or `X | None`, as [sftp] is with the API route), else None."""
    annotation = field.annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def tables(model: type[BaseModel] = Config, prefix: str = "",
           defaults: BaseModel | None = None) -> Iterator[tuple[str, list[Key]]]:
    """Each TOML table of the model (dotted name) with its plain keys, in the model's order; a table
    comes before the tables nested in it. `defaults`: the table's default value as a whole (a nested
    table's keys take their defaults from it)."""
    plain: list[Key] = []
    nested: list[tuple[str, type[BaseModel], BaseModel | None]] = []
    for attribute, field in model.model_fields.items():
        if model is Config and attribute == "source":
            continue
        name = field.alias or attribute  # as the file spells it ([sftp] is the field sftp_section)
        if defaults is not None:
            default = getattr(defaults, attribute)
        elif field.default is PydanticUndefined and field.default_factory is None:
            default = REQUIRED
        else:
            default = field.get_default(call_default_factory=True)
        sub = _nested(field)
        if sub is not None:
            nested.append((f"{prefix}.{name}" if prefix else name, sub,
                           default if isinstance(default, BaseModel) else None))
            continue
        plain.append(Key(prefix, name, field, default))
    if prefix:
        yield prefix, plain
    for dotted, sub, sub_defaults in nested:
        yield from tables(sub, dotted, sub_defaults)


def all_keys() -> list[Key]:
    return [key for _table, keys in tables() for key in keys]


def toml_value(value: Any) -> str:
    """A value as TOML: strings (paths, enum words) quoted, numbers, booleans, arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return toml_value(value.value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return toml_value(str(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def mask(key: Key, value: Any) -> Any:
    if value is None or value == "":
        return value
    if key.secret:
        return MASK
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
    return value


def _values(model: BaseModel | None, table: str) -> dict[str, Any] | None:
    if model is None:
        return None
    node: Any = model
    for part in table.split("."):
        node = getattr(node, "sftp_section" if part == "sftp" and node is model else part)
        if node is None:  # an optional table left out ([sftp] with the API route)
            return {}
    return {name: getattr(node, name) for name in type(node).model_fields}


def show(config: Config | None) -> list[str]:
    """The configuration as TOML lines: `config` effective (paths absolute, defaults filled in,
    secrets masked), or with None every key with its default (a key without one commented out)."""
    if config is None:
        lines = ["# every key with its default (`saasquatch-agent config show` prints the effective ones)"]
    else:
        lines = [f"# effective configuration from {config.source} (defaults filled in, relative paths"
                 " made absolute, secrets masked)"]
    for table, keys in tables():
        values = _values(config, table)
        lines += ["", f"[{table}]"]
        for key in keys:
            value = key.default if values is None else values.get(key.name)
            if value is REQUIRED:
                lines.append(f"# {key.name} = ...  (required: no default)")
            elif value is None:
                lines.append(f"# {key.name} =  (not set)")
            else:
                lines.append(f"{key.name} = {toml_value(mask(key, value) if values is not None else value)}")
    return lines


def config_fixes(error: ConfigError, path: Path) -> list[str]:
    """What to do about each problem of a configuration that does not load (`doctor`)."""
    fixes: list[str] = []
    for kind, key in error.problems or (("bad_value", None),):
        fix = _fix(kind, key, path)
        if fix not in fixes:
            fixes.append(fix)
    return fixes


def _fix(kind: str, key: str | None, path: Path) -> str:
    example = "config/agent.example.toml"
    if kind == "not_found":
        return (f"create {path}: scripts/install.sh writes one from {example}, or copy that file there and"
                f" fill in [sftp]; or point --config PATH or ${CONFIG_ENV_VAR} at the file you have")
    if kind == "unreadable":
        return (f"let the agent's user read {path} (as install.sh sets it: chown root:saasquatch-agent"
                f" {path} && chmod 0640 {path}), or run as a user who can")
    if kind == "syntax":
        return ("correct the TOML at the line and column named: text values in double quotes, one"
                " `key = value` per line, section names in [brackets], no key twice in a section")
    known = [item.dotted for item in all_keys()]
    if kind == "unknown_key" and key:
        guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        return (f"remove '{key}' or correct its spelling{hint}; `saasquatch-agent config show --defaults`"
                " lists every key")
    if kind == "missing_key" and key:
        return f"add '{key}' to the file: {example} shows it with an example value"
    default = next((item.default for item in all_keys() if item.dotted == key), REQUIRED)
    shown = f"; its default is {toml_value(default)}" if default not in (REQUIRED, None) else ""
    about = f"'{key}'" if key else "the value named"
    return (f"change {about} as the message says{shown} (`saasquatch-agent config show --defaults` lists"
            " every key)")
