"""A local stand-in for SaaSquatch's import API, for `saasquatch-agent demo --transport api` and tests.

It serves the documented sequence (shared/saasquatch-imports.md) over HTTPS on 127.0.0.1, on a
free port, with a test CA and server certificate made at start (cryptography; nothing is kept
after `stop()`): `POST /api/v1/{tenant}/export/upload` (multipart field `file`, or a raw body) ->
`fileRef`; `POST /api/v1/{tenant}/graphql` with `validateJobCreation`, `createJob` and `job(id)`.
HTTP basic auth with an empty user and the sandbox's API key; anything else gets 401.

What happens to each upload is decided by `judge(name, data, job_type) -> Verdict` (validation
errors, the job's final word, how many polls before it, recordsProcessed). Tests steer faults
through `faults` (HTTP statuses to answer the next requests of a kind with, with or without doing
the request's work first) and `hold(kind)` (the next request of that kind waits, before or after
its work, until released: the moment a test kills the agent). Every job created is recorded with
the SHA-256 of its upload, so a test can check that no content got two jobs.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
HOLD_LIMIT_SECONDS = 120.0  # a held request waits at most this long
IDLE_CONNECTION_SECONDS = 30.0
KINDS = ("upload", "validate", "createJob", "job", "other")


@dataclass(frozen=True)
class Verdict:
    errors: list[Any] = field(default_factory=list)  # validateJobCreation's errors
    final_status: str = "COMPLETED"  # the job's last word
    polls_before_final: int = 1  # job(id) answers IN_PROGRESS this many times first
    records: int | None = None  # recordsProcessed (None: the file's record count)


Judge = Callable[[str, bytes, str], Verdict]


def count_records(name: str, data: bytes) -> int:
    lines = [line for line in data.splitlines() if line.strip()]
    return max(0, len(lines) - 1) if name.lower().endswith(".csv") else len(lines)


def default_judge(name: str, data: bytes, job_type: str) -> Verdict:
    """Every non-empty file validates and completes after one poll (the demo)."""
    if not data.strip():
        return Verdict(errors=[{"message": "The file is empty"}])
    return Verdict()


@dataclass
class Fault:
    status: int
    after_work: bool = False  # do the request's work (store the upload, create the job), then fail
    body: str = '{"message": "fault injected by the sandbox"}'


@dataclass
class Hold:
    after_work: bool
    abandon: bool = False  # once released, drop the request without doing its work (nor answering)
    reached: threading.Event = field(default_factory=threading.Event)  # the request is waiting
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class JobRecord:
    id: str
    file_ref: str
    type: str
    sha256: str
    verdict: Verdict
    polls: int = 0


class ApiSandbox:
    def __init__(self, root: Path, tenant: str, api_key: str, judge: Judge = default_judge) -> None:
        self.root = root
        self.tenant = tenant
        self.api_key = api_key
        self.judge = judge
        self.uploads: dict[str, tuple[str, bytes]] = {}  # fileRef -> (name, bytes)
        self.jobs: dict[str, JobRecord] = {}
        self.counts: Counter[str] = Counter()  # requests by kind (refused ones too)
        self.faults: dict[str, list[Fault]] = {kind: [] for kind in KINDS}
        self._holds: dict[str, list[Hold]] = {kind: [] for kind in KINDS}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ control

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.root / "sandbox-ca.pem"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        context = self._tls_context()
        sandbox = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, address = self.socket.accept()
                return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

        class Handler(_Handler):
            owner = sandbox

        self._server = Server((HOST, 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="api-sandbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            for holds in self._holds.values():
                for hold in holds:
                    hold.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        for name in ("sandbox-server.key", "sandbox-server.pem"):
            (self.root / name).unlink(missing_ok=True)

    def __enter__(self) -> ApiSandbox:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def fail_next(self, kind: str, *statuses: int, after_work: bool = False) -> None:
        """Answer the next requests of `kind` with these HTTP statuses (after doing their work first
        when `after_work`: the upload stored, the job created)."""
        with self._lock:
            self.faults[kind].extend(Fault(status, after_work) for status in statuses)

    def hold(self, kind: str, *, after_work: bool = False) -> Hold:
        """The next request of `kind` waits (before or after its work) until `release` is set."""
        hold = Hold(after_work)
        with self._lock:
            self._holds[kind].append(hold)
        return hold

    def jobs_by_content(self) -> Counter[str]:
        """How many jobs were created for each content (SHA-256 of the uploaded bytes)."""
        with self._lock:
            return Counter(job.sha256 for job in self.jobs.values())

    # ------------------------------------------------------------------ TLS made at start

    def _tls_context(self) -> ssl.SSLContext:
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "saasquatch-agent sandbox CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(ca_name).public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        key_path = self.root / "sandbox-server.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(server_key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        cert_path = self.root / "sandbox-server.pem"
        cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_path, key_path)
        return context

    # ------------------------------------------------------------------ the API

    def _take_fault(self, kind: str) -> Fault | None:
        with self._lock:
            return self.faults[kind].pop(0) if self.faults[kind] else None

    def _wait_if_held(self, kind: str, after_work: bool) -> bool:
        """Wait while the next request of `kind` is held at this point; False: drop it."""
        with self._lock:
            holds = self._holds[kind]
            hold = holds[0] if holds and holds[0].after_work == after_work else None
            if hold is not None:
                holds.pop(0)
        if hold is None:
            return True
        hold.reached.set()
        hold.release.wait(HOLD_LIMIT_SECONDS)
        return not hold.abandon

    def upload(self, name: str, data: bytes) -> str:
        stem, dot, ext = name.rpartition(".")
        suffix = f".{ext}" if dot else ""
        file_ref = f"imports/{self.tenant}/{stem if dot else name}_{secrets.token_hex(12)}{suffix}"
        with self._lock:
            self.uploads[file_ref] = (name, data)
        return file_ref

    def validate(self, file_ref: str, job_type: str) -> dict[str, Any]:
        with self._lock:
            upload = self.uploads.get(file_ref)
        if upload is None:
            return {"errors": [{"message": f"fileRef {file_ref} not found"}]}
        name, data = upload
        return {"errors": self.judge(name, data, job_type).errors}

    def create_job(self, file_ref: str, job_type: str) -> dict[str, Any] | None:
        with self._lock:
            upload = self.uploads.get(file_ref)
        if upload is None:
            return None
        name, data = upload
        verdict = self.judge(name, data, job_type)
        if verdict.records is None:
            verdict = Verdict(verdict.errors, verdict.final_status, verdict.polls_before_final,
                              count_records(name, data))
        job = JobRecord(secrets.token_hex(12), file_ref, job_type, hashlib.sha256(data).hexdigest(), verdict)
        with self._lock:
            self.jobs[job.id] = job
        return {"id": job.id, "type": job_type, "requester": "API", "dateCreated": int(time.time() * 1000)}

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            job.polls += 1
            final = job.polls > job.verdict.polls_before_final
        if not final:
            return {"status": "IN_PROGRESS", "stats": {"recordsProcessed": 0}}
        processed = job.verdict.records if job.verdict.final_status == "COMPLETED" else 0
        return {"status": job.verdict.final_status, "stats": {"recordsProcessed": processed}}


def _graphql_kind(query: str) -> str:
    if "validateJobCreation" in query:
        return "validate"
    if "createJob" in query:
        return "createJob"
    if "job(" in query.replace(" ", ""):
        return "job"
    return "other"


class _Handler(BaseHTTPRequestHandler):
    owner: ApiSandbox
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_SECONDS

    def setup(self) -> None:
        self.request.settimeout(IDLE_CONNECTION_SECONDS)
        try:
            self.request.do_handshake()
        except (OSError, ssl.SSLError):
            self.request.close()
            raise
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client is gone (a test killed it)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def do_GET(self) -> None:
        self._answer(200, {"message": "SaaSquatch import API sandbox"})

    def do_POST(self) -> None:
        sandbox = self.owner
        prefix = f"/api/v1/{sandbox.tenant}/"
        body = self._body()
        path = self.path.split("?", 1)[0]
        if not path.startswith(prefix):
            self._answer(404, {"message": f"no such route {path}"})
            return
        route = path[len(prefix):]
        expected = "Basic " + base64.b64encode(f":{sandbox.api_key}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            with sandbox._lock:
                sandbox.counts["unauthorized"] += 1
            self._answer(401, {"message": "Unauthorized", "apiErrorCode": "UNAUTHORIZED", "statusCode": 401})
            return
        if route == "export/upload":
            self._upload(body)
        elif route == "graphql":
            self._graphql(body)
        else:
            self._answer(404, {"message": f"no such route {path}"})

    def _upload(self, body: bytes) -> None:
        sandbox = self.owner
        with sandbox._lock:
            sandbox.counts["upload"] += 1
        content_type = self.headers.get("Content-Type", "")
        name, data = "upload", body
        if content_type.startswith("multipart/form-data"):
            message = BytesParser(policy=HTTP).parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + body)
            found = None
            for part in message.iter_parts():
                if part.get_param("name", header="content-disposition") == "file":
                    found = part
            if found is None:
                self._answer(400, {"message": "multipart body without a 'file' field"})
                return
            name = found.get_filename() or "upload"
            payload = found.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
        fault = sandbox._take_fault("upload")
        if not sandbox._wait_if_held("upload", after_work=False):
            self.close_connection = True
            return
        if fault is not None and not fault.after_work:
            self._answer(fault.status, fault.body, {"Retry-After": "0"})
            return
        file_ref = sandbox.upload(name, data)
        if not sandbox._wait_if_held("upload", after_work=True):
            self.close_connection = True
            return
        if fault is not None:
            self._answer(fault.status, fault.body)
            return
        self._answer(200, {"fileRef": file_ref})

    def _graphql(self, body: bytes) -> None:
        sandbox = self.owner
        try:
            request = json.loads(body)
            query = str(request["query"])
            variables = request.get("variables") or {}
        except (ValueError, KeyError, TypeError):
            self._answer(400, {"errors": [{"message": "not a GraphQL request"}]})
            return
        kind = _graphql_kind(query)
        with sandbox._lock:
            sandbox.counts[kind] += 1
        fault = sandbox._take_fault(kind)
        if not sandbox._wait_if_held(kind, after_work=False):
            self.close_connection = True
            return
        if fault is not None and not fault.after_work:
            self._answer(fault.status, fault.body, {"Retry-After": "0"})
            return
        answer = self._work(kind, variables)
        if not sandbox._wait_if_held(kind, after_work=True):
            self.close_connection = True
            return
        if fault is not None:
            self._answer(fault.status, fault.body)
            return
        self._answer(200, answer)

    def _work(self, kind: str, variables: dict[str, Any]) -> dict[str, Any]:
        sandbox = self.owner
        job_input = variables.get("jobInput") or {}
        if kind == "validate":
            return {"data": {"validateJobCreation": sandbox.validate(str(job_input.get("fileRef")),
                                                                     str(job_input.get("type")))}}
        if kind == "createJob":
            job = sandbox.create_job(str(job_input.get("fileRef")), str(job_input.get("type")))
            if job is None:
                return {"data": {"createJob": None},
                        "errors": [{"message": f"fileRef {job_input.get('fileRef')} not found"}]}
            return {"data": {"createJob": job}}
        if kind == "job":
            status = sandbox.job(str(variables.get("id")))
            if status is None:
                return {"data": {"job": None}, "errors": [{"message": f"Job {variables.get('id')} not found",
                                                           "extensions": {"code": "NOT_FOUND"}}]}
            return {"data": {"job": status}}
        return {"data": {"__typename": "Query"}}
