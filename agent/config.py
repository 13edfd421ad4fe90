"""Configuration: one TOML file, validated by pydantic.

Every key has a safe default except the ones that identify the tenant's server. An unknown or
misspelled key is an error; `load_config` turns every problem into a `ConfigError` whose one-line
message names the file and the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.errors import EXIT_USAGE, AgentError
from agent.imports.namerules import check_distinct, check_folder, check_prefix
from agent.imports.types import MAX_FILE_BYTES, MAX_RECORDS
from agent.imports.types import ImportType as ImportType  # its home is the import rules; kept here too
from agent.imports.types import OversizePolicy as OversizePolicy

DEFAULT_CONFIG_PATH = Path("/etc/saasquatch-agent/agent.toml")
CONFIG_ENV_VAR = "SAASQUATCH_AGENT_CONFIG"


class ConfigError(AgentError):
    """A configuration problem; the message is one line meant for the operator. `problems`: each
    problem's kind (one of PROBLEM_KINDS) and the key it is about (None for the whole file), so
    `doctor` can give the fix for each."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, problems: tuple[tuple[str, str | None], ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


PROBLEM_KINDS = ("not_found", "unreadable", "syntax", "unknown_key", "missing_key", "bad_value")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SftpConfig(_Section):
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    username: Annotated[str, Field(min_length=1)]
    private_key: Path
    known_hosts: Path
    remote_dir: str = "/"
    connect_timeout: Annotated[float, Field(gt=0)] = 15.0
    operation_timeout: Annotated[float, Field(gt=0)] = 60.0
    keepalive_seconds: Annotated[int, Field(ge=0)] = 15
    proxy_command: str | None = None  # as OpenSSH's ProxyCommand (%h host, %p port, %r user, %% a %)
    bandwidth_limit: Annotated[int, Field(ge=0)] = 0  # bytes per second while uploading; 0 = no limit
    # allow ssh-rsa (SHA-1) signatures with an RSA key, for servers that accept nothing else; SHA-2
    # is still tried first
    rsa_sha1: bool = False

    @field_validator("private_key", mode="before")
    @classmethod
    def _key_is_a_path(cls, value: Any) -> Any:
        # the value itself is never repeated: it may be the key
        if isinstance(value, str) and ("-----BEGIN" in value or "\n" in value or "\r" in value):
            raise ValueError("looks like a key pasted as text (not repeated here); give the path of the"
                             " private key file instead, e.g. private_key = \"keys/id_ed25519\"")
        return value

    @field_validator("remote_dir")
    @classmethod
    def _remote_dir_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute remote path starting with '/'")
        return value.rstrip("/") or "/"


class PathsConfig(_Section):
    drop: Path = Path("/var/lib/saasquatch-agent/drop")
    state_dir: Path = Path("/var/lib/saasquatch-agent")
    archive: Path = Path("/var/lib/saasquatch-agent/archive")
    failed: Path = Path("/var/lib/saasquatch-agent/failed")


class WatchConfig(_Section):
    settle_seconds: Annotated[float, Field(ge=0)] = 2.0
    rescan_seconds: Annotated[float, Field(gt=0)] = 60.0


class Transport(StrEnum):
    SFTP = "sftp"  # SaaSquatch's SFTP Import Integration: the server creates the import job itself
    API = "api"  # SaaSquatch's import API (upload, validate, createJob, poll the job): needs an API key


