"""The API route's configuration, key file, HTTP client and doctor checks, against the HTTPS sandbox of
SaaSquatch's import API (its CA and server certificate are made at run time)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ApiConfig, ConfigError, Transport, load_config
from agent.ops.api_sandbox import ApiSandbox
from agent.ops.doctor import Doctor, Outcome
from agent.pipeline.api_upload import _errors_csv
from agent.transport.api import (
    ApiKeyError,
    ApiKeyRefused,
    ApiRefused,
    ApiUnavailable,
    ImportApi,
    api_key_path,
    load_api_key,
)
from tests.helpers.agent_env import REPO
from tests.helpers.api_env import API_KEY, TENANT, ApiAgentEnv, write_key

API_ONLY = """
[upload]
transport = "api"

[api]
tenant_alias = "test_akdq8a9wyvzba"
api_key_file = "keys/api-key"
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[ApiSandbox]:
    server = ApiSandbox(tmp_path / "sandbox", TENANT, API_KEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def api_config(sandbox: ApiSandbox, **override: object) -> ApiConfig:
    values: dict[str, object] = {"base_url": sandbox.base_url, "tenant_alias": TENANT,
                                 "ca_file": sandbox.ca_path, "timeout_seconds": 5.0}
    return ApiConfig.model_validate({**values, **override})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- configuration

def test_api_transport_needs_no_sftp_section_and_resolves_its_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, API_ONLY + 'ca_file = "ca.pem"\n'))
    assert config.upload.transport == Transport.API
    assert config.api.base_url == "https://app.referralsaasquatch.com"
    assert config.api.api_key_file == tmp_path.resolve() / "keys" / "api-key"
    assert config.api.ca_file == tmp_path.resolve() / "ca.pem"
    with pytest.raises(ConfigError, match=r"no \[sftp\] section"):
        _ = config.sftp


@pytest.mark.parametrize(("text", "expected"), [
    ("[paths]\ndrop = 'x'\n", "missing required key 'sftp'"),
    ("[upload]\ntransport = 'api'\n", "needs api.tenant_alias"),
    (API_ONLY + "base_url = 'http://api.example.com'\n", "must use https://"),
    (API_ONLY + "base_url = 'https://user:pw@api.example.com'\n", "must not carry a user name or password"),
    (API_ONLY + "base_url = 'https://api.example.com/?x=1'\n", "plain https://host"),
    (API_ONLY.replace("test_akdq8a9wyvzba", "a/b"), "key 'api.tenant_alias'"),
    (API_ONLY + "\n[status]\nmode = 'consumed'\n", "status.mode is for the SFTP route"),
    (API_ONLY + "timeout_seconds = 0\n", "key 'api.timeout_seconds'"),
    ("[upload]\ntransport = 'ftp'\n", "key 'upload.transport'"),
])
def test_bad_api_settings_are_refused_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_an_api_key_in_the_config_file_is_refused_without_repeating_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, API_ONLY + 'api_key = "s3cr3t-value-123"\n'))
    assert "never goes in the configuration file" in str(info.value) and "api.api_key_file" in str(info.value)
    assert "s3cr3t-value-123" not in str(info.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://[::1]:9", "http://localhost",
                                 "https://api.example.com:8443/base/"])
def test_https_or_plain_http_to_loopback_only(url: str) -> None:
    assert ApiConfig(base_url=url).base_url == url.rstrip("/")


# ---------------------------------------------------------------------- the key file

def test_the_key_file_must_be_private_and_hold_one_key(tmp_path: Path) -> None:
    path = write_key(tmp_path / "api-key", "abc123")
    assert load_api_key(path) == "abc123"
    path.chmod(0o640)
    with pytest.raises(ApiKeyError, match=r"by group or others \(mode 0640\); fix it with `chmod 600"):
        load_api_key(path)
    path.chmod(0o600)
    path.write_text("two words\n")
    with pytest.raises(ApiKeyError, match="more than one word") as info:
        load_api_key(path)
    assert "two words" not in str(info.value)
    path.write_text("\n")
    with pytest.raises(ApiKeyError, match="is empty"):
        load_api_key(path)
    with pytest.raises(ApiKeyError, match="does not exist"):
        load_api_key(tmp_path / "missing")


