"""The lifecycle jobs in-process: status parsing, listing cost of one poll, retention (with crashes
in the middle of a prune), compression; against the asyncssh sandbox server where SFTP is needed."""

from __future__ import annotations

import gzip
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paramiko
import pytest

from agent.config import Config, ConfigError, load_config
from agent.ops.keys import write_new_keypair
from agent.ops.sandbox import SandboxServer
from agent.pipeline.lifecycle import Lifecycle, iso
from agent.store.archive import Filer
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport.remote_status import Outcome, read_status
from tests.helpers import configs

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


def make_config(root: Path, tables: dict[str, Any] | None = None, *, port: int = 22) -> Config:
    return configs.make_config(root, tables, port=port, folders=True)


# ---------------------------------------------------------------------------- status parsing


@pytest.mark.parametrize(("content", "outcome", "says"), [
    (b"COMPLETED\n", Outcome.COMPLETED, "COMPLETED"),
    (b"success: 12 records\n", Outcome.COMPLETED, "12 records"),
    (b"Processed", Outcome.COMPLETED, "PROCESSED"),
    (b"FAILED: file header invalid\n", Outcome.FAILED, "file header invalid"),
    (b"ABORTED\n", Outcome.FAILED, "ABORTED"),
    (b"processing\n", Outcome.PROCESSING, "PROCESSING"),
    (b"import job created\n", Outcome.ACCEPTED, "import job created"),
    (b'{"status": "COMPLETED", "stats": {"recordsProcessed": 3}}', Outcome.COMPLETED, "recordsProcessed 3"),
    (b'{"Status": "failed", "message": "bad file"}', Outcome.FAILED, "bad file"),
    (b'{"status": "WEIRD"}', Outcome.UNKNOWN, "WEIRD"),
    (b'{"result": "ok"}', Outcome.UNKNOWN, "without a status"),
    (b"recordNumber,message,apiErrorCode,statusCode\n2,needs id,BAD_REQUEST,400\n3,x,Y,500\n",
     Outcome.FAILED, "refused 2 record(s): record 2: needs id (BAD_REQUEST, 400)"),
    (b"recordNumber,message,apiErrorCode,statusCode\n", Outcome.COMPLETED, "no errors"),
    (b"accountId,id\n1,2\n", Outcome.UNKNOWN, "starts with"),
    (b"Hello there\n", Outcome.UNKNOWN, "Hello"),
    (b"", Outcome.UNKNOWN, "empty"),
    (b"\xff\xfe\x00", Outcome.UNKNOWN, "not UTF-8"),
])
def test_status_file_content(content: bytes, outcome: Outcome, says: str) -> None:
    found, message, _csv = read_status(content)
    assert found is outcome
    assert says in message


def test_status_config_keys(tmp_path: Path) -> None:
    base = make_config(tmp_path)
    assert base.status.mode == ("none",) and not base.status.tracking  # the default
    assert base.archive.retention_days == 90 and base.status.timeout == 86400
    both = make_config(tmp_path, {"status": {"mode": ["consumed", "status-files"], "folder": "/results/"}})
    assert both.status.tracking and both.status.folder == "/results"
    config = tmp_path / "bad.toml"
    for bad, key in (('mode = ["none", "consumed"]', "status.mode"), ('mode = "guess"', "status.mode"),
                     ('patterns = ["fixed.txt"]', "status.patterns"),
                     ("pol_seconds = 1", "status.pol_seconds")):
        config.write_text('[sftp]\nhost = "h"\nusername = "u"\nprivate_key = "k"\nknown_hosts = "k"\n'
                          f"[status]\n{bad}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(config)


# ---------------------------------------------------------------------------- listing cost


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[SandboxServer, Path]]:
    keys = tmp_path / "keys"
    public = write_new_keypair(keys / "id", comment="lifecycle-test")
    server = SandboxServer(tmp_path / "server", "test_tenant", public)
    server.start()
    try:
        (keys / "known_hosts").write_text(server.known_hosts_line() + "\n")
        yield server, server.root / "imports"
    finally:
        server.stop()


def uploaded_rows(journal: Journal, config: Config, count: int, remote: Path) -> list[FileRecord]:
    records = []
    for i in range(count):
        name = f"users_f{i:03d}.csv"
        record = journal.add_claim(name, config.paths.drop / name, config.spool_dir)
        Path(record.local_path).write_text(f"accountId,id\n{i},{i}\n")
        remote_name = f"users_f{i:03d}_20260101T000000Z_{i:08x}.csv"
        (remote / remote_name).write_text(f"accountId,id\n{i},{i}\n")
        records.append(journal.update(record.id, state=FileState.UPLOADED, remote_name=remote_name, size=10,
                                      sha256=f"{i:064x}", import_type="users", message="published"))
    return records