class UploadConfig(_Section):
    # the route to SaaSquatch: "sftp" ([sftp]) or "api" ([api]; agent/pipeline/api_upload.py)
    transport: Transport = Transport.SFTP
    # upload threads, each with its own SSH connection; 4: 3.4x faster than 1 on a 20 ms link, about
    # the same on loopback (bench/RESULTS.md, round 2)
    concurrency: Annotated[int, Field(ge=1, le=16)] = 4
    # small files (<= 256 KiB) one thread sends together, each step pipelined and committed once for
    # all of them (agent/transport/pipelining.py); 1 sends every file on its own
    batch_files: Annotated[int, Field(ge=1, le=256)] = 64
    # the server-side name a file is written under before the rename that publishes it: {id} (the
    # journal row, required: no two rows share a temporary name) and optionally {stem} (the remote
    # name's readable stem). Hidden by default, so the server never takes a half-written file.
    temp_name: str = ".{id}.part"
    temp_dir: str = ""  # a server folder for temporary files ("" = remote_dir); renamed across on publish
    # a file at least this large is checked (validation + SHA-256) in a worker process while its bytes
    # are sent, and published only once the check passed (agent/intake/check_process.py); smaller
    # files, and every file with 0, are checked before their first byte. The API route and
    # user-deletion files (their warning names the users first) are always checked first.
    check_while_sending_bytes: Annotated[int, Field(ge=0)] = 16 * 1024 * 1024

    @field_validator("temp_name")
    @classmethod
    def _temp_name_pattern(cls, value: str) -> str:
        if "{id}" not in value:
            raise ValueError("must contain {id} (the journal row), so no two files share a temporary name")
        if "/" in value or value in (".", ".."):
            raise ValueError("must be a file name, not a path (use upload.temp_dir for a folder)")
        try:
            value.format(id=1, stem="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{id}} and {{stem}} may be used ({exc})") from None
        return value


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
DEFAULT_API_BASE_URL = "https://app.referralsaasquatch.com"
_TENANT_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,100}")
_SECRET_KEYS = frozenset({"api_key", "key", "password", "secret", "token", "apikey", "api_token"})


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or a name that always means this machine."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiConfig(_Section):
    """[api]: SaaSquatch's import API (`upload.transport = "api"`, agent/transport/api.py).

    The API key itself is never in this file: it is read from `api_key_file` (mode 0600) or from
    the systemd credential `api-key` ($CREDENTIALS_DIRECTORY/api-key), which wins when present.
    """

    base_url: str = DEFAULT_API_BASE_URL  # HTTPS; plain HTTP only to a loopback address (tests)
    tenant_alias: str = ""  # e.g. test_akdq8a9wyvzba; required with upload.transport = "api"
    api_key_file: Path | None = None  # the tenant API key alone, mode 0600 (or the credential api-key)
    ca_file: Path | None = None  # PEM CAs to trust instead of the system's (private CA, TLS proxy)
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0  # connect, and each read/write of a request
    poll_seconds: Annotated[float, Field(gt=0)] = 30.0  # how often a running import job is asked about

    @model_validator(mode="before")
    @classmethod
    def _no_secret_here(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in _SECRET_KEYS:
                    # the value is never repeated: it may be the key
                    raise PydanticCustomError(
                        "secret_in_config",
                        "the API key never goes in the configuration file (the value is not repeated"
                        " here); remove '{key}' and put the key alone in a file of mode 0600 named by"
                        " api.api_key_file, or pass it as the systemd credential api-key",
                        {"key": str(key)})
        return data

    @field_validator("base_url")
    @classmethod
    def _https_only(cls, value: str) -> str:
        from urllib.parse import urlsplit

        value = value.strip().rstrip("/")
        try:
            parts = urlsplit(value)
            host = parts.hostname or ""
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"not a URL ({exc})") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry a user name or password (the key comes from api.api_key_file)")
        if parts.query or parts.fragment or not host:
            raise ValueError("must be a plain https://host[:port] URL, e.g. " + DEFAULT_API_BASE_URL)
        if parts.scheme == "https":
            return value
        if parts.scheme == "http" and is_loopback_host(host):
            return value  # a local test server; nothing leaves this machine
        raise ValueError("must use https:// (plain http:// is refused except to a loopback address,"
                         " which only tests use)")

    @field_validator("tenant_alias")
    @classmethod
    def _alias_chars(cls, value: str) -> str:
        if value and not _TENANT_ALIAS.fullmatch(value):
            raise ValueError("must be the tenant alias from SaaSquatch (letters, digits, _ and -),"
                             " e.g. test_akdq8a9wyvzba")
        return value


class DaemonConfig(_Section):
    stop_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0  # SIGTERM: finish or abandon the upload within


class RetryConfig(_Section):
    initial_delay_seconds: Annotated[float, Field(gt=0)] = 2.0
    max_delay_seconds: Annotated[float, Field(gt=0)] = 300.0
    once_max_attempts: Annotated[int, Field(ge=1)] = 3


class PerTypeNames(_Section):
    users: Annotated[str, Field(min_length=1)]
    user_events: Annotated[str, Field(min_length=1)]
    delete_users: Annotated[str, Field(min_length=1)]
    reward_redemptions: Annotated[str, Field(min_length=1)]

    def for_type(self, import_type: ImportType) -> str:
        return str(getattr(self, import_type.value))

    def check_each(self, check: Callable[[str], None], what: str) -> PerTypeNames:
        """Every name passes `check` and no two types share one (agent.imports.namerules)."""
        pairs = [(t.value, self.for_type(t)) for t in ImportType]
        for key, value in pairs:
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        check_distinct(pairs, what)
        return self


DEFAULT_PREFIXES = PerTypeNames(users="users", user_events="userEvents", delete_users="deleteUsers",
                                reward_redemptions="rewardRedemptions")