def test_the_systemd_credential_wins_over_the_key_file(tmp_path: Path) -> None:
    cfg = ApiConfig(tenant_alias="t", api_key_file=tmp_path / "file-key")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    assert api_key_path(cfg, {"CREDENTIALS_DIRECTORY": str(credentials)}) == tmp_path / "file-key"
    write_key(credentials / "api-key")
    assert api_key_path(cfg, {"CREDENTIALS_DIRECTORY": str(credentials)}) == credentials / "api-key"
    with pytest.raises(ApiKeyError, match="no API key"):
        api_key_path(ApiConfig(tenant_alias="t"), {})


# ---------------------------------------------------------------------- the client

def test_the_documented_sequence_over_https(tmp_path: Path, sandbox: ApiSandbox) -> None:
    data = b"accountId,id\na,1\nb,2\nc,3\n"
    source = tmp_path / "users_x.csv"
    source.write_bytes(data)
    api = ImportApi(api_config(sandbox), API_KEY)
    try:
        chunks: list[int] = []
        sent = api.upload(source, "users_x_remote.csv", len(data), lambda: chunks.append(1))
        assert sent.size == len(data) and chunks
        assert sandbox.uploads[sent.file_ref] == ("users_x_remote.csv", data)
        assert api.validate(sent.file_ref, "MUTATION/USER") == []
        job = api.create_job(sent.file_ref, "MUTATION/USER")
        assert job.type == "MUTATION/USER" and job.requester == "API"
        assert api.job(job.id).status == "IN_PROGRESS"
        status = api.job(job.id)
        assert (status.status, status.records_processed) == ("COMPLETED", 3)
    finally:
        api.close()


def test_http_faults_say_whether_the_request_may_have_been_carried_out(sandbox: ApiSandbox) -> None:
    api = ImportApi(api_config(sandbox), API_KEY)
    try:
        sandbox.fail_next("validate", 429, 503, 500, 400)
        for status, maybe_done in ((429, False), (503, False), (500, True)):
            with pytest.raises(ApiUnavailable) as unavailable:
                api.validate("imports/x", "MUTATION/USER")
            assert unavailable.value.status == status and unavailable.value.maybe_done is maybe_done
        with pytest.raises(ApiRefused) as refused:
            api.validate("imports/x", "MUTATION/USER")
        assert refused.value.status == 400 and refused.value.maybe_done is False
        with pytest.raises(ApiRefused, match="fileRef imports/missing not found"):  # GraphQL errors
            api.create_job("imports/missing", "MUTATION/USER")
        assert not sandbox.jobs
    finally:
        api.close()
    wrong = ImportApi(api_config(sandbox), "wrong-key")
    try:
        with pytest.raises(ApiKeyRefused, match=r"the API key was refused \(HTTP 401\)") as info:
            wrong.validate("imports/x", "MUTATION/USER")
        assert "wrong-key" not in str(info.value)
        with pytest.raises(ApiKeyRefused):
            wrong.check_key()
    finally:
        wrong.close()


def test_an_untrusted_certificate_or_a_closed_port_is_a_fault_nothing_was_sent_for(
        tmp_path: Path, sandbox: ApiSandbox) -> None:
    other = ApiSandbox(tmp_path / "other", TENANT, API_KEY)  # another CA: its certificate is not trusted
    other.start()
    try:
        untrusted = ImportApi(api_config(sandbox, base_url=other.base_url), API_KEY)
        with pytest.raises(ApiUnavailable, match=r"set api\.ca_file") as info:
            untrusted.validate("imports/x", "MUTATION/USER")
        assert info.value.maybe_done is False and other.counts["validate"] == 0
        untrusted.close()
    finally:
        other.stop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens once it is closed
    closed = ImportApi(api_config(sandbox, base_url=f"https://127.0.0.1:{port}"), API_KEY)
    with pytest.raises(ApiUnavailable, match="cannot reach") as refused:
        closed.create_job("imports/x", "MUTATION/USER")
    assert refused.value.maybe_done is False
    closed.close()


