"""The agent as a real systemd service: a Debian root booted with systemd-nspawn (tests/helpers/
container.py), installed with scripts/install.sh as README says, delivering to an OpenSSH sshd inside
the container (a chrooted, key-only tenant user as SaaSquatch's server).

The steps run in file order against one booted container and build on each other (issue 14): install
(also on a machine without systemd as PID 1), delivery by a member of saasquatch-drop, upgrade over a
running install, `systemctl reload`, journald priorities, kill -9 and restart without loss, `run
--once` as root, a configuration error ending in `failed`, an instance beside the plain unit keeping
its drop folder's permissions, purge of the plain unit while an instance runs, and a clean purge.
Needs root, debootstrap and systemd-nspawn (fails, never skips, without them). A cold run builds the
root filesystem (about a minute) under /var/cache/saasquatch-agent-tests.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.container import SRC, WHEELS, Container, build_wheelhouse, rootfs

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

ETC = "/etc/saasquatch-agent"
LIB = "/var/lib/saasquatch-agent"
SERVER_DIR = "/srv/sftp/tenant/imports"  # the tenant's upload folder as the container sees it
INSTALL = f"{SRC}/scripts/install.sh"
UNIT = "saasquatch-agent"

SERVER_SETUP = r"""
set -e
useradd --no-create-home --home-dir / --shell /usr/sbin/nologin tenant
usermod -p '*' tenant
install -d -m 0755 /srv/sftp /srv/sftp/tenant /srv/sftp/keys
install -d -o tenant -g tenant -m 0755 /srv/sftp/tenant/imports
touch /srv/sftp/keys/tenant
cat > /etc/ssh/sshd_config.d/tenant.conf <<'EOF'
ListenAddress 127.0.0.1
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
Match User tenant
  AuthorizedKeysFile /srv/sftp/keys/%u
  ChrootDirectory /srv/sftp/%u
  ForceCommand internal-sftp
  AllowTcpForwarding no