DEFAULT_FOLDERS = PerTypeNames(users="users", user_events="user-events", delete_users="delete-users",
                               reward_redemptions="reward-redemptions")


class ImportsConfig(_Section):
    prefixes: PerTypeNames = DEFAULT_PREFIXES
    folders: PerTypeNames = DEFAULT_FOLDERS

    @field_validator("prefixes", "folders", mode="before")
    @classmethod
    def _defaults_for_the_rest(cls, value: Any, info: ValidationInfo) -> Any:
        """A table that sets some types only: the others keep their default."""
        if isinstance(value, dict):
            default = DEFAULT_PREFIXES if info.field_name == "prefixes" else DEFAULT_FOLDERS
            return {**default.model_dump(), **value}
        return value

    @field_validator("prefixes")
    @classmethod
    def _safe_distinct_prefixes(cls, value: PerTypeNames) -> PerTypeNames:
        return value.check_each(check_prefix, "prefix")

    @field_validator("folders")
    @classmethod
    def _safe_distinct_folders(cls, value: PerTypeNames) -> PerTypeNames:
        return value.check_each(check_folder, "folder")

    max_file_bytes: Annotated[int, Field(gt=0)] = MAX_FILE_BYTES
    max_records: Annotated[int, Field(gt=0)] = MAX_RECORDS
    oversize: OversizePolicy = OversizePolicy.SPLIT
    deletion_guard: bool = True
    # a file whose content and type were already sent within this many days is refused; 0 = off
    duplicate_window_days: Annotated[float, Field(ge=0)] = 7.0


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class MetricsConfig(_Section):
    prometheus_port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0 = off; serves on 127.0.0.1 only
    textfile: Path | None = None  # node_exporter textfile collector file (*.prom); None = off
    textfile_seconds: Annotated[float, Field(gt=0)] = 15.0  # how often the textfile is rewritten

    @property
    def enabled(self) -> bool:
        return bool(self.prometheus_port or self.textfile)


class LogConfig(_Section):
    level: str = "INFO"
    format: LogFormat = LogFormat.TEXT

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return upper


class StatusMode(StrEnum):
    NONE = "none"  # a verified upload is the end of the road
    CONSUMED = "consumed"  # the server removes/moves the upload when it takes it
    STATUS_FILES = "status-files"  # the server writes status/result files named after the upload


class RemoteResults(StrEnum):
    KEEP = "keep"
    REMOVE = "remove"
    MOVE = "move"