def test_the_servers_errors_become_saasquatchs_errors_file() -> None:
    text = _errors_csv([{"recordNumber": 2, "message": "needs an id", "apiErrorCode": "BAD_REQUEST",
                         "statusCode": 400}, "plain words, with a comma", {"field": "x"}])
    assert text.splitlines() == ["recordNumber,message,apiErrorCode,statusCode",
                                 "2,needs an id,BAD_REQUEST,400",
                                 ',"plain words, with a comma",,',
                                 ',"{""field"": ""x""}",,']


# ---------------------------------------------------------------------- doctor

def doctor_results(config_path: Path) -> dict[str, tuple[Outcome, str]]:
    return {result.name: (result.outcome, result.detail + " " + result.fix)
            for result in Doctor(load_config(config_path)).run()}


def test_doctor_checks_key_tls_and_acceptance_without_creating_anything(tmp_path: Path,
                                                                        sandbox: ApiSandbox) -> None:
    env = ApiAgentEnv(tmp_path / "agent", sandbox)
    results = doctor_results(env.config_path)
    assert [name for name in results] == ["paths and permissions", "same filesystem", "API key file", "TLS",
                                          "API key accepted", "clock"]
    assert all(outcome == Outcome.PASS for outcome, _detail in results.values()), results
    assert "saasquatch-agent sandbox CA" in results["TLS"][1]
    assert "nothing was uploaded or created" in results["API key accepted"][1]
    assert not sandbox.uploads and not sandbox.jobs and sandbox.counts["createJob"] == 0

    write_key(env.key_path, "not-the-key")
    results = doctor_results(env.config_path)
    assert results["API key accepted"][0] == Outcome.FAIL
    assert "the API key was refused" in results["API key accepted"][1]
    env.key_path.chmod(0o644)
    results = doctor_results(env.config_path)
    assert results["API key file"][0] == Outcome.FAIL and "chmod 600" in results["API key file"][1]
    assert results["API key accepted"][0] == Outcome.SKIP


def test_doctor_says_to_set_ca_file_when_the_certificate_is_not_trusted(tmp_path: Path,
                                                                       sandbox: ApiSandbox) -> None:
    env = ApiAgentEnv(tmp_path / "agent", sandbox)
    env.config_path.write_text(env.config_path.read_text().replace(f'ca_file = "{sandbox.ca_path}"\n', ""))
    result = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", str(env.config_path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL TLS:" in result.stdout and "api.ca_file" in result.stdout
    assert "SKIP API key accepted" in result.stdout


# ---------------------------------------------------------------------- bytes that are not the checked ones

def test_bytes_that_changed_after_the_check_start_no_job(tmp_path: Path, sandbox: ApiSandbox) -> None:
    """The bytes sent are hashed as read; when they are not the checked ones (same size, other
    content) the upload is left unused, no job is started, and intake checks the file again."""
    from agent.config import Config, PathsConfig, UploadConfig
    from agent.pipeline.api_upload import ApiUploader
    from agent.store.archive import Filer
    from agent.store.journal import FileState, Journal

    key = write_key(tmp_path / "api-key")
    config = Config(upload=UploadConfig(transport=Transport.API),
                    api=api_config(sandbox, api_key_file=key),
                    paths=PathsConfig(drop=tmp_path / "drop", state_dir=tmp_path / "state",
                                      archive=tmp_path / "archive", failed=tmp_path / "failed"))
    config.spool_dir.mkdir(parents=True)
    journal = Journal(config.journal_path)
    uploader = ApiUploader(config, journal, Filer(config, journal))
    checked_again: list[int] = []
    uploader.on_changed = lambda record: checked_again.append(record.id)
    try:
        record = journal.add_claim("users_x.csv", tmp_path / "drop" / "users_x.csv", config.spool_dir)
        Path(record.local_path).write_bytes(b"accountId,id\na,2\n")  # checked: a,1 (same size)
        record = journal.update(record.id, state=FileState.QUEUED, size=17, import_type="users",
                                sha256=sha256_of(b"accountId,id\na,1\n"), remote_name="users_x_1.csv")
        record = uploader.process(record)
        assert record.state == FileState.CLAIMED and checked_again == [record.id]
        assert len(sandbox.uploads) == 1 and sandbox.counts["validate"] == 0 and not sandbox.jobs
        assert any("changed after it was taken" in (message or "") for _at, _state, message
                   in journal.events(record.id))
    finally:
        uploader.close()
        journal.close()


def sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