class RequestCounter:
    """Counts every SFTP request the paramiko client sends (the client's own side of the count)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[int] = Counter()
        original = paramiko.SFTPClient._async_request

        def counting(client: paramiko.SFTPClient, fileobj: Any, t: int, *args: Any) -> Any:
            self.counts[t] += 1
            return original(client, fileobj, t, *args)

        monkeypatch.setattr(paramiko.SFTPClient, "_async_request", counting)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@pytest.mark.parametrize("folders", [1, 2])
def test_one_poll_lists_each_folder_once(sandbox: tuple[SandboxServer, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, folders: int) -> None:
    server, remote = sandbox
    status: dict[str, Any] = {"mode": ["consumed", "status-files"], "timeout": 3600}
    if folders == 2:
        (server.root / "results").mkdir()
        status["folder"] = "/results"
    config = make_config(tmp_path, {"status": status}, port=server.port)
    journal = Journal(config.journal_path)
    lifecycle = Lifecycle(config, journal, Filer(config, journal))
    records = uploaded_rows(journal, config, 200, remote)
    answered = records[:5]
    status_dir = server.root / "results" if folders == 2 else remote
    for record in answered:
        (status_dir / f"{record.remote_name}.status").write_text("COMPLETED\n")
    client = RequestCounter(monkeypatch)
    try:
        lifecycle.poll()
        first_server, first_client = Counter(server.counts), client.total
        lifecycle.poll()
    finally:
        lifecycle.stop(5)
    states = Counter(r.state for r in journal.all())
    assert states == {FileState.ARCHIVED: 5, FileState.UPLOADED: 195}
    second_server = server.counts - first_server
    print(f"\nfolders={folders}: first poll (200 waiting, 5 answered): server {dict(first_server)},"
          f" client requests {first_client}; second poll (195 waiting): server {dict(second_server)},"
          f" client requests {client.total - first_client}")
    assert first_server["scandir"] == folders and second_server["scandir"] == folders
    assert first_server["stat"] + first_server["lstat"] == 0  # never one request per waiting file
    assert first_server["open"] == len(answered)  # only the status files that exist are read
    # per answered file: open, read (+ a read at EOF), close; per folder: opendir, readdirs, close
    assert first_client <= 4 * len(answered) + folders * 6
    assert client.total - first_client <= folders * 6  # 195 waiting files cost one listing per folder
    journal.close()


# ---------------------------------------------------------------------------- retention

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
AGES = {  # name -> (state, age); retention_days = 90
    "a-200d.csv": (FileState.ARCHIVED, timedelta(days=200)),
    "b-91d.csv": (FileState.ARCHIVED, timedelta(days=91)),
    "c-90d1m.csv": (FileState.ARCHIVED, timedelta(days=90, minutes=1)),
    "d-split-100d.csv": (FileState.SPLIT, timedelta(days=100)),
    "e-89d23h.csv": (FileState.ARCHIVED, timedelta(days=89, hours=23)),
    "f-10d.csv": (FileState.ARCHIVED, timedelta(days=10)),
    "g-failed-300d.csv": (FileState.FAILED, timedelta(days=300)),
    "h-stale-300d.csv": (FileState.STALE, timedelta(days=300)),
}
DUE = {"a-200d.csv", "b-91d.csv", "c-90d1m.csv", "d-split-100d.csv"}


def archived_world(config: Config) -> Journal:
    journal = Journal(config.journal_path)
    for name, (state, age) in AGES.items():
        when = NOW - age
        final = state in (FileState.FAILED, FileState.STALE)
        folder = config.paths.failed if final else config.paths.archive / f"{when:%Y/%m/%d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
        (folder / f"{name}.server.{name}.status").write_text("COMPLETED\n")
        record = journal.add_claim(name, config.paths.drop / name, config.spool_dir)
        journal.update(record.id, state=state, local_path=folder / name)
    db = sqlite3.connect(config.journal_path)
    with db:
        for name, (_state, age) in AGES.items():
            db.execute("UPDATE files SET updated_at = ? WHERE name = ?", (iso(NOW - age), name))
    db.close()
    return journal


def check_world(config: Config, journal: Journal, pruned: set[str]) -> None:
    rows = {r.name: r for r in journal.all()}
    assert set(rows) == set(AGES) - pruned
    for name in set(AGES) - DUE:  # never touched: file, server file and row all there
        path = Path(rows[name].local_path)
        assert path.read_text() == name
        assert path.with_name(f"{name}.server.{name}.status").exists()
    for name in pruned:
        assert not list(config.paths.archive.rglob(f"{name}*"))


def test_retention_prunes_exactly_what_is_older(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    journal = archived_world(config)
    lifecycle = Lifecycle(config, journal, Filer(config, journal))
    assert lifecycle.prune(NOW) == len(DUE)
    check_world(config, journal, DUE)
    folders = [p for p in config.paths.archive.rglob("*") if p.is_dir()]
    assert folders and all(any(f.is_file() for f in folder.rglob("*")) for folder in folders)  # none empty
    assert lifecycle.prune(NOW) == 0
    assert lifecycle.prune(NOW + timedelta(hours=2)) == 1  # e-89d23h.csv is now just over 90 days old
    assert {r.name for r in journal.all()} == {"f-10d.csv", "g-failed-300d.csv", "h-stale-300d.csv"}
    journal.close()


CRASHING_PRUNE = textwrap.dedent("""\
    import os, sys
    from datetime import datetime
    import agent.pipeline.lifecycle as lifecycle
    from agent.store.archive import Filer
    from agent.config import load_config
    from agent.store.journal import Journal

    config = load_config(sys.argv[1])
    crash_after = int(sys.argv[3])
    calls = 0
    real_remove = lifecycle.remove_file

    def remove_then_crash(path):
        global calls
        calls += 1
        if calls > crash_after:
            os._exit(9)  # power cut: no clean-up, no commit
        real_remove(path)

    lifecycle.remove_file = remove_then_crash
    journal = Journal(config.journal_path)
    lifecycle.Lifecycle(config, journal, Filer(config, journal)).prune(datetime.fromisoformat(sys.argv[2]))