class StatusConfig(_Section):
    """[status]: how the server tells what it did with an upload (agent/transport/remote_status.py)."""

    mode: tuple[StatusMode, ...] = (StatusMode.NONE,)  # one mode, or a list to combine
    poll_seconds: Annotated[float, Field(gt=0)] = 60.0
    timeout: Annotated[float, Field(gt=0)] = 86400.0  # seconds after upload before `stale`
    folder: str = ""  # another remote folder holding status files ("" = only remote_dir)
    patterns: tuple[str, ...] = ("{name}.status", "{name}.error", "result_{name}", "receipt_{name}",
                                 "{stem}.errors.csv")
    download_results: bool = True
    remote_results: RemoteResults = RemoteResults.KEEP  # after download: keep, remove or move
    remote_results_folder: str = ""  # where `move` puts them on the server

    @field_validator("mode", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("mode")
    @classmethod
    def _none_alone(cls, value: tuple[StatusMode, ...]) -> tuple[StatusMode, ...]:
        if not value:
            raise ValueError('must name at least one mode ("none", "consumed", "status-files")')
        if StatusMode.NONE in value and len(value) > 1:
            raise ValueError('"none" cannot be combined with another mode')
        return tuple(dict.fromkeys(value))

    @field_validator("patterns")
    @classmethod
    def _patterns_named(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                produced = pattern.format(name="n", stem="s")
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"pattern {pattern!r} may use only {{name}} and {{stem}}") from None
            if produced == pattern or "/" in pattern:
                raise ValueError(f"pattern {pattern!r} must contain {{name}} or {{stem}} and no '/'")
        return value

    @field_validator("folder", "remote_results_folder")
    @classmethod
    def _absolute_or_empty(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("must be an absolute remote path starting with '/' (or empty)")
        return value.rstrip("/") or ("/" if value else "")

    @model_validator(mode="after")
    def _move_needs_folder(self) -> StatusConfig:
        if self.remote_results == RemoteResults.MOVE and not self.remote_results_folder:
            raise ValueError('remote_results = "move" needs remote_results_folder')
        return self

    @property
    def tracking(self) -> bool:
        return StatusMode.NONE not in self.mode


class ArchiveConfig(_Section):
    compress: bool = False  # gzip archived inputs (archive/YYYY/MM/DD/<name>.gz)
    retention_days: Annotated[float, Field(ge=0)] = 90.0  # prune archive/ after this; 0 = never


class JournalConfig(_Section):
    # an online copy of the journal in state_dir (journal.backup.sqlite3) this often; 0 = off.
    # A damaged journal loses at most this much history (`saasquatch-agent journal rebuild`).
    backup_seconds: Annotated[float, Field(ge=0)] = 3600.0


class NotifyConfig(_Section):
    command: str = ""  # run with the file's JSON on stdin on final failures and stale files
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0


class Config(_Section):
    # [sftp] is required with upload.transport = "sftp" and may be left out with "api"; read it as
    # `config.sftp` (a ConfigError when it is absent)
    sftp_section: SftpConfig | None = Field(default=None, alias="sftp")
    paths: PathsConfig = PathsConfig()
    watch: WatchConfig = WatchConfig()
    retry: RetryConfig = RetryConfig()
    upload: UploadConfig = UploadConfig()
    daemon: DaemonConfig = DaemonConfig()
    imports: ImportsConfig = ImportsConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    status: StatusConfig = StatusConfig()
    archive: ArchiveConfig = ArchiveConfig()
    notify: NotifyConfig = NotifyConfig()
    journal: JournalConfig = JournalConfig()
    api: ApiConfig = ApiConfig()
    source: Path | None = None

    @model_validator(mode="after")
    def _transport_needs(self) -> Config:
        if self.upload.transport == Transport.SFTP and self.sftp_section is None:
            raise PydanticCustomError("transport_needs", "missing required key 'sftp' (the SFTP"
                                      ' route, upload.transport = "sftp", needs it)')
        if self.upload.transport == Transport.API:
            if not self.api.tenant_alias:
                raise PydanticCustomError("transport_needs", 'upload.transport = "api" needs'
                                          " api.tenant_alias (the tenant alias, e.g. test_akdq8a9wyvzba)")
            if self.status.tracking:
                raise PydanticCustomError("transport_needs", 'status.mode is for the SFTP route; with'
                                          ' upload.transport = "api" the agent follows the import job'
                                          ' itself: remove status.mode (or set it to "none")')
        return self

    @property
    def sftp(self) -> SftpConfig:
        """[sftp]; absent only with upload.transport = "api", where nothing asks for it."""
        if self.sftp_section is None:
            raise ConfigError(f"{self.source or 'configuration'}: upload.transport is"
                              f" {self.upload.transport.value!r} and there is no [sftp] section;"
                              " this needs the SFTP settings")
        return self.sftp_section

    @property
    def spool_dir(self) -> Path:
        return self.paths.state_dir / "spool"

    @property
    def journal_path(self) -> Path:
        return self.paths.state_dir / "journal.sqlite3"

    @property
    def journal_backup_path(self) -> Path:
        return self.paths.state_dir / "journal.backup.sqlite3"


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_PATH


def _resolve_relative(data: dict[str, Any], base: Path) -> None:
    """Make the path-valued keys absolute, relative to the config file's folder."""
    for section, keys in (("sftp", ("private_key", "known_hosts")), ("metrics", ("textfile",)),
                          ("api", ("api_key_file", "ca_file")),
                          ("paths", ("drop", "state_dir", "archive", "failed"))):
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                table[key] = str(base / value)


def _describe(error: Any) -> tuple[str, str, str]:
    """(kind, key, text) of one pydantic error."""
    location = ".".join(str(part) for part in error["loc"])
    if not location:  # a rule across sections: the message names the keys
        return "bad_value", "", str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown_key", location, f"unknown key '{location}'"
    if error["type"] == "missing":
        return "missing_key", location, f"missing required key '{location}'"
    return "bad_value", location, f"key '{location}': {error['msg']}"


def parse_config(data: dict[str, Any], source: Path) -> Config:
    data = dict(data)
    data.pop("source", None)
    _resolve_relative(data, source.parent.resolve())
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        described = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"{source}: {'; '.join(text for _kind, _key, text in described)}",
                          tuple((kind, key) for kind, key, _text in described)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    source = resolve_config_path(path)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: configuration file not found (pass --config PATH or set {CONFIG_ENV_VAR})",
            (("not_found", None),)) from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read configuration: {exc.strerror}",
                          (("unreadable", None),)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", (("syntax", None),)) from None
    if "source" in data:
        raise ConfigError(f"{source}: unknown key 'source'", (("unknown_key", "source"),))
    return parse_config(data, source)
