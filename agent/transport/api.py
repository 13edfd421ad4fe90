"""SaaSquatch's import API over HTTPS (httpx): the four documented requests, and nothing else.

1. `POST {base_url}/api/v1/{tenant}/export/upload` (multipart/form-data, field `file`) -> `fileRef`;
2. GraphQL `validateJobCreation(jobInput: {fileRef, type})` -> `errors` (empty: the job may start);
3. GraphQL `createJob(jobInput: {type, outputFormat: "CSV", fileRef})` -> `{id, type, requester,
   dateCreated}`;
4. GraphQL `job(id)` -> `{status, stats {recordsProcessed}}`.
HTTP basic auth with an empty user name and the tenant API key as the password. This module knows
no journal: each call is one request and returns what the server said, or raises an `ApiError`
whose class says what the caller may do next (agent/pipeline/api_upload.py decides):

- `ApiUnavailable`: connection or TLS fault, timeout, 429, 5xx, an answer that is not the
  documented one. `maybe_done` is False only when the request provably was not carried out (no
  connection was made, 429, 503): only then may a request with an effect (createJob) be sent again.
- `ApiKeyRefused`: 401/403, "the API key was refused".
- `ApiRefused`: the server refused this request (another 4xx, or GraphQL `errors` in the answer);
  `errors` holds the server's own list.

The key is read from a file of mode 0600 (or the systemd credential `api-key`), kept in memory
only, and never logged: it travels in the Authorization header, which nothing here prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from agent.config import ApiConfig, is_loopback_host
from agent.systemd import credential_path

API_KEY_CREDENTIAL = "api-key"  # LoadCredential=api-key:/etc/saasquatch-agent/keys/api-key
MAX_KEY_BYTES = 4096
UPLOAD_CHUNK = 256 * 1024
SNIPPET_CHARS = 300
OUTPUT_FORMAT = "CSV"
# A job id that cannot exist: `doctor` asks for it to learn whether the key is accepted (a read
# that creates nothing).
PROBE_JOB_ID = "000000000000000000000000"

VALIDATE_QUERY = ("query validate($jobInput: JobInput!) {validateJobCreation(jobInput: $jobInput)"
                  " { errors }}")
CREATE_JOB_QUERY = ("mutation ($jobInput: JobInput!) { createJob(jobInput: $jobInput)"
                    " {id type requester dateCreated}}")
JOB_QUERY = "query ($id: ID!) { job(id: $id) { status stats { recordsProcessed }}}"
_AUTH_WORDS = ("UNAUTHORIZED", "UNAUTHENTICATED", "FORBIDDEN", "NOT_AUTHORIZED", "INVALID_API_KEY")


class ApiKeyError(Exception):
    """The API key file cannot be used; the message says how to fix it (and never holds the key)."""


class ApiError(Exception):
    def __init__(self, message: str, *, status: int | None = None, maybe_done: bool = True,
                 retry_after: float | None = None, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.maybe_done = maybe_done
        self.retry_after = retry_after
        self.errors = errors or []


class ApiUnavailable(ApiError):
    """Worth trying again later (connection, TLS, timeout, 429, 5xx, an unexpected answer)."""


class ApiKeyRefused(ApiError):
    """401/403: the API key was refused."""


class ApiRefused(ApiError):
    """The server refused this request (4xx or GraphQL `errors`); `errors` has its words."""


@dataclass(frozen=True)
class Uploaded:
    file_ref: str
    size: int  # bytes read from the file and sent
    sha256: str  # of exactly those bytes


@dataclass(frozen=True)
class Job:
    id: str
    type: str | None
    requester: str | None
    date_created: Any


@dataclass(frozen=True)
class JobStatus:
    status: str  # the server's word, as it said it
    records_processed: int | None


def api_key_path(cfg: ApiConfig, env: Mapping[str, str] | None = None) -> Path:
    """The key systemd passed (LoadCredential=api-key:...), else api.api_key_file."""
    passed = credential_path(API_KEY_CREDENTIAL, env)
    if passed is not None:
        return passed
    if cfg.api_key_file is None:
        raise ApiKeyError("no API key: set api.api_key_file to a file holding the tenant API key (mode 0600),"
                          " or pass it as the systemd credential api-key")
    return cfg.api_key_file


def load_api_key(path: Path) -> str:
    """The key from its file, refusing a file readable by group or others, as OpenSSH refuses a key."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ApiKeyError(f"API key file {path} does not exist: put the tenant API key (SaaSquatch portal,"
                          f" Settings > API Keys) alone in it, then `chmod 600 {path}`") from None
    except OSError as exc:
        raise ApiKeyError(f"API key file {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ApiKeyError(f"API key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ApiKeyError(f"API key file {path} is readable by group or others (mode"
                          f" {stat.S_IMODE(info.st_mode):04o}); fix it with `chmod 600 {path}`")
    if info.st_size > MAX_KEY_BYTES:
        raise ApiKeyError(f"API key file {path} holds {info.st_size} bytes; it must hold the key alone")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ApiKeyError(f"API key file {path} cannot be read: {exc.strerror}") from None
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ApiKeyError(f"API key file {path} is not plain text; it must hold the key alone") from None
    if not key:
        raise ApiKeyError(f"API key file {path} is empty: put the tenant API key in it")
    if any(not char.isprintable() or char.isspace() for char in key):
        raise ApiKeyError(f"API key file {path} holds more than one word or line; it must hold the key"
                          " alone (its content is not repeated here)")
    return key


def trust_context(cfg: ApiConfig) -> ssl.SSLContext:
    """Certificates checked against api.ca_file when set, else the system's CAs; TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def tenant_url(cfg: ApiConfig) -> str:
    return f"{cfg.base_url}/api/v1/{cfg.tenant_alias}"


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 3] + "..."


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import time

    return max(0.0, moment.timestamp() - time.time())


def error_words(errors: list[Any]) -> str:
    """The server's errors as one line: each `message` (or the whole item), joined by '; '."""
    words = []
    for item in errors:
        if isinstance(item, dict):
            message = item.get("message")
            words.append(str(message) if message is not None else json.dumps(item, sort_keys=True))
        else:
            words.append(str(item))
    return _snippet("; ".join(words)) or "(no message)"


class _Reader:
    """The file as httpx reads it for the multipart body: hashed as read, at most `size` bytes,
    `on_chunk` after each read (watchdog ping, stop request)."""

    def __init__(self, handle: BinaryIO, size: int, on_chunk: Callable[[], None]) -> None:
        self._handle = handle
        self._left = size
        self._on_chunk = on_chunk
        self.digest = hashlib.sha256()
        self.sent = 0

    def fileno(self) -> int:  # httpx learns the length from fstat: one Content-Length, no chunking
        return self._handle.fileno()

    def read(self, size: int = -1) -> bytes:
        self._on_chunk()
        want = self._left if size < 0 else min(size, self._left, UPLOAD_CHUNK)
        data = self._handle.read(want) if want > 0 else b""
        self._left -= len(data)
        self.sent += len(data)
        self.digest.update(data)
        return data


class ImportApi:
    """One HTTP client (keep-alive connections, shared by the upload threads) for one tenant."""

    def __init__(self, cfg: ApiConfig, key: str, *, connections: int = 4) -> None:
        self.cfg = cfg
        self.url = tenant_url(cfg)
        self.plain_http = cfg.base_url.startswith("http://")
        if self.plain_http and not is_loopback_host(httpx.URL(cfg.base_url).host):
            raise ValueError("plain HTTP is only for a loopback address")  # config refuses it first
        from importlib.metadata import PackageNotFoundError, version

        try:
            agent_version = version("saasquatch-agent")
        except PackageNotFoundError:
            agent_version = "dev"
        self._client = httpx.Client(
            auth=httpx.BasicAuth("", key), verify=trust_context(cfg),
            timeout=httpx.Timeout(cfg.timeout_seconds), follow_redirects=False,
            limits=httpx.Limits(max_connections=max(1, connections),
                                max_keepalive_connections=max(1, connections)),
            headers={"User-Agent": f"saasquatch-agent/{agent_version}"},
        )

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ the documented requests

    def upload(self, path: Path, name: str, size: int, on_chunk: Callable[[], None]) -> Uploaded:
        """POST the file (multipart, field `file`, file name `name`): exactly `size` bytes of it, hashed
        as they are read. A short file makes the request fail (the caller compares the hash)."""
        with open(path, "rb") as handle:
            reader = _Reader(handle, size, on_chunk)
            files = {"file": (name, reader, "text/csv" if name.lower().endswith(".csv")
                              else "application/x-ndjson")}
            response = self._send("upload", "POST", f"{self.url}/export/upload", files=files)
        answer = self._json("upload", response)
        file_ref = answer.get("fileRef") if isinstance(answer, dict) else None
        if not isinstance(file_ref, str) or not file_ref:
            raise ApiUnavailable(f"upload: the answer has no fileRef ({_snippet(response.text)})")
        return Uploaded(file_ref, reader.sent, reader.digest.hexdigest())

    def validate(self, file_ref: str, job_type: str) -> list[Any]:
        """validateJobCreation: the server's list of errors (empty: a job may be created)."""
        job_input = {"fileRef": file_ref, "type": job_type}
        data = self._graphql("validate", VALIDATE_QUERY, {"jobInput": job_input}, operation_name="validate")
        result = data.get("validateJobCreation")
        errors = result.get("errors") if isinstance(result, dict) else None
        if errors is None:
            return []  # `errors: null` says nothing is wrong
        if not isinstance(errors, list):
            raise ApiUnavailable(f"validate: errors is not a list ({_snippet(json.dumps(result))})")
        return errors

    def create_job(self, file_ref: str, job_type: str) -> Job:
        """createJob: the new job. Any fault here with `maybe_done` True leaves it unknown whether
        the job exists."""
        job_input = {"type": job_type, "outputFormat": OUTPUT_FORMAT, "fileRef": file_ref}
        data = self._graphql("createJob", CREATE_JOB_QUERY, {"jobInput": job_input})
        job = data.get("createJob")
        job_id = job.get("id") if isinstance(job, dict) else None
        if not isinstance(job_id, str | int) or not str(job_id):
            raise ApiUnavailable(f"createJob: the answer has no job id ({_snippet(json.dumps(data))})")
        assert isinstance(job, dict)
        return Job(str(job_id), _text(job.get("type")), _text(job.get("requester")), job.get("dateCreated"))

    def job(self, job_id: str) -> JobStatus:
        data = self._graphql("job", JOB_QUERY, {"id": job_id})
        job = data.get("job")
        if not isinstance(job, dict) or not isinstance(job.get("status"), str) or not job["status"]:
            raise ApiUnavailable(f"job {job_id}: the answer has no status ({_snippet(json.dumps(data))})",
                                 maybe_done=False)
        stats = job.get("stats")
        records = stats.get("recordsProcessed") if isinstance(stats, dict) else None
        return JobStatus(str(job["status"]), int(records) if isinstance(records, int | float) else None)

    def check_key(self) -> str:
        """A harmless authenticated request (the status of a job that cannot exist): raises
        ApiKeyRefused when the key is refused; returns what the server said otherwise."""
        try:
            data = self._graphql("key check", JOB_QUERY, {"id": PROBE_JOB_ID})
        except ApiRefused as exc:
            if any(word in json.dumps(exc.errors).upper() for word in _AUTH_WORDS):
                raise ApiKeyRefused(f"the API key was refused ({error_words(exc.errors)})",
                                    status=exc.status, maybe_done=False) from None
            return f"answered with GraphQL errors for a job that does not exist ({error_words(exc.errors)})"
        return f"answered job(id) with {_snippet(json.dumps(data))}"

    # ------------------------------------------------------------------ plumbing

    def _graphql(self, what: str, query: str, variables: dict[str, Any],
                 operation_name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, "variables": variables}
        if operation_name:
            body["operationName"] = operation_name
        response = self._send(what, "POST", f"{self.url}/graphql", json=body)
        answer = self._json(what, response)
        if not isinstance(answer, dict):
            raise ApiUnavailable(f"{what}: the answer is not a JSON object ({_snippet(response.text)})")
        errors = answer.get("errors")
        if errors:
            listed = errors if isinstance(errors, list) else [errors]
            raise ApiRefused(f"{what}: SaaSquatch refused it: {error_words(listed)}",
                             status=response.status_code, maybe_done=False, errors=listed)
        data = answer.get("data")
        if not isinstance(data, dict):
            raise ApiUnavailable(f"{what}: the answer has no data ({_snippet(response.text)})")
        return data

    def _send(self, what: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ApiUnavailable(fault_words(self.cfg, what, exc), maybe_done=False) from None
        except httpx.HTTPError as exc:  # the request may have reached the server: read/write faults
            raise ApiUnavailable(fault_words(self.cfg, what, exc), maybe_done=True) from None
        self._check(what, response)
        return response

    def _check(self, what: str, response: httpx.Response) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        text = _snippet(response.text)
        if status in (401, 403):
            raise ApiKeyRefused(f"{what}: the API key was refused (HTTP {status}); check the key in"
                                " api.api_key_file (or the credential api-key) against the tenant's API keys"
                                " and api.tenant_alias", status=status, maybe_done=False)
        if status in (408, 429, 503):  # not carried out: timed out waiting, too many requests, not now
            raise ApiUnavailable(f"{what}: HTTP {status} ({text or response.reason_phrase})", status=status,
                                 maybe_done=False, retry_after=_retry_after(response))
        if status >= 500:
            raise ApiUnavailable(f"{what}: HTTP {status} ({text or response.reason_phrase})", status=status,
                                 maybe_done=True, retry_after=_retry_after(response))
        if 300 <= status < 400 or status in (404, 405, 407):
            where = response.headers.get("Location", "")
            moved = f" to {where}" if where else ""
            raise ApiUnavailable(f"{what}: HTTP {status} {response.reason_phrase}{moved}; check api.base_url"
                                 " and api.tenant_alias", status=status, maybe_done=False)
        errors = _graphql_errors(response)
        raise ApiRefused(f"{what}: SaaSquatch refused it (HTTP {status}): "
                         f"{error_words(errors) if errors else text or response.reason_phrase}",
                         status=status, maybe_done=False, errors=errors or [text or response.reason_phrase])

    @staticmethod
    def _json(what: str, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ApiUnavailable(f"{what}: the answer is not JSON ({_snippet(response.text)})") from None


def tls_details(cfg: ApiConfig) -> str:
    """One unauthenticated GET of base_url (any HTTP answer will do): the TLS version and the
    certificate the server showed, checked against the configured CAs (`doctor`)."""
    try:
        with httpx.Client(verify=trust_context(cfg), follow_redirects=False,
                          timeout=httpx.Timeout(cfg.timeout_seconds)) as client, \
                client.stream("GET", cfg.base_url) as response:
            stream = response.extensions.get("network_stream")
            ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
            status = response.status_code
            if ssl_object is None:
                return f"HTTP {status} (no TLS details: plain HTTP or a proxy in between)"
            cert = ssl_object.getpeercert() or {}
            version = ssl_object.version()
    except httpx.HTTPError as exc:
        raise ApiUnavailable(fault_words(cfg, "TLS check", exc), maybe_done=False) from None
    return (f"{version}, certificate for {_name(cert.get('subject')) or '?'} issued by"
            f" {_name(cert.get('issuer')) or '?'}, valid until {cert.get('notAfter', '?')} (HTTP {status})")


def fault_words(cfg: ApiConfig, what: str, exc: httpx.HTTPError) -> str:
    words = str(exc) or type(exc).__name__
    hint = ""
    if "CERTIFICATE_VERIFY_FAILED" in words or "certificate verify failed" in words:
        hint = ("; the server's certificate is not trusted: set api.ca_file to the CA that signs it"
                " (a private CA or a TLS-inspecting proxy)")
    return f"{what}: cannot reach {cfg.base_url} ({type(exc).__name__}: {_snippet(words)}){hint}"


def _graphql_errors(response: httpx.Response) -> list[Any]:
    try:
        answer = response.json()
    except ValueError:
        return []
    errors = answer.get("errors") if isinstance(answer, dict) else None
    return errors if isinstance(errors, list) else []


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _name(parts: Any) -> str:
    """A certificate subject or issuer (ssl's tuple of RDN tuples) as `CN=..., O=...`."""
    if not parts:
        return ""
    short = {"commonName": "CN", "organizationName": "O", "countryName": "C"}
    return ", ".join(f"{short.get(key, key)}={value}" for rdn in parts for key, value in rdn)