EOF
systemctl restart ssh
useradd --create-home --shell /bin/sh alice
"""


class System:
    """The booted container plus what the steps learn about it."""

    def __init__(self, box: Container) -> None:
        self.box = box
        self.sent: dict[str, bytes] = {}  # drop name -> bytes, every file dropped for delivery

    def sh(self, command: str, **kwargs: Any) -> str:
        return self.box.run(command, **kwargs).stdout

    def host_path(self, inside: str) -> Path:
        """A path inside the container, read from the host through its PID 1's root."""
        return Path(f"/proc/{self.box.leader}/root{inside}")

    def server_files(self) -> list[bytes]:
        folder = self.host_path(SERVER_DIR)
        return sorted(p.read_bytes() for p in folder.iterdir() if not p.name.startswith("."))

    def drop(self, drop_dir: str, name: str, payload: bytes) -> None:
        """alice (a member of saasquatch-drop, nothing else) writes a hidden name, then renames it."""
        script = f"cat > {drop_dir}/.{name}.part && mv {drop_dir}/.{name}.part {drop_dir}/{name}"
        self.box.run(f"runuser -u alice -- sh -c {shlex.quote(script)}", input=payload.decode())
        self.sent[name] = payload

    def states(self, config: str = f"{ETC}/agent.toml") -> dict[str, str]:
        rows = json.loads(self.sh(f"saasquatch-agent status --json --config {config}"))
        return {row["name"]: row["state"] for row in rows}

    def wait(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.5) + 2):
            if predicate():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert predicate(), f"timed out after {timeout} s waiting for {what}\n{self.journal()}"

    def journal(self, unit: str = UNIT, extra: str = "") -> str:
        return self.sh(f"journalctl -u {unit} -o cat --no-pager {extra} | tail -n 60", check=False)

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} {unit}").strip()

    def configure(self, instance: str = "") -> str:
        """README's steps after install.sh: key, server account, config, trust-host, doctor."""
        config = f"{ETC}/{instance}.toml" if instance else f"{ETC}/agent.toml"
        key = f"{ETC}/keys/{instance}_ed25519" if instance else f"{ETC}/keys/id_ed25519"
        self.sh(f"saasquatch-agent keygen {key}")
        self.sh(f"ssh-keygen -y -f {key} >> /srv/sftp/keys/tenant")
        edits = ("s/^host = .*/host = \"127.0.0.1\"/", "s/^username = .*/username = \"tenant\"/",
                 "s#^remote_dir = .*#remote_dir = \"/imports\"#",
                 "s/^settle_seconds = .*/settle_seconds = 0.5/")
        self.sh(f"sed -i {' '.join('-e ' + shlex.quote(edit) for edit in edits)} {config}")
        fingerprint = self.sh("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
        self.sh(f"saasquatch-agent trust-host --config {config} --fingerprint {fingerprint}")
        doctor = self.box.run(f"saasquatch-agent doctor --config {config}", check=False)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        return config


def _printf(payload: bytes) -> str:
    return payload.decode().replace("\n", "\\n")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    started = time.monotonic()
    root = rootfs()
    built = time.monotonic()
    wheels = build_wheelhouse(tmp_path_factory.mktemp("wheels"))
    logs = tmp_path_factory.mktemp("container")
    with Container(root, wheels, logs / "console.log") as box:
        print(f"root filesystem {built - started:.0f} s, wheels and boot {time.monotonic() - built:.0f} s")
        box.run(SERVER_SETUP)
        yield System(box)


def test_install_on_a_machine_without_systemd_as_pid1(system: System) -> None:
    """Without /run/systemd/system (sd_booted) install.sh installs but never says `systemctl enable`."""
    out = system.sh(f"unshare --mount sh -c 'mount -t tmpfs tmpfs /run/systemd && {INSTALL} --no-package'")
    assert "systemd is not running as PID 1" in out, out
    assert "systemctl enable" not in out, out


def test_install_and_start(system: System) -> None:
    out = system.sh(f"{INSTALL} --wheels {WHEELS}")
    assert "systemctl enable --now saasquatch-agent.service" in out, out
    python = system.sh("readlink -f /opt/saasquatch-agent/bin/python").strip()
    assert python.startswith("/usr/bin/python3"), python  # a system interpreter, not one under /root
    assert system.sh("runuser -u saasquatch-agent -- saasquatch-agent --version").strip()
    assert system.sh("ls /usr/share/doc/saasquatch-agent/").split() == ["README.md"]  # Documentation=
    system.sh("usermod -a -G saasquatch-drop alice")  # as install.sh says
    system.configure()
    system.sh(f"systemctl enable --now {UNIT}", timeout=60)
    assert system.show(UNIT, "ActiveState") == "active"
    assert system.show(UNIT, "StatusText").startswith("watching ")


def test_delivery_by_a_drop_group_member(system: System) -> None:
    system.drop(f"{LIB}/drop", "users_first.csv", b"accountId,id\nacct-1,user-1\n")
    system.drop(f"{LIB}/drop/users", "second.csv", b"accountId,id\nacct-2,user-2\n")
    system.wait("two archived files", lambda: set(system.states().values()) == {"archived"}
                and len(system.states()) == 2, 60)
    assert system.server_files() == sorted(system.sent.values())  # each once, under a final name
    archived = system.sh(f"find {LIB}/archive -type f").split()
    assert len(archived) == 2, archived


def test_upgrade_over_a_running_install_keeps_everything(system: System) -> None:
    before = system.sh(f"sha256sum {ETC}/agent.toml {ETC}/keys/id_ed25519 {ETC}/keys/known_hosts")
    out = system.sh(f"{INSTALL} --wheels {WHEELS}")
    assert "systemctl restart saasquatch-agent.service" in out, out  # says the old code still runs
    assert system.sh(f"sha256sum {ETC}/agent.toml {ETC}/keys/id_ed25519 {ETC}/keys/known_hosts") == before
    system.sh(f"systemctl restart {UNIT}", timeout=60)
    assert system.states() == {"users_first.csv": "archived", "second.csv": "archived"}


def test_reload(system: System) -> None:
    """The reload takes a changed setting: files of 100 bytes or more are now checked in a worker
    process while they are sent, so the next file shows that process working under the unit's
    sandbox (its system-call filter, MemoryDenyWriteExecute, the read-only system)."""
    pid = system.show(UNIT, "MainPID")
    system.sh(f"printf '\\n[upload]\\ncheck_while_sending_bytes = 100\\n' >> {ETC}/agent.toml")
    system.sh(f"systemctl reload {UNIT}", timeout=60)  # ExecReload= sends SIGHUP
    system.wait("the reload in the journal", lambda: "configuration reloaded" in system.journal(), 30)
    assert system.show(UNIT, "MainPID") == pid and system.show(UNIT, "ActiveState") == "active"
    payload = b"accountId,id,email\n" + b"".join(b"acct-r%d,user-r%d,r%d@example.com\n" % (i, i, i)
                                                  for i in range(20))
    system.drop(f"{LIB}/drop", "users_after_reload.csv", payload)
    system.wait("the file dropped after the reload archived",
                lambda: system.states().get("users_after_reload.csv") == "archived", 60)
    assert "checked in a worker process while it is sent" in system.journal()
    assert system.server_files() == sorted(system.sent.values())


def test_journald_priorities_and_single_timestamp(system: System) -> None:
    system.sh(f"runuser -u alice -- ln -s /etc/passwd {LIB}/drop/users_link.csv")  # warned about, never read
    system.wait("the warning in the journal", lambda: "left alone" in system.journal(), 90)
    warnings = system.journal(extra="-p warning")
    assert "left alone" in warnings, warnings
    assert "watching" not in warnings and "configuration reloaded" not in warnings, warnings
    lines = system.journal().splitlines()
    assert lines and not [line for line in lines if re.match(r"\d{4}-\d\d-\d\d", line)], lines
    system.sh(f"rm {LIB}/drop/users_link.csv")


def test_kill_9_restarts_without_loss(system: System) -> None:
    restarts = int(system.show(UNIT, "NRestarts"))
    payloads = {f"users_k{i:02d}.csv": f"accountId,id\nacct-k{i},user-k{i}\n".encode() for i in range(30)}
    script = " && ".join(f"printf '{_printf(p)}' > {LIB}/drop/.{n} && mv {LIB}/drop/.{n} {LIB}/drop/{n}"
                         for n, p in payloads.items())
    system.sh(f"runuser -u alice -- sh -c {shlex.quote(script)}")
    system.sent.update(payloads)
    time.sleep(0.7)  # some files claimed or in flight
    system.sh(f"systemctl kill -s KILL {UNIT}")
    system.wait("the restart", lambda: int(system.show(UNIT, "NRestarts")) > restarts
                and system.show(UNIT, "ActiveState") == "active", 60)
    system.wait("every file archived",
                lambda: all(system.states().get(n) == "archived" for n in payloads), 120)
    assert system.server_files() == sorted(system.sent.values())  # nothing lost, nothing sent twice


def test_run_once_as_root_refuses_and_says_what_to_run(system: System) -> None:
    system.sh(f"systemctl stop {UNIT}", timeout=60)
    system.drop(f"{LIB}/drop", "users_once.csv", b"accountId,id\nacct-o,user-o\n")
    result = system.box.run(f"saasquatch-agent run --once --config {ETC}/agent.toml", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert system.sh(f"find {LIB} -user root") == ""  # nothing left that the service cannot use
    found = re.search(r"(systemd-run .*?) \(or let the service do it: (systemctl restart \S+)\)",
                      " ".join(result.stderr.split()))
    assert found, result.stderr
    system.sh(found.group(1), timeout=120)  # exactly what the message says
    assert system.states()["users_once.csv"] == "archived"
    assert system.sh(f"find {LIB} -user root") == ""
    system.sh(found.group(2), timeout=60)
    assert system.show(UNIT, "ActiveState") == "active"


def test_configuration_error_ends_in_failed(system: System) -> None:
    system.sh(f"{INSTALL} --instance broken --no-package")
    system.sh(f"saasquatch-agent keygen {ETC}/keys/broken_ed25519")
    system.sh(f"sed -i 's/^port = /prot = /' {ETC}/broken.toml")  # a misspelt key: exit 2
    unit = "saasquatch-agent@broken"
    assert system.box.run(f"systemctl start {unit}", check=False, timeout=60).returncode != 0
    time.sleep(7)  # longer than RestartSec=5: a restart would have happened by now
    assert system.show(unit, "ActiveState") == "failed"
    assert system.show(unit, "NRestarts") == "0"
    assert system.show(unit, "ExecMainStatus") == "2"
    status = system.box.run(f"systemctl status --no-pager -n 5 {unit}", check=False).stdout
    assert "prot" in status, status  # the agent's one line names the key
    system.sh(f"{INSTALL} --uninstall --purge --instance broken")
    assert system.show(UNIT, "ActiveState") == "active"


def test_an_instance_keeps_the_plain_units_drop_permissions(system: System) -> None:
    system.sh(f"{INSTALL} --instance live --wheels {WHEELS}")
    config = system.configure("live")
    system.sh("systemctl enable --now saasquatch-agent@live", timeout=60)
    system.sh(f"systemctl restart {UNIT}", timeout=60)  # systemd re-applies StateDirectory=
    modes = system.sh(f"stat -c '%n %U:%G %a' {LIB} {LIB}/drop {LIB}/drop/users {LIB}/archive "
                      f"{LIB}/live/drop {LIB}/live/drop/users")
    assert modes.split("\n")[:-1] == [
        f"{LIB} saasquatch-agent:saasquatch-agent 711",
        f"{LIB}/drop saasquatch-agent:saasquatch-drop 2770",
        f"{LIB}/drop/users saasquatch-agent:saasquatch-drop 2770",
        f"{LIB}/archive saasquatch-agent:saasquatch-agent 700",
        f"{LIB}/live/drop saasquatch-agent:saasquatch-drop 2770",
        f"{LIB}/live/drop/users saasquatch-agent:saasquatch-drop 2770",
    ], modes
    system.drop(f"{LIB}/drop", "users_plain.csv", b"accountId,id\nacct-p,user-p\n")
    system.drop(f"{LIB}/live/drop", "users_live.csv", b"accountId,id\nacct-l,user-l\n")
    system.wait("both delivered", lambda: system.states().get("users_plain.csv") == "archived"
                and system.states(config).get("users_live.csv") == "archived", 60)
    assert system.server_files() == sorted(system.sent.values())


def test_purge_of_the_plain_unit_leaves_a_running_instance_alone(system: System) -> None:
    live = "saasquatch-agent@live"
    out = system.sh(f"{INSTALL} --uninstall --purge")
    assert "kept" in out and live in out, out
    assert system.show(live, "ActiveState") == "active"
    assert system.show(live, "NeedDaemonReload") == "no"
    system.sh(f"test -e {ETC}/live.toml && test -e {ETC}/keys/live_ed25519 && test -d {LIB}/live/drop")
    system.sh(f"test ! -e {ETC}/agent.toml && test ! -e {LIB}/drop && test ! -e {LIB}/journal.sqlite3")
    system.sh("test ! -e /etc/systemd/system/saasquatch-agent.service")
    assert system.sh("find /etc/systemd/system -xtype l") == ""  # no dangling links
    system.drop(f"{LIB}/live/drop", "users_live2.csv", b"accountId,id\nacct-l2,user-l2\n")
    system.wait("delivery after the purge", lambda: system.states(f"{ETC}/live.toml").get("users_live2.csv")
                == "archived", 60)

    out = system.sh(f"{INSTALL} --uninstall --purge --instance live")
    for path in (ETC, LIB, "/opt/saasquatch-agent", "/usr/local/bin/saasquatch-agent",
                 "/etc/systemd/system/saasquatch-agent@.service", "/usr/share/doc/saasquatch-agent"):
        system.sh(f"test ! -e {path}")
    assert system.box.run("id saasquatch-agent", check=False).returncode != 0
    assert system.box.run("getent group saasquatch-drop", check=False).returncode != 0
    assert system.sh("find /etc/systemd/system -xtype l") == ""
    assert system.sh("systemctl list-units --all --plain --no-legend 'saasquatch-agent*'").strip() == ""
    assert system.server_files() == sorted(system.sent.values())