""")


@pytest.mark.parametrize("crash_after", [0, 1, 3, 5])
def test_crash_in_the_middle_of_a_prune_loses_nothing_not_due(tmp_path: Path, crash_after: int) -> None:
    config = make_config(tmp_path)
    (tmp_path / "agent.toml").write_text(
        '[sftp]\nhost = "127.0.0.1"\nusername = "t"\nprivate_key = "keys/id"\nknown_hosts = "keys/kh"\n'
        '[paths]\ndrop = "drop"\nstate_dir = "state"\narchive = "archive"\nfailed = "failed"\n')
    journal = archived_world(config)
    command = [sys.executable, "-c", CRASHING_PRUNE, str(tmp_path / "agent.toml"), NOW.isoformat(),
               str(crash_after)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert proc.returncode == 9, proc.stderr
    left = {r.name for r in journal.all()}
    assert set(AGES) - DUE <= left  # nothing that was not due is gone
    assert len(left) > len(AGES) - len(DUE)  # the crash did cut the prune short
    lifecycle = Lifecycle(config, journal, Filer(config, journal))
    lifecycle.prune(NOW)  # the next run finishes the job
    check_world(config, journal, DUE)
    journal.close()


# ---------------------------------------------------------------------------- compression


def test_compress_and_finish_an_interrupted_compression(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"archive": {"compress": True}})
    journal = Journal(config.journal_path)
    lifecycle = Lifecycle(config, journal, Filer(config, journal))
    records = []
    for name in ("users_a.csv", "users_b.csv"):
        folder = config.paths.archive / "2026" / "06" / "01"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"accountId,id\n{name},1\n")
        record = journal.add_claim(name, config.paths.drop / name, config.spool_dir)
        records.append(journal.update(record.id, state=FileState.ARCHIVED, local_path=folder / name))
    done = lifecycle.compress(records[0])
    assert done.local_path.endswith("users_a.csv.gz") and not Path(records[0].local_path).exists()
    assert gzip.decompress(Path(done.local_path).read_bytes()) == b"accountId,id\nusers_a.csv,1\n"
    # a crash after the original was unlinked but before the journal said .gz
    original = Path(records[1].local_path)
    Path(f"{original}.gz").write_bytes(gzip.compress(original.read_bytes()))
    original.unlink()
    lifecycle.archive_job()
    assert journal.get(records[1].id).local_path == f"{original}.gz"
    assert lifecycle.prune(datetime.now(UTC) + timedelta(days=91)) == 2
    assert not list(config.paths.archive.rglob("*.gz"))
    journal.close()
